"""Pretraining on a user's own unlabelled images through tools/train.py, named the way FleetX's
documentation does (`-c mocov2_pt_digits_1n2c.yaml`, run outside the project): a flat folder, a deep
tree and a list file of bare paths each train a few steps."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "faults"))
from fault_helpers import SMALL_DATA, TRAIN, describe, save_rgb, train_args  # noqa: E402

pytestmark = pytest.mark.slow

TINY = [*SMALL_DATA, "Model.model.base_encoder.widths=[4,8,8,8]", "Engine.max_steps=3"]


def flat(root):
    paths = [save_rgb(root / f"img_{i:02d}.png", seed=i) for i in range(16)]
    save_rgb(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    return paths


def deep(root):
    """16 images spread over depths 0 to 3, with hidden files and folders and non-images around them."""
    folders = ["", "2024", "2024/05/trip", "2024/05/trip/raw"]
    paths = [save_rgb(root / folders[i % 4] / f"p{i}.png", seed=i) for i in range(16)]
    save_rgb(root / "2024" / ".thumbnails" / "p0.png")
    save_rgb(root / "2024" / "05" / ".p1.png")
    (root / "2024" / "05" / "trip" / "raw" / "index.json").write_text("{}")
    return paths


def train_here(cwd, out, *overrides):
    """tools/train.py with a bare config name, from `cwd` (not the project)."""
    cmd = [sys.executable, TRAIN, *train_args(out, *TINY, *overrides, config="mocov2_pt_digits_1n2c.yaml")]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, describe(proc)
    return proc


# Catches: list_images refusing folders without classes, missing images below depth 1, or counting
# hidden files and non-images (the log names how many images the run trains on).
@pytest.mark.parametrize("layout", [flat, deep], ids=["flat", "deep"])
def test_unlabelled_folder_trains(tmp_path, layout):
    layout(tmp_path / "photos")
    out = tmp_path / "run"
    train_here(tmp_path, out, f"Data.Train.dataset.root={tmp_path / 'photos'}")
    assert "training MoCo: 16 images" in (out / "train.log").read_text()
    assert (out / "latest").read_text().strip() == "step_3"


# Catches: a pretraining list file refused for lines without a label.
def test_list_file_of_bare_paths_trains(tmp_path):
    root = tmp_path / "photos"
    paths = deep(root)
    list_path = tmp_path / "train_list.txt"
    list_path.write_text("".join(f"{os.path.relpath(p, root)}\n" for p in paths))
    out = tmp_path / "run"
    train_here(tmp_path, out, "Data.Train.dataset.root=null", f"Data.Train.dataset.image_root={root}",
               f"Data.Train.dataset.cls_label_path={list_path}")
    assert "training MoCo: 16 images" in (out / "train.log").read_text()
    assert (out / "step_3" / "model.pdparams").is_file()


# Catches: Data.Eval=null needed beside Engine.eval_freq=-1 to switch the kNN monitor off, and a flat
# folder with the monitor on failing with a bare "no class subfolders" that does not say why.
def test_a_flat_folder_needs_only_the_monitor_off(tmp_path):
    flat(tmp_path / "photos")
    with_eval = [o for o in TINY if o != "Data.Eval=null"]
    cmd = [sys.executable, TRAIN, *train_args(tmp_path / "monitored", *with_eval,
                                              f"Data.Train.dataset.root={tmp_path / 'photos'}",
                                              "Engine.eval_freq=20", config="mocov2_pt_digits_1n2c.yaml")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, describe(proc)
    (line,) = proc.stderr.strip().splitlines()
    assert f"dataset folder {tmp_path / 'photos'} has no class subfolders" in line
    assert "memory bank is the labelled training images" in line and "set Engine.eval_freq=-1" in line
    out = tmp_path / "run"
    cmd = [sys.executable, TRAIN, *train_args(out, *with_eval, f"Data.Train.dataset.root={tmp_path / 'photos'}",
                                              "Engine.eval_freq=-1", config="mocov2_pt_digits_1n2c.yaml")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, describe(proc)
    assert (out / "latest").read_text().strip() == "step_3"
