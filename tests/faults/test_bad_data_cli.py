"""Promise 5 through tools/train.py: bad data is one line naming the file (exit 2, no traceback,
no checkpoint), or skipped and counted with skip_bad_images; unusual but valid images just work."""
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from fault_helpers import (  # noqa: E402
    SMALL_DATA,
    assert_nothing_saved,
    assert_untouched,
    assert_user_error,
    image_tree,
    run_train,
    save_rgb,
)

pytestmark = pytest.mark.slow


def truncated_jpeg():
    """A JPEG cut inside its scan data: the header parses, the decode fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:len(buffer.getvalue()) * 2 // 3]


# name -> (file replacing data/b/7.png, its content, what the error says about it)
BAD_FILES = {
    "zero_byte": ("b/7.jpg", b"", "the file is empty (0 bytes)"),
    "truncated_jpeg": ("b/7.jpg", truncated_jpeg(), "image file is truncated"),
    "not_an_image": ("b/7.png", b"just some text, not pixels\n", "cannot identify image file"),
}


def _damage(root, kind):
    """Swap one of the 16 images for a bad file (so every epoch, all 16 samples included, meets it)."""
    os.remove(root / "b" / "7.png")
    name, content, _ = BAD_FILES[kind]
    (root / name).write_bytes(content)
    return root / name


def _folder(root, *overrides):
    return (*SMALL_DATA, f"Data.Train.dataset.root={root}", "Engine.max_steps=6", *overrides)


@pytest.mark.parametrize("kind, workers", [("zero_byte", 0), ("zero_byte", 2), ("truncated_jpeg", 0),
                                           ("not_an_image", 2)])
def test_undecodable_file_is_one_line_naming_it(tmp_path, kind, workers):
    """num_workers 0 decodes in Paddle's loader thread, 2 in worker processes: both must report it."""
    bad = _damage(image_tree(tmp_path / "data"), kind)
    out = tmp_path / "run"
    proc = run_train(out, *_folder(tmp_path / "data", f"Data.Train.loader.num_workers={workers}"),
                     expect=2, timeout=120)
    assert_user_error(proc, f"cannot decode image {bad}: {BAD_FILES[kind][2]}",
                      "set Data.Train.dataset.skip_bad_images: true")
    assert_nothing_saved(out)


def test_skip_bad_images_counts_and_completes(tmp_path):
    root = image_tree(tmp_path / "data")
    bad = []
    for i, (kind, (name, content, _)) in enumerate(BAD_FILES.items()):
        os.remove(root / "a" / f"{i}.png")
        (root / "a" / f"bad_{kind}{os.path.splitext(name)[1]}").write_bytes(content)
        bad.append(root / "a" / f"bad_{kind}{os.path.splitext(name)[1]}")
    out = tmp_path / "run"
    run_train(out, *_folder(root, "Data.Train.dataset.skip_bad_images=true", "Engine.max_steps=5"))
    log = (out / "train.log").read_text()
    for path in bad:
        assert f"skipping undecodable image {path} (" in log
    assert "(3 skipped so far by this process)" in log  # epoch 1 met all three
    assert (out / "step_5" / "model.pdparams").is_file()


def test_unusual_valid_images_just_work(tmp_path):
    """Grayscale, CMYK, RGBA, palette, 16-bit PNG, smaller than the 16 px crop, non-ASCII names."""
    root = tmp_path / "data"
    gray, colour = root / "gray", root / "cölour_ü"  # a non-ASCII class folder too
    for i in range(2):
        save_rgb(gray / f"l_{i}.png", seed=i, mode="L")
        save_rgb(gray / f"one_bit_{i}.png", seed=10 + i, mode="1")
        save_rgb(gray / f"tiny_{i}.png", size=8, seed=20 + i)
        save_rgb(gray / f"palette_{i}.gif", seed=30 + i, mode="P")
        save_rgb(colour / f"cmyk_{i}.jpg", seed=40 + i, mode="CMYK")
        save_rgb(colour / f"rgba_{i}.png", seed=50 + i, mode="RGBA")
        save_rgb(colour / f"数字_ß_{i}.png", seed=60 + i)
        deep = np.random.default_rng(70 + i).integers(0, 65536, (32, 32), dtype=np.uint16)
        Image.fromarray(deep).save(colour / f"sixteen_bit_{i}.png")  # mode I;16
    out = tmp_path / "run"
    run_train(out, *_folder(root, "Engine.max_steps=5"))
    log = (out / "train.log").read_text()
    assert "16 images" in log and "skipping" not in log
    assert (out / "step_5" / "model.pdparams").is_file()


