"""Label subsets of a training set (ppmoco/data/subsets.py): SimCLR's split files and the seeded,
class-balanced label_fraction draw, on ImageNet-style trees and on the embedded digits."""
import logging
import math
import os

import numpy as np
import pytest

from ppmoco.data import build_dataset, write_drawn_split
from ppmoco.data.datasets import GeneralClsDataset
from ppmoco.data.subsets import per_class_counts
from ppmoco.errors import ConfigError

KEY = "Data.Train.dataset"
# An ImageNet-style tree: SimCLR's file names, <wnid>_<number>.JPEG in train/<wnid>/.
WNIDS = {"n01440764": 7, "n01443537": 5, "n01484850": 3}


def touch(path):
    """An image file for the listing (which reads names, not pixels)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8")
    return path


@pytest.fixture
def imagenet_tree(tmp_path):
    root = tmp_path / "train"
    for wnid, count in WNIDS.items():
        for i in range(count):
            touch(root / wnid / f"{wnid}_{1000 + i}.JPEG")
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The embedded digits, built once: {split: folder}."""
    base = tmp_path_factory.mktemp("d") / "dataset" / "digits"
    build_dataset({"name": "GeneralClsDataset", "root": str(base / "train"), "builtin": "digits"}, KEY, seed=0)
    return {split: base / split for split in ("train", "val")}


def cls(**kwargs):
    return build_dataset({"name": "GeneralClsDataset", **kwargs}, KEY, seed=0)


def relatives(ds, base):
    return [os.path.relpath(path, base) for path, _ in ds.samples]


# --- split files (SimCLR's format) ---

# Catches: blank, comment or indented lines taken as names; the class not the image's folder's (the
# wnid prefix of SimCLR's names); labels renumbered over the subset's classes (the classifier would
# see other ids than validation); the subset out of dataset order.
def test_a_simclr_split_file_keeps_the_named_images_with_their_classes(imagenet_tree, tmp_path):
    split = tmp_path / "1percent.txt"
    split.write_text("n01484850_1002.JPEG\n\n# a comment\n  n01440764_1003.JPEG  \nn01440764_1000.JPEG\n")
    ds = cls(root=str(imagenet_tree), split_file=str(split))
    assert relatives(ds, imagenet_tree) == ["n01440764/n01440764_1000.JPEG", "n01440764/n01440764_1003.JPEG",
                                            "n01484850/n01484850_1002.JPEG"]
    classes = sorted(WNIDS)
    assert ds.labels.tolist() == [classes.index(os.path.basename(p).split("_")[0]) for p, _ in ds.samples]
    assert ds.num_classes == 3 and ds.class_names == classes and ds.drawn_split is None


# Catches: a list dataset matched on anything but the file name of its lines' paths.
def test_a_split_file_selects_from_a_list_dataset(imagenet_tree, tmp_path):
    listing = tmp_path / "train_list.txt"
    listing.write_text("".join(f"train/{w}/{w}_{1000 + i}.JPEG {n}\n" for n, w in enumerate(WNIDS) for i in range(2)))
    split = tmp_path / "split.txt"
    split.write_text("n01443537_1001.JPEG\ntrain/n01440764/n01440764_1000.JPEG\n")
    ds = cls(image_root=str(tmp_path), cls_label_path=str(listing), split_file=str(split))
    assert relatives(ds, tmp_path) == ["train/n01440764/n01440764_1000.JPEG", "train/n01443537/n01443537_1001.JPEG"]
    assert ds.labels.tolist() == [0, 1]


