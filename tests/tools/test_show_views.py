"""tools/show_views.py draws each training image beside the views training actually sees."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from ppmoco.config import load_config
from ppmoco.data import build_dataset

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml")


def show_views(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "show_views.py"), "-c", CONFIG, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_grid_cells_are_the_image_and_its_denormalised_views(tmp_path):
    out = tmp_path / "views.png"
    proc = show_views("--num", "3", "--size", "40", "--epoch", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (3 * 42 - 2, 3 * 42 - 2, 3)  # 3 rows; image + 2 views; 2-pixel gaps

    # Independent recomputation of row 0's views: the dataset's own sample of epoch 1, undone with
    # the config's mean/std (catches: no de-normalisation, another epoch's views, one view twice).
    cfg = load_config(CONFIG)
    dataset = build_dataset(cfg["Data"]["Train"]["dataset"], "Data.Train.dataset", cfg["Global"]["seed"])
    dataset.set_epoch(1)
    normalize = next(op["NormalizeImage"] for op in cfg["Data"]["Train"]["dataset"]["transform_ops"]
                     if "NormalizeImage" in op)
    mean, std = np.array(normalize["mean"]), np.array(normalize["std"])
    for column, view in enumerate(dataset[0][:2], start=1):
        pixels = np.clip(np.round((view.transpose(1, 2, 0) * std + mean) * 255), 0, 255).astype(np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((40, 40), Image.NEAREST))
        np.testing.assert_array_equal(grid[:40, column * 42:column * 42 + 40], expected)


def test_bad_arguments_are_one_line_errors():
    proc = show_views("--num", "0")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --num must be >= 1, --size >= 8 and --epoch >= 0"]
