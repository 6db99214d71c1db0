"""Measure ppmoco's pretraining step, data pipeline and memory; write JSON and print a table.

    python tools/benchmark.py --preset r18c_32 --steps 20 --json output/bench_r18c_32.json
    python tools/benchmark.py --preset r50_224 --steps 10
    python tools/benchmark.py -c configs/mocov2_pt_digits_1n2c.yaml --steps 20

The step is the one the Engine builds (build_train_step: eager, or the static CPU fast path per
Engine.execution) on synthetic tensors of the config's image size; phases are timed by wrapping
the module's own methods, so nothing here re-implements MoCo.
Warm-up steps are excluded. Numbers are measurements of this run only.
"""
import contextlib
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
from ppmoco.config import load_config, resolve_config_path  # noqa: E402
from ppmoco.fileio import write_text_atomic  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BASE = os.path.join(ROOT, "configs", "mocov2_pt_in1k_1n8c.yaml")
PRESETS = {  # the two configurations of the performance table in the README
    "r50_224": ["Model.model.base_encoder.name=resnet50", "Data.Train.sampler.batch_size=32",
                "Model.model.K=65536", "Model.model.projector.hidden_dim=2048", "Model.model.T=0.2",
                "Data.Train.dataset.transform_ops.0.RandCropImage.size=224"],
    "r18c_32": ["Model.model.base_encoder.name=resnet18", "Model.model.base_encoder.cifar_stem=true",
                "Data.Train.sampler.batch_size=256", "Model.model.K=4096",
                "Model.model.projector.hidden_dim=512", "Model.model.T=0.2",
                "Data.Train.dataset.transform_ops.0.RandCropImage.size=32"],
}
PHASES = ("momentum_update", "encode_keys", "enqueue")