def _list_file(tmp_path, lines):
    root = image_tree(tmp_path / "data")
    path = tmp_path / "train_list.txt"
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return root, path


GOOD_LINES = [f"{c}/{i}.png {label}" for label, c in enumerate("ab") for i in range(8)]
# Pretraining reads any images; the labelled listing (linear evaluation, the kNN bank) is what refuses
# data without labels. Built here through the pretraining config, it fails before any step.
LABELLED = "Data.Train.dataset.name=GeneralClsDataset"


@pytest.mark.parametrize("lines, extra, message", [
    (GOOD_LINES + ["a/missing.png 0"], [], "line 17: {root}/a/missing.png does not exist"),
    (GOOD_LINES[:3] + ["a/3.png"] + GOOD_LINES[4:], [LABELLED],
     "line 4: expected '<relative/path> <label>', got 'a/3.png'"),
    (GOOD_LINES[:5] + ["a/5.png five"], [], "line 6: label 'five' is not an integer"),
    (GOOD_LINES[:-1] + ["b/7.png 5"], ["Data.Train.dataset.class_num=2"],
     "label 5 of {root}/b/7.png is outside [0, 2)"),
    (["a/0.png -1"] + GOOD_LINES[1:], [], "label -1 of {root}/a/0.png is negative"),
], ids=["missing_path", "no_label", "label_not_int", "label_out_of_range", "negative_label"])
def test_bad_list_file_is_one_line_naming_it(tmp_path, lines, extra, message):
    root, list_path = _list_file(tmp_path, lines)
    out = tmp_path / "run"
    proc = run_train(out, *SMALL_DATA, "Data.Train.dataset.root=null", f"Data.Train.dataset.image_root={root}",
                     f"Data.Train.dataset.cls_label_path={list_path}", "Engine.max_steps=2", *extra, expect=2)
    line = assert_user_error(proc, message.format(root=root))
    assert str(list_path) in line
    assert_untouched(out)


@pytest.mark.parametrize("layout, extra, message", [
    ("empty_class", [LABELLED], "class folder {root}/c has no images"),
    ("no_classes", [LABELLED], "dataset folder {root} has no class subfolders; expected {root}/<class>/<image>"),
    # Catches: an unlabelled folder without images accepted, or refused in more than one line.
    ("no_images", [], "dataset folder {root} has no images (.jpg, "),
    ("missing", [], "dataset folder {root} does not exist"),
], ids=["empty_class", "no_classes", "no_images", "missing"])
def test_bad_folder_layout_is_one_line_naming_it(tmp_path, layout, extra, message):
    root = tmp_path / "data"
    if layout == "empty_class":
        image_tree(root)
        (root / "c").mkdir()
        (root / "c" / "readme.txt").write_text("not an image")
    elif layout == "no_classes":
        root.mkdir()
        (root / "stray.png").write_bytes(b"")
    elif layout == "no_images":
        (root / "deep" / "er").mkdir(parents=True)
        (root / "deep" / "er" / "readme.txt").write_text("not an image")
        save_rgb(root / ".hidden" / "0.png")
    out = tmp_path / "run"
    proc = run_train(out, *_folder(root, *extra), expect=2)
    assert_user_error(proc, message.format(root=root))
    assert_untouched(out)
