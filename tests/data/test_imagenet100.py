"""ImageNet-100 (ppmoco/data/imagenet100.py, tools/imagenet100.py): CMC's class list, and the list
files written for a generated ILSVRC2012 tree, read back by the ImageNet-100 configs."""
import hashlib
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ppmoco.config import load_config
from ppmoco.data import build_dataset
from ppmoco.data.imagenet100 import LIST_NAMES, imagenet100_wnids, write_imagenet100_lists
from ppmoco.errors import DataError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WNIDS = sorted(imagenet100_wnids())
# 900 other classes, so that train/ holds ImageNet-1k's 1000 folders: half sort before the 100
# (n00000xxx), half after (n9xxxxxxx), so an index into them is not an index into the 100.
OTHERS = [f"n00000{i:03d}" for i in range(450)] + [f"n9{i:07d}" for i in range(450)]
ALL = sorted(WNIDS + OTHERS)


def jpeg(seed):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def ilsvrc(tmp_path):
    """root/train/<wnid>/ for the 1000 classes, images in the 100 and in 3 others; root/val/<wnid>/."""
    root = tmp_path / "ILSVRC2012"
    data = jpeg(0)
    for wnid in ALL:
        os.makedirs(root / "train" / wnid)
    for wnid in WNIDS + OTHERS[:2] + OTHERS[-1:]:
        for i in range(2):
            put(root / "train" / wnid / f"{wnid}_{i}.JPEG", data)
        put(root / "val" / wnid / f"ILSVRC2012_val_{ALL.index(wnid):08d}.JPEG", data)
    return root


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rsplit(" ", 1) for line in f.read().splitlines()]


# Catches: a class added, dropped, repeated or swapped for another in the shipped list (the hash pins
# the list as CMC's imagenet100.txt ships it; solo-learn's imagenet100_classes.txt is the same).
def test_the_shipped_list_is_cmcs_100_wnids():
    wnids = imagenet100_wnids()
    assert len(wnids) == 100 == len(set(wnids)) and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[0] == "n02869837" and wnids[-1] == "n02090622"  # CMC's order
    assert hashlib.sha256(" ".join(wnids).encode()).hexdigest() == \
        "fa2b1926ad6f96fb2011dfd8e1621f1d1c1014144cbb3465ee1579cb042df394"


# Catches: images of other classes listed, labels not the index among the sorted 100 (CMC's list
# order, or the 1000-class index), paths not relative to the root the configs' image_root names, a
# class's images missed, val labelled unlike train.
def test_class_folder_trees_give_the_100_classes_labelled_by_sorted_wnid(ilsvrc, tmp_path):
    written = write_imagenet100_lists(str(ilsvrc), str(tmp_path / "lists"))
    assert {split: count for split, (_, count) in written.items()} == {"train": 200, "val": 100}
    for split, (path, _) in written.items():
        assert path == str(tmp_path / "lists" / LIST_NAMES[split])
        lines = read_lines(path)
        for relative, label in lines:
            wnid = relative.split("/")[1]
            assert relative.startswith(f"{split}/") and os.path.isfile(ilsvrc / relative)
            assert int(label) == WNIDS.index(wnid)
        assert sorted({int(label) for _, label in lines}) == list(range(100))
    assert write_imagenet100_lists(str(ilsvrc))["train"][0] == str(ilsvrc / LIST_NAMES["train"])  # default: root


def flat_val(root, label):
    """Move val/<wnid>/* to val/ and write root/val_list.txt with `label(wnid)` labels."""
    lines = []
    for wnid in sorted(os.listdir(root / "val")):
        for name in os.listdir(root / "val" / wnid):
            os.rename(root / "val" / wnid / name, root / "val" / name)
            lines.append(f"val/{name} {label(wnid)}\n")
        os.rmdir(root / "val" / wnid)
    (root / "val_list.txt").write_text("".join(lines))
    return lines


# Catches: PaddleClas's integer labels read as indices into the 100 (or CMC's order) instead of the
# 1000 sorted train/ folders; wnid labels or bare file names refused; other classes' images kept.
@pytest.mark.parametrize("label", [lambda wnid: ALL.index(wnid), lambda wnid: wnid])
def test_a_flat_val_is_labelled_by_its_label_file(ilsvrc, label):
    flat_val(ilsvrc, label)
    path, count = write_imagenet100_lists(str(ilsvrc))["val"]
    assert count == 100
    for relative, new in read_lines(path):
        assert int(new) == WNIDS.index(ALL[int(re.search(r"_(\d{8})\.JPEG", relative).group(1))])
    # bare file names in a label file of another name
    lines = (ilsvrc / "val_list.txt").read_text().replace("val/", "")
    (ilsvrc / "labels.txt").write_text(lines)
    os.remove(ilsvrc / "val_list.txt")
    assert read_lines(write_imagenet100_lists(str(ilsvrc), val_labels=str(ilsvrc / "labels.txt"))["val"][0]) == \
        read_lines(path)


