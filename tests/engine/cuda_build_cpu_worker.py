"""Run under `paddle.distributed.launch --nproc_per_node 2`: Global.device=cpu set up by setup_environment
in a simulated CUDA build of Paddle, launched as on a GPU machine, then a few data-parallel SGD steps.

The simulation: Paddle reports being built with CUDA, and PADDLE_DISTRI_BACKEND is unset (the launcher
sets gloo only where it finds no GPU). Writes rank<r>.json: backend, default device, final weights.
"""
import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.base import core

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from ppmoco.distributed import all_reduce_mean  # noqa: E402
from ppmoco.engine.env import setup_environment  # noqa: E402

out_dir = sys.argv[1]
core.is_compiled_with_cuda = lambda: True
core.get_cuda_device_count = lambda: 0  # paddle.seed seeds every GPU of a CUDA build: none to seed here
os.environ.pop("PADDLE_DISTRI_BACKEND", None)
os.environ["FLAGS_selected_gpus"] = os.environ["PADDLE_TRAINER_ID"]
run_env = setup_environment({"device": "cpu", "flags": {}, "num_threads": 1, "seed": 0}, {})

model = paddle.nn.Linear(4, 1)
optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
rng = np.random.default_rng(run_env.rank)  # each rank its own data: the steps agree only through the all-reduce
for _ in range(5):
    x = paddle.to_tensor(rng.standard_normal((8, 4)).astype("float32"))
    loss = ((model(x) - x.sum(axis=1, keepdim=True)) ** 2).mean()
    loss.backward()
    all_reduce_mean([p.grad for p in model.parameters()])
    optimizer.step()
    optimizer.clear_grad()
with open(os.path.join(out_dir, f"rank{run_env.rank}.json"), "w") as f:
    json.dump({"backend": dist.get_backend(), "device": paddle.get_device(), "env_device": run_env.device,
               "weight": model.weight.numpy().tolist(), "place": str(model.weight.place)}, f)
