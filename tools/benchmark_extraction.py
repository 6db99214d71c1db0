"""Images/s of evaluation feature extraction (global-average-pooled backbone features, as kNN reads them).

    python tools/benchmark_extraction.py --arch resnet50 --size 224 --batch 32 --batches 5 --json out.json

Side by side in one process, on the same synthetic batches and thread count: ppmoco's evaluation fast
path (ppmoco/eval/static_inference.py: a checked oneDNN predictor, float32 and, where the CPU has
bfloat16 units, bfloat16), eager Paddle, and torchvision's ResNet in eval mode under torch.no_grad().
Each batch runs once per contender in turn, so a neighbour's load on shared cores hits all of them
alike; images/s is the batch size over the median time per batch. Numbers are this run's only.
tools/benchmark.py calls bench_extraction().
"""
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
from ppmoco.fileio import write_text_atomic  # noqa: E402


def _nearest_neighbour_agreement(a, b):
    """Share of rows whose cosine nearest neighbour (itself excluded) is the same under features a and b."""
    import numpy as np

    def nearest(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)

    return float(np.mean(nearest(a) == nearest(b)))


def bench_extraction(arch="resnet50", size=224, batch=32, batches=5, threads=None, bfloat16=None, torch=True,
                     seed=0):
    """{images_per_sec: {contender: value}, ratios, build_s, bfloat16 errors, cpu, ...} of extracting the
    features of `batches` synthetic batches of `batch` images of `size` px with a random `arch`.

    `threads`: default all cores; `bfloat16`: None measures it where the CPU has bfloat16 units;
    `torch`: include torchvision's model (same architecture, its own random weights)."""
    import numpy as np
    import paddle

    from ppmoco.engine.env import RunEnv, keep_freed_memory
    from ppmoco.eval import static_inference
    from ppmoco.fast_path import cpu_info, has_bfloat16_units
    from ppmoco.models import build_backbone
    from ppmoco.paddle_internals import set_cpu_threads

    threads = threads or len(os.sched_getaffinity(0))
    keep_freed_memory()  # as every ppmoco run does (ppmoco/engine/env.py)
    set_cpu_threads(threads)
    cpu = cpu_info()
    if bfloat16 is None:
        bfloat16 = has_bfloat16_units(cpu)
    env = RunEnv(device="cpu", world_size=1, rank=0, local_size=1, num_threads=threads)
    paddle.seed(seed)
    net = build_backbone({"name": arch}, "--arch").eval()
    rng = np.random.default_rng(seed)
    data = [rng.standard_normal((batch, 3, size, size), dtype=np.float32) for _ in range(batches)]

    def features(b):
        return {"features": net(b[0])}

    contenders, build_s = {}, {}
    sessions = contextlib.ExitStack()  # the predictors live until the measurement ends
    for precision in ("float32", "bfloat16") if bfloat16 else ("float32",):
        inference = static_inference.StaticInference(net, "auto", precision, {"enable": False}, env)
        sessions.enter_context(inference.session())
        step = inference.wrap("extract_features", features)
        name = "ppmoco_static" + ("_bf16" if precision == "bfloat16" else "")
        started = time.perf_counter()
        step([paddle.to_tensor(data[0])])  # builds and checks the predictor (one eager batch included)
        build_s[name] = time.perf_counter() - started
        if inference.failed:  # it would measure the eager fallback under the predictor's name
            raise SystemExit(f"the {precision} predictor failed its check: {inference.failed}")
        contenders[name] = lambda x, step=step: step([paddle.to_tensor(x)])["features"].numpy()

    def eager(x):
        with paddle.no_grad():
            return net(paddle.to_tensor(x)).numpy()
    contenders["ppmoco_eager"] = eager
    versions = {"paddlepaddle": paddle.__version__}
    if torch:
        import torch as torch_module
        from torch_reference import import_torchvision

        torchvision = import_torchvision()
        torch_module.set_num_threads(threads)
        reference = getattr(torchvision.models, arch)(weights=None).eval()
        reference.fc = torch_module.nn.Identity()  # the pooled features, as ppmoco's backbone gives them

        def torchvision_features(x):
            with torch_module.no_grad():
                return reference(torch_module.from_numpy(x)).numpy()
        contenders["torchvision"] = torchvision_features
        versions.update(torch=torch_module.__version__, torchvision=torchvision.__version__)

    times = {name: [] for name in contenders}
    outputs = {name: [] for name in contenders}
    for name, fn in contenders.items():  # one unmeasured batch each: allocations, oneDNN's kernel caches
        fn(data[0])
    for x in data:
        for name, fn in contenders.items():
            started = time.perf_counter()
            outputs[name].append(fn(x))
            times[name].append(time.perf_counter() - started)
    sessions.close()
    speed = {name: batch / statistics.median(t) for name, t in times.items()}
    ratios = {f"{name}_vs_ppmoco_eager": speed[name] / speed["ppmoco_eager"]
              for name in speed if name != "ppmoco_eager"}
    if torch:
        ratios.update({f"{name}_vs_torchvision": speed[name] / speed["torchvision"]
                       for name in speed if name.startswith("ppmoco_static")})
    result = {"arch": arch, "size": size, "batch": batch, "batches": batches, "threads": threads, "cpu": cpu,
              "versions": versions, "images_per_sec": speed, "ratios": ratios, "build_s": build_s}
    reference_features = np.concatenate(outputs["ppmoco_eager"])
    for name in speed:
        if name.startswith("ppmoco_static"):
            got = np.concatenate(outputs[name])
            result.setdefault("max_abs_error_vs_eager", {})[name] = float(np.abs(got - reference_features).max())
            result.setdefault("max_relative_error_vs_eager", {})[name] = float(
                np.abs(got - reference_features).max() / np.abs(reference_features).max())
    if bfloat16:
        result["bf16_nearest_neighbour_agreement"] = _nearest_neighbour_agreement(
            reference_features, np.concatenate(outputs["ppmoco_static_bf16"]))
    return result


def parse_args(argv):
    p = tool_parser(__doc__)
    p.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=5, help="measured batches per contender")
    p.add_argument("--threads", type=int, default=None, help="default: every core this process may use")
    p.add_argument("--no-bfloat16", action="store_true", help="skip the bfloat16 predictor")
    p.add_argument("--no-torch", action="store_true", help="skip torchvision")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if min(args.size, args.batch, args.batches) < 1:
        p.error("--size, --batch and --batches must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    result = bench_extraction(args.arch, args.size, args.batch, args.batches, args.threads,
                              False if args.no_bfloat16 else None, not args.no_torch)
    print(f"{args.arch} {args.size} px, batch {args.batch}, {result['threads']} thread(s), "
          f"{result['cpu']['model']} ({' '.join(result['cpu']['flags'])})")
    for name, value in result["images_per_sec"].items():
        print(f"  {name:<18} {value:8.2f} images/s")
    for name, value in result["ratios"].items():
        print(f"  {name:<36} {value:6.2f}x")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    run(main)
