import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))


@pytest.mark.slow
def test_padded_distributed_split_counts_each_sample_once(tmp_path):
    from dist_eval_worker import LABELS, LOGITS

    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "logs"), os.path.join(ROOT, "tests", "eval", "dist_eval_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        np.testing.assert_array_equal(np.array(got["logits"], dtype="float32"), LOGITS)
        assert got["labels"] == LABELS.tolist()
        assert got["metrics"]["top1"] == pytest.approx(100 * 4 / 7)
        assert got["metrics"]["top5"] == pytest.approx(100 * 6 / 7)
        # Catches a gather in blocks that assembles them out of order (or drops the last block):
        # gathered one row per rank at a time, the result is the same.
        np.testing.assert_array_equal(np.array(got["blocks"]["logits"], dtype="float32"), LOGITS)
        assert got["blocks"]["labels"] == LABELS.tolist()