@pytest.mark.parametrize("content, message", [
    ("n01440764_1000.JPEG\ntrain/n01440764/n01440764_1001.JPEG 0\n",
     r".*split\.txt line 2: 'train/.*1001\.JPEG 0' is not an image file name \(SimCLR's format: .*\); 'path label' "
     r"lines belong in a list file \(image_root \+ cls_label_path\); fix the line"),
    ("n01440764_1000.JPEG,0\n", r".*split\.txt line 1: 'n01440764_1000\.JPEG,0' is not an image file name .*\); "
                                r"fix the line"),
    ("n01440764_1000.JPEG\n\nn01440764_1000.JPEG\n",
     r".*split\.txt line 3: 'n01440764_1000\.JPEG' is already on line 1; remove the repeat"),
    ("\n# nothing\n", r".*split\.txt names no images; give a split file with one image file name per line"),
    ("n01440764_1000.JPEG\nn9_1.JPEG\nn01443537_1004.JPEG\nn9_2.JPEG\nn01443537_1005.JPEG\nn9_3.JPEG\n",
     r"4 of the 6 images .*split\.txt names are not in .*train \(first: n9_1\.JPEG, n9_2\.JPEG, "
     r"n01443537_1005\.JPEG\); point split_file at a split of these images, or root/image_root at the images it lists"),
])
def test_split_file_errors_are_one_line_naming_file_line_and_fix(imagenet_tree, tmp_path, content, message):
    # Catches: malformed lines read as names, a repeated name counted twice, an empty split silently
    # training on nothing, missing names ignored or reported without their number and first ones.
    split = tmp_path / "split.txt"
    split.write_text(content)
    with pytest.raises(ConfigError, match=rf"^{KEY}\.split_file: {message}$"):
        cls(root=str(imagenet_tree), split_file=str(split))


# Catches: a file name that repeats across classes resolved to one of them silently; a relative-path
# line not matched against the dataset's own relative paths.
def test_a_repeated_file_name_needs_its_relative_path(tmp_path):
    root = tmp_path / "train"
    for label in ("a", "b"):
        touch(root / label / "img.png")
    split = tmp_path / "split.txt"
    split.write_text("img.png\n")
    with pytest.raises(ConfigError, match=rf"^{KEY}\.split_file: .*names img\.png, which is the file name of 2 "
                                          r"images of .*train \(a/img\.png, b/img\.png\); write the line as the "
                                          r"image's path relative to the dataset folder, e\.g\. a/img\.png$"):
        cls(root=str(root), split_file=str(split))
    split.write_text("./b/img.png\n")
    assert cls(root=str(root), split_file=str(split)).labels.tolist() == [1]


# --- the label_fraction draw ---

def hamilton(counts, fraction):
    """Largest remainders, recomputed one seat at a time in plain Python: round(f x N) in all (halves
    up), each class its share rounded down, the rest one by one to the largest remaining share; then
    at least one per class."""
    quotas = [fraction * n for n in counts]
    seats = [math.floor(q) for q in quotas]
    while sum(seats) < math.floor(fraction * sum(counts) + 0.5):
        seats[max(range(len(counts)), key=lambda c: quotas[c] - seats[c])] += 1
    return [max(s, 1) for s in seats]


def ties_free(counts, fraction, take):
    """The allocation `take` as a multiset of (remainder of the share, share below 1, images above the
    share rounded down): equal for allocations that differ only between classes of equal remainders."""
    shares = [fraction * n for n in counts]
    return sorted((round(q - math.floor(q), 9), q < 1, t - math.floor(q)) for q, t in zip(shares, take))