def parse_args(argv):
    p = tool_parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a standard configuration (on top of -c)")
    p.add_argument("-c", "--config", default=BASE, help="YAML config (default: MoCo v2 ImageNet)")
    p.add_argument("-o", "--override", action="append", default=[], help="key.path=value")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--data-samples", type=int, default=64, help="images for the data pipeline measurement")
    p.add_argument("--data-root", default=None,
                   help="folder of class folders of JPEGs (default: synthetic 500x375 JPEGs, ImageNet-like)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def crop_size(cfg):
    for op in cfg["Data"]["Train"]["dataset"].get("transform_ops") or []:
        if "RandCropImage" in op:
            size = op["RandCropImage"]["size"]
            return (size, size) if isinstance(size, int) else tuple(size)
    return (224, 224)


class PhaseTimer:
    """Wraps named module methods to accumulate their wall time (synchronising on GPU)."""

    def __init__(self, module, names, sync):
        self.total = {n: 0.0 for n in names}
        self.sync = sync
        for name in names:
            setattr(module, name, self._timed(name, getattr(module, name)))

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.total[name] += time.perf_counter() - start
            return out
        return wrapper

    def reset(self):
        self.total = dict.fromkeys(self.total, 0.0)


def bench_step(cfg, env, steps, warmup):
    import numpy as np
    import paddle

    from ppmoco.engine.step import build_train_step
    from ppmoco.modules import build_module

    module = build_module(cfg["Model"])
    batch_size = cfg["Data"]["Train"]["sampler"]["batch_size"]
    module.setup(batch_size * env.world_size)
    module.train()
    step = build_train_step(cfg["Engine"], cfg["Optimizer"], module, 0.03, env)
    static = step.execution != "eager"
    sync = paddle.device.synchronize if env.device == "gpu" else (lambda: None)
    # A static program runs the key forward and the optimizer inside it: only the eager hooks
    # around it can be timed on their own.
    names = [n for n in PHASES if hasattr(module, n) and not (static and n == "encode_keys")]
    phases = PhaseTimer(module, names, sync)
    opt_timer = PhaseTimer(step.optimizer, ["step"], sync)
    rng = np.random.default_rng(0)
    h, w = crop_size(cfg)
    views = [paddle.to_tensor(rng.standard_normal((batch_size, 3, h, w)).astype("float32")) for _ in range(2)]
    labels = paddle.zeros([batch_size], dtype="int64")
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            phases.reset()
            opt_timer.reset()
        sync()
        start = time.perf_counter()
        out = step([*views, labels])
        float(out["loss"])  # the host sync a logging step would do
        times.append(time.perf_counter() - start)
    measured = times[warmup:]
    # The first step of the static path builds the program and checks it against an eager step.
    per_step = sum(measured) / steps
    ms = {name: 1000 * t / steps for name, t in phases.total.items()}
    if static:
        ms["program"] = 1000 * per_step - sum(ms.values())  # query fwd+bwd, key fwd, optimizer
    else:
        ms["optimizer"] = 1000 * opt_timer.total["step"] / steps
        ms["key_fwd"] = ms.pop("encode_keys")
        ms["query_fwd_bwd"] = 1000 * per_step - sum(ms.values())
    return {"execution": step.execution, "images_per_sec": batch_size * env.world_size / per_step,
            "ms_per_step": 1000 * per_step,
            "ms_per_step_min": 1000 * min(measured), "first_step_s": times[0], "phases_ms": ms,
            "batch_size": batch_size,
            "image_size": [h, w], "steps": steps, "warmup": warmup}


def synthetic_jpegs(folder, count, size=(500, 375)):
    """`count` smooth random JPEGs of ImageNet's typical size (quality 90) in one class folder."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(folder, "class0"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        img.save(os.path.join(folder, "class0", f"{i:04d}.jpg"), quality=90)
    return folder


def bench_data(cfg, samples, data_root):
    """Decode + augmented views per second in one process (= one loader worker)."""
    import tempfile

    from ppmoco.data import build_dataset

    dataset_cfg = {k: v for k, v in cfg["Data"]["Train"]["dataset"].items()
                   if k not in ("image_root", "cls_label_path", "builtin")}
    with tempfile.TemporaryDirectory() as tmp:
        dataset_cfg["root"] = data_root or synthetic_jpegs(tmp, samples)
        dataset = build_dataset(dataset_cfg, "Data.Train.dataset", 0)
        n = min(samples, len(dataset))
        start = time.perf_counter()
        for i in range(n):
            dataset[i]
        elapsed = time.perf_counter() - start
    return {"images_per_sec_per_worker": n / elapsed, "samples": n, "views": dataset_cfg.get("views", 2),
            "source": data_root or "synthetic 500x375 JPEGs"}


def peak_memory_mb(device):
    import paddle

    if device == "gpu":
        return paddle.device.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    args = parse_args(argv)
    overrides = PRESETS.get(args.preset, []) + args.override
    cfg = load_config(args.config, overrides)
    import paddle

    from ppmoco.engine import setup_environment
    from ppmoco.engine.env import cpu_info

    env = setup_environment(cfg["Global"], cfg["Distributed"])
    config_file = os.path.relpath(resolve_config_path(args.config), ROOT)
    result = {"preset": args.preset, "config": config_file, "overrides": overrides,
              "device": env.device, "threads": env.num_threads, "processes": env.world_size,
              "paddle": paddle.__version__, "cpu": cpu_info(),
              "backbone": cfg["Model"]["model"]["base_encoder"]["name"],
              "K": cfg["Model"]["model"].get("K")}
    result["step"] = bench_step(cfg, env, args.steps, args.warmup)
    result["peak_memory_mb"] = peak_memory_mb(env.device)
    with contextlib.redirect_stdout(sys.stderr):  # keep dataset-building chatter off the table
        result["data"] = bench_data(cfg, args.data_samples, args.data_root)
    result["images_per_sec"] = result["step"]["images_per_sec"]
    if env.is_main:
        print_table(result)
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=1))
            print(f"wrote {args.json}")
    return result


def print_table(r):
    s = r["step"]
    rows = [("configuration", f"{r['preset'] or r['config']}: {r['backbone']}, {s['image_size'][0]} px, "
                               f"batch {s['batch_size']} x {r['processes']}, K {r['K']}"),
            ("device / threads", f"{r['device']} / {r['threads']} per process"),
            ("cpu", f"{r['cpu']['model']} ({', '.join(r['cpu']['flags'])})"),
            ("execution", s["execution"]),
            ("step images/s", f"{s['images_per_sec']:.2f}"),
            ("ms per step (mean / min)", f"{s['ms_per_step']:.1f} / {s['ms_per_step_min']:.1f}"),
            ("first step (build + check)", f"{s['first_step_s']:.1f} s")]
    rows += [(f"  {name}", f"{ms:.1f} ms") for name, ms in s["phases_ms"].items()]
    data = r["data"]
    rows += [("data images/s per worker", f"{data['images_per_sec_per_worker']:.1f} (decode + {data['views']} views)"),
             ("peak memory", f"{r['peak_memory_mb']:.0f} MiB")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    run(main)
