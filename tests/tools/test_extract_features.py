"""tools/extract_features.py writes a split's per-layer features in dataset order."""
import os
import subprocess
import sys

import numpy as np

from ppmoco.config import load_config
from ppmoco.data import build_dataset

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "moco_lincls_digits_1n2c.yaml")


def extract(tmp_path, *args):
    overrides = ["Model.model.base_encoder.pretrained=null", f"Engine.save_load.output_dir={tmp_path}",
                 "Eval.svm.layers=[feat1,gap]"]
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "-c", CONFIG,
                           *(a for o in overrides for a in ("-o", o)), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_the_file_holds_each_layer_with_labels_and_paths_of_the_split_in_order(tmp_path):
    # Catches labels or paths out of dataset order, a layer missing, and the wrong split written.
    out = tmp_path / "val.npz"
    proc = extract(tmp_path, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    dataset = build_dataset(load_config(CONFIG)["Data"]["Eval"]["dataset"], "Data.Eval.dataset", 0)
    with np.load(out) as saved:
        assert sorted(saved.files) == ["feat1", "gap", "labels", "paths"]
        assert saved["feat1"].shape[0] == saved["gap"].shape[0] == len(dataset)
        assert saved["feat1"].shape[1] % 144 == 0  # 12 x 12 cells per stem channel
        np.testing.assert_array_equal(saved["labels"], dataset.labels)
        assert list(saved["paths"]) == [p for p, _ in dataset.samples]


def test_an_unknown_split_is_one_line(tmp_path):
    # Catches argparse's usage dump instead of the tools' one `error:` line and exit code 2.
    proc = extract(tmp_path, "--out", str(tmp_path / "x.npz"), "--split", "test")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: argument --split")