# Catches: per-class rounding (10 digits at 1% instead of 14: every class rounds 1.4 down), a total
# off round(f x N), the extra images given to the smallest remainders or the first classes, a class
# left without an image.
@pytest.mark.parametrize("seed", [0, 7])
def test_the_allocation_is_proportional_by_largest_remainders(seed):
    rng = np.random.default_rng(seed)
    cases = [([142, 146, 142, 146, 145, 146, 145, 143, 139, 143], 0.01), ([142, 146, 142, 146, 145, 146, 145, 143, 139,
                                                                           143], 0.1),
             ([1300] * 5 + [732], 0.01), ([1, 1, 50], 0.1), ([10, 10, 10], 0.5)]
    cases += [(rng.choice(np.arange(1, 2000), size=rng.integers(2, 30), replace=False).tolist(), float(f))
              for f in rng.uniform(0.001, 1, 20)]
    for counts, fraction in cases:
        got = per_class_counts(counts, fraction, seed).tolist()
        # Classes with equal remainders may trade an extra image (ties go in a seeded order): compare
        # which remainders got one, a class's own extra where remainders differ.
        assert ties_free(counts, fraction, got) == ties_free(counts, fraction, hamilton(counts, fraction)), (
            counts, fraction, got)
    assert per_class_counts([142] * 10, 0.01, seed).sum() == 14  # not 10, as rounding each class would give
    tied = per_class_counts([3, 3, 3], 0.5, seed)  # 4.5 rounds half up; the two extra go to two of three ties
    assert tied.sum() == 5 and sorted(tied.tolist()) == [1, 2, 2]


# Catches: the draw seeded by Global.seed (several training seeds would fine-tune on different
# subsets), the same subset for every label_seed, an unbalanced or unsorted subset.
def test_the_draw_is_seeded_by_label_seed_alone_and_class_balanced(imagenet_tree):
    def draw(seed, label_seed):
        return build_dataset({"name": "GeneralClsDataset", "root": str(imagenet_tree), "label_fraction": 0.5,
                              "label_seed": label_seed}, KEY, seed=seed)

    first = draw(seed=1, label_seed=3)
    assert first.samples == draw(seed=2022, label_seed=3).samples
    taken = np.bincount(first.labels)
    assert first.samples == sorted(first.samples) and taken.sum() == 8  # of 15, 7 + 5 + 3
    assert np.all(np.abs(taken - np.array([7, 5, 3]) / 2) == 0.5)  # each class half its images, rounded
    # 0.4 of 7, 5, 3 is 3, 2, 1 images for every label_seed (no ties): the seeds differ in which ones.
    def images(label_seed):
        ds = build_dataset({"name": "GeneralClsDataset", "root": str(imagenet_tree), "label_fraction": 0.4,
                            "label_seed": label_seed}, KEY, seed=0)
        assert np.bincount(ds.labels).tolist() == [3, 2, 1]
        return tuple(p for p, _ in ds.samples)

    assert len({images(s) for s in range(4)}) > 1
    default = build_dataset({"name": "GeneralClsDataset", "root": str(imagenet_tree), "label_fraction": 0.5}, KEY, 0)
    assert default.samples == draw(seed=1, label_seed=0).samples


# Catches: the 1% and 10% digits subsets not ~1% and ~10% of the 1437 images, a class without an
# image, a subset reaching into the validation split, the written split file not reproducing the draw
# (other names, other order, labels lost), the file written outside SimCLR's format.
@pytest.mark.parametrize("fraction, size", [(0.01, 14), (0.1, 144)])
def test_digits_subsets_are_disjoint_from_validation_and_reproduced_by_their_file(digits, tmp_path, fraction, size,
                                                                                 caplog):
    full = cls(root=str(digits["train"]))
    ds = cls(root=str(digits["train"]), builtin="digits", label_fraction=fraction)
    assert len(full) == 1437 and len(ds) == size
    counts = np.bincount(ds.labels, minlength=10)
    share = np.bincount(full.labels) * fraction
    assert np.all(counts >= 1) and np.all(np.abs(counts - share) < 1)
    val = cls(root=str(digits["val"]))
    names = {os.path.basename(p) for p, _ in ds.samples}  # the index of the digit in load_digits()
    assert not names & {os.path.basename(p) for p, _ in val.samples}
    assert all(os.path.commonpath([p, str(digits["train"])]) == str(digits["train"]) for p, _ in ds.samples)

    with caplog.at_level(logging.INFO, logger="ppmoco"):
        path = write_drawn_split(ds, str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / f"label_fraction_{fraction:g}_seed0.txt")
    assert path in caplog.text and f"{KEY}.split_file={path}" in caplog.text
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines == [os.path.basename(p) for p, _ in ds.samples] and all("/" not in line for line in lines)
    again = cls(root=str(digits["train"]), split_file=path)
    assert again.samples == ds.samples and again.labels.tolist() == ds.labels.tolist()
    listed = cls(image_root=str(digits["train"].parent), cls_label_path=str(digits["train"].parent / "train_list.txt"),
                 split_file=path)
    assert listed.samples == ds.samples  # the same file selects the same images from the list form
    assert write_drawn_split(again, str(tmp_path / "other")) is None and not (tmp_path / "other").exists()


