"""Run under `paddle.distributed.launch --nproc_per_node 2`: ppmoco's MoCo steps on two ranks, each
step from the state a test saved (the float64 PyTorch reference's), each rank on its half of the
batch; every rank writes its state and loss after each step (tests/engine/test_moco_reference_2proc.py).
"""
import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.abspath(os.path.join(HERE, "..", "..")), os.path.abspath(os.path.join(HERE, ".."))]
from moco_equivalence import PpmocoRunner, Setup  # noqa: E402

folder = sys.argv[1]
dist.init_parallel_env()
rank, ranks = dist.get_rank(), dist.get_world_size()
with open(os.path.join(folder, "setup.json"), encoding="utf-8") as f:
    setup = Setup(**json.load(f))
runner = PpmocoRunner(setup)
paddle.seed(123)  # rank 0 draws the reference's shuffle permutations from here, one a step
for step in range(setup.steps):
    given = np.load(os.path.join(folder, f"step{step}.npz"))
    state = {k[len("state/"):]: given[k] for k in given.files if k.startswith("state/")}
    velocity = {k[len("velocity/"):]: given[k] for k in given.files if k.startswith("velocity/")}
    runner.load(state, velocity)
    half = setup.batch // ranks
    loss = runner.step([given[f"view{v}"][rank * half:(rank + 1) * half] for v in (0, 1)])
    np.savez(os.path.join(folder, f"rank{rank}_step{step}.npz"), loss=loss, **runner.state())
