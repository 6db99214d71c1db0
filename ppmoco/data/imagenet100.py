"""ImageNet-100, CMC's 100-class subset of ImageNet-1k, as list files for the list datasets.

imagenet100.txt beside this file holds the 100 WordNet ids in the order CMC ships them
(HobbitLong/CMC, imagenet100.txt; solo-learn's imagenet100_classes.txt is the same list).
write_imagenet100_lists reads an ILSVRC2012 folder,

    root/train/<wnid>/*.JPEG
    root/val/<wnid>/*.JPEG, or root/val/*.JPEG with a label file,

and writes in100_train_list.txt and in100_val_list.txt: 'relative/path label' lines (list_file's
format; the paths relative to root, so root is the configs' image_root), the label of a class its
index among the 100 wnids sorted, which is what a folder tree of the 100 classes would give.

The label file of a flat val/ (PaddleClas's val_list.txt, which the ImageNet-1k configs read) has
'path label' lines: the path relative to root or a file name in val/, the label a wnid or an integer,
the index of the class among the 1000 sorted folders of train/ (PaddleClas's and Caffe's numbering).
"""
import os

from ppmoco.data.datasets import _images_under, _subfolders
from ppmoco.data.subsets import relative_paths
from ppmoco.errors import DataError
from ppmoco.fileio import write_text_atomic
from ppmoco.progress import Progress

WNIDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100.txt")
LIST_NAMES = {"train": "in100_train_list.txt", "val": "in100_val_list.txt"}
IMAGENET_CLASSES = 1000
SHOWN = 3  # missing classes quoted in an error


def imagenet100_wnids():
    """The 100 wnids of ImageNet-100, in CMC's order."""
    with open(WNIDS_FILE, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _missing_folders(folder, wnids):
    missing = [wnid for wnid in wnids if not os.path.isdir(os.path.join(folder, wnid))]
    if missing:
        raise DataError(f"{folder} has no folder for {len(missing)} of the 100 ImageNet-100 classes (first: "
                        f"{', '.join(missing[:SHOWN])}); point --root at an ILSVRC2012 folder whose "
                        f"{os.path.basename(folder)}/ holds a folder per class")


def _from_class_folders(root, split, wnids):
    """['relative/path label'] of root/split/<wnid>/ for the sorted `wnids`."""
    folder = os.path.join(root, split)
    _missing_folders(folder, wnids)
    lines = []
    progress = Progress(f"listing ImageNet-100 {split}", len(wnids), unit="folders")
    for label, wnid in enumerate(wnids):
        files = _images_under(os.path.join(folder, wnid))
        if not files:
            raise DataError(f"{os.path.join(folder, wnid)} holds no images; restore the class's images from "
                            "ILSVRC2012")
        lines += [f"{relative} {label}" for relative in relative_paths(files, root)]
        progress.advance(1)
    return lines


def _label_wnid(label, where, train_classes):
    """The wnid a label-file label names: itself, or an index into the sorted train/ folders."""
    if not label.isdigit():
        return label
    if len(train_classes) != IMAGENET_CLASSES:
        raise DataError(f"{where}: integer labels index the {IMAGENET_CLASSES} sorted class folders of train/, "
                        f"which holds {len(train_classes)}; give the labels as wnids (n01440764) or use the "
                        "full train/")
    if int(label) >= IMAGENET_CLASSES:
        raise DataError(f"{where}: label {label} is outside [0, {IMAGENET_CLASSES}); fix the label file")
    return train_classes[int(label)]


def _from_label_file(root, label_file, wnids):
    """['relative/path label'] of the flat val/ images whose label-file class is one of `wnids`."""
    if not os.path.isfile(label_file):
        raise DataError(f"{os.path.join(root, 'val')} holds no class folders, so its labels come from a label "
                        f"file, and {label_file} does not exist; give --val-labels (e.g. PaddleClas's "
                        "val_list.txt: 'val/ILSVRC2012_val_00000001.JPEG 65' lines)")
    with open(label_file, encoding="utf-8") as f:
        text = f.read().splitlines()
    train_classes = _subfolders(os.path.join(root, "train"))
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    lines, seen = [], set()
    progress = Progress(f"reading {label_file}", len(text), unit="lines")
    for number, line in enumerate(text, start=1):
        if number % 4096 == 0 or number == len(text):
            progress.advance(number - progress.done)
        parts = line.strip().rsplit(None, 1)
        if not parts:
            continue
        where = f"{label_file} line {number}"
        if len(parts) != 2:
            raise DataError(f"{where}: expected '<path> <label>', got {line!r}; fix the line")
        wnid = _label_wnid(parts[1], where, train_classes)
        if wnid not in label_of:
            continue
        relative = parts[0] if "/" in parts[0] else f"val/{parts[0]}"
        if not os.path.isfile(os.path.join(root, relative)):
            raise DataError(f"{where}: {os.path.join(root, relative)} does not exist; fix the line or --root")
        lines.append(f"{relative} {label_of[wnid]}")
        seen.add(wnid)
    unseen = [wnid for wnid in wnids if wnid not in seen]
    if unseen:
        raise DataError(f"{label_file} labels no image of {len(unseen)} of the 100 ImageNet-100 classes (first: "
                        f"{', '.join(unseen[:SHOWN])}); give the label file of the whole ILSVRC2012 validation set")
    return lines


def write_imagenet100_lists(root, out_dir=None, val_labels=None):
    """Write the ImageNet-100 list files of the ILSVRC2012 folder `root` into `out_dir` (default root);
    {split: (path, number of images)}. `val_labels`: the label file of a flat val/ (default
    root/val_list.txt)."""
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{os.path.join(root, split)} does not exist; --root is the ILSVRC2012 folder that "
                            "holds train/ and val/")
    wnids = sorted(imagenet100_wnids())
    splits = {"train": _from_class_folders(root, "train", wnids)}
    if _subfolders(os.path.join(root, "val")):
        splits["val"] = _from_class_folders(root, "val", wnids)
    else:
        splits["val"] = _from_label_file(root, val_labels or os.path.join(root, "val_list.txt"), wnids)
    written = {}
    for split, lines in splits.items():
        path = os.path.join(out_dir or root, LIST_NAMES[split])
        write_text_atomic(path, "".join(f"{line}\n" for line in lines))
        written[split] = (path, len(lines))
    return written
