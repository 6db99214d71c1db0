"""Gradient averaging across processes, measured: ppmoco's fused all-reduce after backward against
paddle.DataParallel (bucketed all-reduce overlapped with backward), on a ResNet classifier step.

    python -m paddle.distributed.launch --nproc_per_node 2 tools/benchmark_grad_sync.py \\
        --sync fused --arch resnet50 --px 64 --batch 16 --json output/grad_sync_fused_r50.json

Run both --sync values alternately, several times (two CPU processes share the machine: single
runs vary by 20%). Rank 0 prints (and with --json writes) the median step time after 3 warm-up steps.
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
from ppmoco.fileio import write_text_atomic  # noqa: E402


def parse(argv):
    parser = tool_parser(__doc__)
    parser.add_argument("--sync", choices=("fused", "dataparallel"), required=True)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="images per process")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    import paddle
    import paddle.distributed as dist

    from ppmoco.distributed import all_reduce_mean
    from ppmoco.fast_path import cpu_info
    from ppmoco.models import build_backbone
    from ppmoco.paddle_internals import set_cpu_threads

    dist.init_parallel_env()
    set_cpu_threads(1)
    paddle.seed(0)
    net = paddle.nn.Sequential(build_backbone({"name": args.arch, "cifar_stem": args.px <= 32}, "--arch"))
    net.add_sublayer("fc", paddle.nn.Linear(net[0].out_dim, 10))
    optimizer = paddle.optimizer.Momentum(0.01, momentum=0.9, parameters=net.parameters())
    model = paddle.DataParallel(net) if args.sync == "dataparallel" else net
    rng = np.random.default_rng(dist.get_rank())
    images = paddle.to_tensor(rng.standard_normal((args.batch, 3, args.px, args.px)).astype("float32"))
    labels = paddle.to_tensor(rng.integers(0, 10, args.batch))
    times = []
    for _ in range(3 + args.steps):
        start = time.perf_counter()
        paddle.nn.functional.cross_entropy(model(images), labels).backward()
        if args.sync == "fused":
            all_reduce_mean([p.grad for p in net.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.clear_grad()
        times.append(time.perf_counter() - start)
    result = {**{k: v for k, v in vars(args).items() if k not in ("json", "debug")},
              "processes": dist.get_world_size(), "median_step_s": float(np.median(times[3:])), "cpu": cpu_info()}
    if dist.get_rank() == 0:
        print(json.dumps(result))
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    run(main)