# Catches: the drawn file naming two images of one file name by that name alone (unreadable back).
def test_a_drawn_file_writes_repeated_file_names_as_paths(tmp_path):
    root = tmp_path / "train"
    for label in ("a", "b"):
        for i in range(3):
            touch(root / label / f"{i}.png")
    ds = cls(root=str(root), label_fraction=1.0)
    path = write_drawn_split(ds, str(tmp_path))
    assert open(path, encoding="utf-8").read().splitlines() == [f"{c}/{i}.png" for c in "ab" for i in range(3)]
    assert cls(root=str(root), split_file=path).samples == ds.samples


@pytest.mark.parametrize("keys, message", [
    ({"split_file": "x.txt", "label_fraction": 0.1}, r"split_file: set either split_file .* or label_fraction .*, "
                                                     r"not both$"),
    ({"label_fraction": 0}, r"label_fraction: expected a number in \(0, 1\], e\.g\. 0\.01 .*, got 0$"),
    ({"label_fraction": 1.5}, r"label_fraction: expected a number in \(0, 1\].*got 1\.5$"),
    ({"label_fraction": True}, r"label_fraction: expected a number .*got True$"),
    ({"label_fraction": "1%"}, r"label_fraction: expected a number .*got '1%'$"),
    ({"label_fraction": 0.1, "label_seed": -1}, r"label_seed: expected an int in \[0, 2\*\*32\), got -1$"),
    ({"label_seed": 3}, r"label_seed: seeds the label_fraction draw, which is not set; set label_fraction or "
                        r"remove label_seed$"),
    ({"split_file": "missing.txt"}, r"split_file: missing\.txt does not exist; give the path of a split file"),
])
def test_subset_keys_are_checked_before_the_listing(tmp_path, keys, message):
    # Catches: contradictory or out-of-range keys accepted, or found only after listing a large tree
    # (the root here does not exist: the listing would fail with a DataError instead).
    with pytest.raises(ConfigError, match=rf"^{KEY}\.{message}"):
        cls(root=str(tmp_path / "nowhere"), **keys)


# Catches: a class-balanced draw over unlabelled pretraining images (every image one "class").
def test_label_fraction_needs_labels(tmp_path):
    for i in range(4):
        touch(tmp_path / "flat" / f"{i}.png")
    with pytest.raises(ConfigError, match=rf"^{KEY}\.label_fraction: draws per class, but 4 of 4 images have no "
                                          r"label \(e\.g\. 0\.png\)"):
        build_dataset({"name": "ContrastiveLearningDataset", "root": str(tmp_path / "flat"), "label_fraction": 0.5},
                      KEY, seed=0)
    ds = build_dataset({"name": "ContrastiveLearningDataset", "root": str(tmp_path / "flat"),
                        "split_file": str(touch_split(tmp_path, "1.png\n"))}, KEY, seed=0)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["1.png"]


def touch_split(tmp_path, text):
    path = tmp_path / "split.txt"
    path.write_text(text)
    return path


def test_the_constructor_takes_the_subset_keys_directly(imagenet_tree):
    ds = GeneralClsDataset(root=str(imagenet_tree), label_fraction=0.2, label_seed=5)
    assert len(ds) == 3 and ds.drawn_split.key_path == "dataset"  # round(0.2 x 15), one per class
