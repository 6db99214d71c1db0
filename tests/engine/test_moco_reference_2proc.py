"""ppmoco's MoCo step on two processes equals the PyTorch reference (tests/torch_moco_reference.py).

Two ranks of 4 images compute what one process of 8 computes with two BatchNorm groups: each rank
normalises its queries alone, the key batch is shuffled across ranks, the queue receives the keys
of both ranks in rank order, and the averaged gradients are those of the whole batch's loss. The
reference runs that with bn_splits 2. Each step starts from the float64 reference's state
(tests/moco_equivalence.py says why); tolerances are those of test_moco_reference.py, measured
against float32 PyTorch's own spread.

One quantity differs by design and is left out: BatchNorm running statistics. Each rank updates
its own from its half batch, while the reference's two groups update one set in turn.
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moco_equivalence import Setup, compare, reference_trajectory, update_errors
from optional_deps import torch_or_skip

torch_or_skip()
pytestmark = pytest.mark.slow
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SETUP = Setup(bn_splits=2)  # ResNet-18, ImageNet stem, 64 px, v2 head 512-256-128, batch 8
STATISTICS = ("_mean", "_variance")


def run_two_ranks(folder, setup):
    (folder / "setup.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(setup, bn_splits=1))))
    for i, (start, velocity, views, _, _, _) in enumerate(reference_trajectory(setup)):
        np.savez(folder / f"step{i}.npz", view0=views[0], view1=views[1],
                 **{f"state/{k}": v for k, v in start.items()}, **{f"velocity/{k}": v for k, v in velocity.items()})
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(folder / "logs"), os.path.join(ROOT, "tests", "engine", "dist_reference_worker.py"), str(folder)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text(errors="replace") for p in sorted((folder / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs[-5000:]
    return [[dict(np.load(folder / f"rank{r}_step{i}.npz")) for r in (0, 1)] for i in range(setup.steps)]


# Catches: keys not shuffled across ranks (each rank's BN would see only its own keys), keys
# gathered out of rank order into the queue, gradients summed instead of averaged, and a loss or
# momentum update that differs between one process and two.
def test_two_processes_equal_the_pytorch_reference_with_two_bn_groups(tmp_path):
    ranks = run_two_ranks(tmp_path, SETUP)
    spread = compare(SETUP, "float32")
    for i, ((r0, r1), (start, _, _, _, ref_loss, ref), f32) in enumerate(
            zip(ranks, reference_trajectory(SETUP), spread)):
        where = f"step {i + 1}"
        loss = (float(r0.pop("loss")) + float(r1.pop("loss"))) / 2  # equal halves: the whole batch's mean
        assert abs(loss - ref_loss) / abs(ref_loss) <= 1e-4, f"{where}: loss {loss} vs {ref_loss}"
        shared = [k for k in r0 if not k.endswith(STATISTICS)]
        for key in shared:  # everything but BN statistics is the same on both ranks
            np.testing.assert_array_equal(r0[key], r1[key], err_msg=f"{where}: {key} differs between ranks")
        assert np.abs(r0["queue"] - ref["queue"]).max() <= 1e-4, where
        assert int(r0["queue_ptr"][0]) == int(ref["queue_ptr"][0]), where
        errors = {k: v for k, v in update_errors(start, r0, ref).items() if not k.endswith(STATISTICS)}
        f32_errors = [v for k, v in f32["updates"].items() if not k.endswith(STATISTICS)]
        p90, worst = np.quantile(list(errors.values()), 0.9), max(errors.values())
        assert p90 <= 4 * np.quantile(f32_errors, 0.9) + 1e-2, f"{where}: 90% of updates within {p90:.2g}"
        assert worst <= 4 * max(f32_errors) + 5e-2, f"{where}: {max(errors, key=errors.get)} off by {worst:.2g}"
