"""PASCAL VOC classification data from the real `VOCdevkit/VOC2007` layout, multi-label.

`ImageSets/Main/<class>_<split>.txt` holds one line `<image id> <label>` per image, the label 1
(present), -1 (absent) or 0 (difficult only). The classes are the names of those files (sorted), the
images the ids they list (sorted), read from `JPEGImages/<id>.jpg`. Each sample's target is a vector
over the classes in mmselfsup's form (create_voc_data_files.py): PRESENT 1, ABSENT 0, IGNORED -1 for
difficult and for an image a class file does not list.
"""
import os
import re

import numpy as np

from ppmoco.data.datasets import DATASETS, FileDataset
from ppmoco.errors import ConfigError, DataError

PRESENT, ABSENT, IGNORED = 1, 0, -1
VOC_LABELS = {"1": PRESENT, "-1": ABSENT, "0": IGNORED}


def voc_split_files(main):
    """{split: {class: path}} of every `<class>_<split>.txt` in the ImageSets/Main folder `main`."""
    splits = {}
    for name in sorted(os.listdir(main)):
        found = re.fullmatch(r"([^_]+)_([^_]+)\.txt", name)
        if found:
            splits.setdefault(found.group(2), {})[found.group(1)] = os.path.join(main, name)
    return splits


def read_voc_split(root, split):
    """([(image path, target vector)], class names) of `split` in the VOC folder `root`."""
    main = os.path.join(root, "ImageSets", "Main")
    if not os.path.isdir(main):
        raise DataError(f"VOC folder {root} has no ImageSets/Main; root must be the VOC2007 folder of VOCdevkit")
    splits = voc_split_files(main)
    if split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        raise DataError(f"{main}: no <class>_{split}.txt files (splits found: {have}); set split to one of them")
    classes = sorted({name for files in splits.values() for name in files})
    missing = [name for name in classes if name not in splits[split]]
    if missing:
        raise DataError(f"{main}: {missing[0]}_{split}.txt is missing (class {missing[0]} has files for other "
                        "splits); restore it from the VOC archive")
    targets = {}
    for c, name in enumerate(classes):
        path = splits[split][name]
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[1] not in VOC_LABELS:
                    raise DataError(f"{path} line {number}: expected '<image id> <1, -1 or 0>', got {line.strip()!r}")
                targets.setdefault(parts[0], np.full(len(classes), IGNORED, dtype=np.int64))[c] = VOC_LABELS[parts[1]]
    samples = []
    for image_id in sorted(targets):
        image = os.path.join(root, "JPEGImages", image_id + ".jpg")
        if not os.path.isfile(image):
            raise DataError(f"{image} does not exist (listed in {main}/*_{split}.txt); restore JPEGImages")
        samples.append((image, targets[image_id]))
    if not samples:
        raise DataError(f"{main}: the {split} files list no images")
    return samples, classes


@DATASETS.register(aliases=("VOCDataset",))
class VOC07Dataset(FileDataset):
    """(image, target) from a VOCdevkit/VOC2007 folder: the image float32 CHW, the target int64 [C]
    (PRESENT / ABSENT / IGNORED), for the SVM benchmarks."""

    multi_label = True
    labelled_form = "VOC07Dataset"

    def __init__(self, root=None, split="trainval", transform_ops=None, skip_bad_images=False, class_num=None,
                 seed=0, config_key="dataset"):
        super().__init__(transform_ops, 1, skip_bad_images, seed, config_key)
        if root is None:
            raise ConfigError(f"{config_key}.root: missing; set it to the VOCdevkit/VOC2007 folder")
        self.samples, self.class_names = read_voc_split(root, split)
        if class_num is not None and class_num != len(self.class_names):
            raise ConfigError(f"{config_key}.class_num: {class_num}, but {root} has {len(self.class_names)} classes "
                              f"({', '.join(self.class_names)}); fix class_num or remove it")
        self.source, self.num_classes = root, len(self.class_names)
        self.labels = np.stack([target for _, target in self.samples])