# Catches: a missing class folder skipped (a 99-class "ImageNet-100"), an error without the count or
# the classes, label-file problems reported as tracebacks or not at all.
def test_errors_are_one_line_and_name_the_missing_classes(ilsvrc, tmp_path):
    os.rename(ilsvrc / "val" / WNIDS[5], tmp_path / "aside")
    with pytest.raises(DataError, match=rf"^{ilsvrc / 'val'} has no folder for 1 of the 100 ImageNet-100 classes "
                                        rf"\(first: {WNIDS[5]}\); point --root at an ILSVRC2012 folder whose val/ "
                                        r"holds a folder per class$"):
        write_imagenet100_lists(str(ilsvrc))
    os.rename(tmp_path / "aside", ilsvrc / "val" / WNIDS[5])
    for wnid in WNIDS[:4]:
        os.rename(ilsvrc / "train" / wnid, tmp_path / wnid)
    with pytest.raises(DataError, match=rf"train has no folder for 4 of the 100 ImageNet-100 classes \(first: "
                                        rf"{WNIDS[0]}, {WNIDS[1]}, {WNIDS[2]}\)"):
        write_imagenet100_lists(str(ilsvrc))
    for wnid in WNIDS[:4]:
        os.rename(tmp_path / wnid, ilsvrc / "train" / wnid)
    os.remove(ilsvrc / "train" / WNIDS[7] / f"{WNIDS[7]}_0.JPEG")
    os.remove(ilsvrc / "train" / WNIDS[7] / f"{WNIDS[7]}_1.JPEG")
    with pytest.raises(DataError, match=rf"{WNIDS[7]} holds no images"):
        write_imagenet100_lists(str(ilsvrc))
    put(ilsvrc / "train" / WNIDS[7] / "x.JPEG", jpeg(1))

    lines = flat_val(ilsvrc, lambda wnid: ALL.index(wnid))
    (ilsvrc / "val_list.txt").write_text("".join(line for line in lines if WNIDS[3] not in line and
                                                 f"_{ALL.index(WNIDS[3]):08d}." not in line))
    with pytest.raises(DataError, match=rf"val_list\.txt labels no image of 1 of the 100 ImageNet-100 classes \(first: "
                                        rf"{WNIDS[3]}\); give the label file of the whole ILSVRC2012 validation set$"):
        write_imagenet100_lists(str(ilsvrc))
    (ilsvrc / "val_list.txt").write_text("val/a.JPEG\n")
    with pytest.raises(DataError, match=r"val_list\.txt line 1: expected '<path> <label>', got 'val/a\.JPEG'"):
        write_imagenet100_lists(str(ilsvrc))
    (ilsvrc / "val_list.txt").write_text(f"val/missing.JPEG {WNIDS[0]}\n")
    with pytest.raises(DataError, match=r"val_list\.txt line 1: .*val/missing\.JPEG does not exist; fix the line"):
        write_imagenet100_lists(str(ilsvrc))
    os.rmdir(ilsvrc / "train" / OTHERS[100])
    (ilsvrc / "val_list.txt").write_text("val/a.JPEG 3\n")
    with pytest.raises(DataError, match=r"line 1: integer labels index the 1000 sorted class folders of train/, "
                                        r"which holds 999; give the labels as wnids"):
        write_imagenet100_lists(str(ilsvrc))
    os.remove(ilsvrc / "val_list.txt")
    with pytest.raises(DataError, match=r"val holds no class folders, so its labels come from a label file, and "
                                        r".*val_list\.txt does not exist; give --val-labels"):
        write_imagenet100_lists(str(ilsvrc))
    with pytest.raises(DataError, match=r"nowhere/train does not exist; --root is the ILSVRC2012 folder"):
        write_imagenet100_lists(str(tmp_path / "nowhere"))


# Catches: the tool's progress or summary missing, a user error as a traceback or exit code 1.
def test_the_tool_reports_progress_and_one_line_errors(ilsvrc, tmp_path):
    tool = [sys.executable, os.path.join(ROOT, "tools", "imagenet100.py"), "--root", str(ilsvrc)]
    proc = subprocess.run(tool + ["--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[listing ImageNet-100 train\] 100 folders in [\d.]+ s", proc.stdout)
    assert f"wrote {tmp_path / 'out' / LIST_NAMES['train']}: 200 train images of the 100 classes" in proc.stdout
    os.rename(ilsvrc / "train" / WNIDS[0], tmp_path / "aside")
    proc = subprocess.run(tool, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {ilsvrc / 'train'} has no folder for 1 of the 100 ImageNet-100 classes (first: {WNIDS[0]}); point "
        "--root at an ILSVRC2012 folder whose train/ holds a folder per class"]


# Catches: the configs reading other files than the tool writes, or a class count other than 100.
@pytest.mark.parametrize("config, splits", [("mocov2_pt_in100_1n8c.yaml", ("Train",)),
                                            ("moco_lincls_in100_1n8c.yaml", ("Train", "Eval"))])
def test_the_configs_read_the_lists_the_tool_writes(ilsvrc, config, splits):
    write_imagenet100_lists(str(ilsvrc))
    cfg = load_config(config)
    for split in splits:
        dataset_cfg = cfg["Data"][split]["dataset"]
        assert dataset_cfg["cls_label_path"] == dataset_cfg["image_root"] + LIST_NAMES[{"Train": "train",
                                                                                          "Eval": "val"}[split]]
        dataset_cfg = dict(dataset_cfg, image_root=f"{ilsvrc}/",
                           cls_label_path=str(ilsvrc / os.path.basename(dataset_cfg["cls_label_path"])))
        ds = build_dataset(dataset_cfg, f"Data.{split}.dataset", seed=0)
        assert len(ds) == (200 if split == "Train" else 100) and ds.num_classes == 100
        assert ds[0][0].shape == (3, 224, 224)
