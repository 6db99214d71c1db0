"""Measure ppmoco's pretraining step, data pipeline, end-to-end rate and memory, next to the PyTorch
references; print a table and write JSON.

    python tools/benchmark.py --preset r50_224 --compare-torch --end-to-end 4 --extraction 3 \
        --json output/bench/r50_224.json
    python tools/benchmark.py --preset r18c_32 --compare-torch
    python tools/benchmark.py --preset r50_v3 --compare-torch --json output/bench/r50_v3.json
    python tools/benchmark.py --preset vit_small_v3 --compare-torch --json output/bench/vit_small_v3.json
    python tools/benchmark.py --preset r50_224 --convs onednn paddle
    python tools/benchmark.py --preset r50_224 --precisions float32 bfloat16
    python tools/benchmark.py --preset r18c_32 --allocators system large_blocks jemalloc --compare-torch
    python tools/benchmark.py -c configs/mocov2_pt_digits_1n2c.yaml --steps 20
    python -m paddle.distributed.launch --nproc_per_node 2 tools/benchmark.py --preset r18c_32 \
        -o Data.Train.sampler.batch_size=128

- Presets (`--preset`, docs/performance.md): `r50_224` and `r18c_32` are MoCo v2
  (configs/mocov2_pt_in1k_1n8c.yaml) on ResNet-50 at 224 px, batch 32, and on the CIFAR-stem ResNet-18
  at 32 px, batch 256; `r50_v3` (configs/mocov3_pt_r50_in1k_2n16c.yaml: LARS) and `vit_small_v3`
  (configs/mocov3_pt_vit_small_in1k_1n8c.yaml: AdamW) are MoCo v3 on ResNet-50 and ViT-S/16 at 224 px,
  batch 32, with the configs' heads (projector and predictor 4096 wide, 256 out; their float16 autocast
  is GPU-only, so on the CPU they compute in float32, as the PyTorch step does). A preset names its
  config, which -c replaces; its overrides come before the command line's.
- Step: the one the Engine builds (build_train_step, with Engine.conv's convolutions) on synthetic
  tensors of the config's image size; phases are timed by wrapping the module's own methods (PHASES),
  so nothing here re-implements MoCo. On one process each Engine.conv of --convs and each precision of
  --precisions runs in a fresh process of its own, and so does, with --compare-torch, the official
  step of the config's method in PyTorch on the same shapes (tools/torch_reference.py: MoCo v2's, or MoCo
  v3's for a MOCOv3Module config, with its optimizer): each reports the peak memory
  (maximum resident set) of its own process. --allocators measures each of those steps once per
  malloc (glibc's as `system`; ppmoco's large-block cache as `large_blocks`; jemalloc with its freed
  pages kept; the last two as the training tools run on them).
  Under paddle.distributed.launch each rank measures in place. Warm-up steps are excluded. Both
  steps run at the learning rate LR whatever the config's schedule says.
- Data: decode + two augmented views per image in this process (= one loader worker), over the
  same files for ppmoco and, with --compare-torch, the official torchvision pipeline of the method
  (MoCo v2's, MoCo v3's), passes alternating between the two. The files: --data-root, else JPEGs cut
  from scikit-learn's two sample photographs at ImageNet's typical 500x375.
- End to end (--end-to-end STEPS): tools/train.py pretraining on those files with loader workers,
  its logged step times after the warm-up, against the synthetic-tensor rate of the same step.
- Evaluation (--extraction BATCHES): feature extraction by the config's ResNet depth (ImageNet
  stem, standard widths) at its image size and batch, on the evaluation fast path, eager, and with
  --compare-torch torchvision's ResNet (tools/benchmark_extraction.py).
Numbers are measurements of this run only; the JSON records the CPU model and flags.
"""
import argparse
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, NamedTuple

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
from ppmoco.config import load_config, resolve_config_path, train_batch_size  # noqa: E402
from ppmoco.errors import ConfigError  # noqa: E402
from ppmoco.fileio import write_text_atomic  # noqa: E402
from ppmoco.host_allocator import (  # noqa: E402
    CHOICE,
    build_large_blocks,
    find_jemalloc,
    library_dirs,
    loaded_allocator,
    preload_environment,
    user_preloads_allocator,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BASE = os.path.join(ROOT, "configs", "mocov2_pt_in1k_1n8c.yaml")
PRESETS = {  # the configurations of docs/performance.md's tables: (config, -o overrides on it)
    "r50_224": (BASE, ["Model.model.base_encoder.name=resnet50", "Data.Train.sampler.batch_size=32",
                       "Model.model.K=65536", "Model.model.projector.hidden_dim=2048", "Model.model.T=0.2",
                       "Data.Train.dataset.transform_ops.0.RandCropImage.size=224"]),
    "r18c_32": (BASE, ["Model.model.base_encoder.name=resnet18", "Model.model.base_encoder.cifar_stem=true",
                       "Data.Train.sampler.batch_size=256", "Model.model.K=4096",
                       "Model.model.projector.hidden_dim=512", "Model.model.T=0.2",
                       "Data.Train.dataset.transform_ops.0.RandCropImage.size=32"]),
    "r50_v3": (os.path.join(ROOT, "configs", "mocov3_pt_r50_in1k_2n16c.yaml"), ["Data.Train.sampler.batch_size=32"]),
    "vit_small_v3": (os.path.join(ROOT, "configs", "mocov3_pt_vit_small_in1k_1n8c.yaml"),
                     ["Data.Train.sampler.batch_size=32"]),
}
# --precisions: the overrides that make the convolutions compute in each.
PRECISIONS = {"float32": ["Engine.mix_precision.enable=false"],
              "bfloat16": ["Engine.mix_precision.enable=true", "Engine.mix_precision.dtype=bfloat16"]}
# Where the step's time goes: each phase with the module's callables that compute it, as attribute paths
# (the first the module has is timed): MoCo v1/v2's own methods; MoCo v3's before_step, which is its momentum
# update, and its momentum encoder, run once per view. The optimizer's update is timed on the optimizer, and
# query_fwd_bwd is the rest of the step: the query forward, the loss and the backward pass.
PHASES = {"momentum_update": ("momentum_update", "before_step"),
          "key_fwd": ("encode_keys", "momentum_encoder.forward"),
          "enqueue": ("enqueue",)}
# Environment variables that cap the instruction set the libraries use, e.g. ONEDNN_MAX_CPU_ISA=AVX2
# with ATEN_CPU_CAPABILITY=avx2 and MKL_ENABLE_INSTRUCTIONS=AVX2 to measure an AVX-512 CPU's kernels
# as on an AVX2-only one (the children inherit them); the JSON records those set.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
# The same for the memory allocator, e.g. LD_PRELOAD=libjemalloc.so.2 with MALLOC_CONF (docs/performance.md).
ALLOCATOR = ("LD_PRELOAD", "MALLOC_CONF")
LR = 0.03  # the step's learning rate, ppmoco's and the reference's


def variables_set(names):
    """{name: value} of the environment variables among `names` that are set."""
    return {name: os.environ[name] for name in names if name in os.environ}


def assignments(variables):
    return ", ".join(f"{name}={value}" for name, value in variables.items())


def parse_args(argv):
    p = tool_parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a standard configuration: its overrides on its config, or on -c's where given")
    p.add_argument("-c", "--config", default=None,
                   help="YAML config (default: the preset's, else MoCo v2 ImageNet)")
    p.add_argument("-o", "--override", action="append", default=[], help="key.path=value")
    p.add_argument("--convs", nargs="+", choices=("auto", "onednn", "paddle"), default=None,
                   help="Engine.conv values to measure (default: the config's); with several, the steps "
                        "are named eager/conv")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="what the convolutions compute in, with each conv (float32; bfloat16: "
                        "Engine.mix_precision bfloat16, CPUs with bfloat16 units); with several, the step "
                        "names end in /precision")
    p.add_argument("--allocators", nargs="+", choices=("system", "large_blocks", "jemalloc"), default=None,
                   help="measure every step on each malloc (default: ppmoco's as the tools choose it, "
                        "PyTorch's on glibc's); with several, the step names end in /allocator")
    p.add_argument("--compare-torch", action="store_true",
                   help="also measure the official MoCo step in PyTorch and the torchvision data pipeline")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--data-samples", type=int, default=64, help="images for the data pipeline measurement")
    p.add_argument("--data-passes", type=int, default=3, help="passes over them per pipeline (median kept)")
    p.add_argument("--data-root", default=None,
                   help="folder of images (class folders or not; default: JPEGs cut from sample photographs)")
    p.add_argument("--end-to-end", type=int, default=0, metavar="STEPS",
                   help="also pretrain STEPS steps (after --warmup) on the data with loader workers")
    p.add_argument("--workers", type=int, default=1, help="loader workers of the end-to-end run")
    p.add_argument("--extraction", type=int, default=0, metavar="BATCHES",
                   help="also measure evaluation feature extraction over BATCHES batches "
                        "(tools/benchmark_extraction.py; torchvision's too with --compare-torch)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", choices=("step", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.data_samples < 1 or args.data_passes < 1 or args.end_to_end < 0:
        p.error("--steps, --data-samples and --data-passes must be >= 1, --warmup and --end-to-end >= 0")
    if args.extraction < 0:
        p.error("--extraction must be >= 0")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    args.config = args.config or (PRESETS[args.preset][0] if args.preset else BASE)
    return args


def random_crop(cfg):
    """The training pipeline's RandCropImage arguments (None without one)."""
    return next((op["RandCropImage"] for op in cfg["Data"]["Train"]["dataset"].get("transform_ops") or []
                 if "RandCropImage" in op), None)


def crop_size(cfg):
    crop = random_crop(cfg)
    if crop is None:
        return (224, 224)
    size = crop["size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def attribute(obj, path):
    """obj.a.b for `path` "a.b", or None where there is no such attribute."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


class PhaseTimer:
    """Wraps callables of an object to accumulate their wall time per phase (synchronising on GPU).
    `phases` is {phase: its callable's attribute path on `obj` ("name" or "sublayer.name")}."""

    def __init__(self, obj, phases, sync):
        self.total = dict.fromkeys(phases, 0.0)
        self.sync = sync
        for phase, path in phases.items():
            owner, _, name = path.rpartition(".")
            owner = attribute(obj, owner) if owner else obj
            setattr(owner, name, self._timed(phase, getattr(owner, name)))

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
    step = build_train_step(cfg["Engine"], cfg["Optimizer"], module, LR, env)
    sync = paddle.device.synchronize if env.device == "gpu" else (lambda: None)
    found = {phase: next((path for path in paths if attribute(module, path) is not None), None)
             for phase, paths in PHASES.items()}
    phases = PhaseTimer(module, {phase: path for phase, path in found.items() if path}, sync)
    opt_timer = PhaseTimer(step.optimizer, {"optimizer": "step"}, sync)
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
    per_step = sum(measured) / steps
    ms = {phase: 1000 * t / steps for phase, t in {**phases.total, **opt_timer.total}.items()}
    ms["query_fwd_bwd"] = 1000 * per_step - sum(ms.values())
    return {"execution": "eager", "conv": step.conv, "conv_dtype": step.conv_dtype,
            "images_per_sec": batch_size * env.world_size / per_step,
            "ms_per_step": 1000 * per_step,
            "ms_per_step_min": 1000 * min(measured), "first_step_s": times[0], "phases_ms": ms,
            "batch_size": batch_size,
            "image_size": [h, w], "steps": steps, "warmup": warmup}


def sample_photos(folder, count, size=(500, 375)):
    """`count` JPEGs (quality 90) of ImageNet's typical size cut from scikit-learn's two sample
    photographs (random position, scale and mirror): real photo content, shipped with a dependency."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        w = int(photo.width * rng.uniform(0.6, 1.0))
        h = min(photo.height, int(w * size[1] / size[0]))
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        img = photo.resize(size, Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
    return folder


def bench_data(cfg, root, samples, passes, compare_torch):
    """Images (decode + augmented views) per second in one process (= one loader worker): ppmoco's
    dataset and, with `compare_torch`, main_moco.py's torchvision pipeline on the same files, each
    pass over the files alternating between the two; the median pass of each."""
    import statistics

    from ppmoco.data import build_dataset

    dataset_cfg = {k: v for k, v in cfg["Data"]["Train"]["dataset"].items()
                   if k not in ("image_root", "cls_label_path", "builtin")}
    dataset_cfg["root"] = root
    dataset = build_dataset(dataset_cfg, "Data.Train.dataset", 0)
    n = min(samples, len(dataset))
    paths = [path for path, _ in dataset.samples[:n]]
    pipelines = {"ppmoco": dataset.__getitem__}
    if compare_torch:
        torchvision_views = TORCH_REFERENCES[cfg["Model"]["module"]].views(cfg)
        pipelines["torchvision"] = lambda i: torchvision_views(paths[i])
    rates = {name: [] for name in pipelines}
    for _ in range(passes):
        for name, load in pipelines.items():
            start = time.perf_counter()
            for i in range(n):
                load(i)
            rates[name].append(n / (time.perf_counter() - start))
    out = {name: {"images_per_sec_per_worker": statistics.median(r), "passes": r} for name, r in rates.items()}
    out.update(samples=n, views=dataset_cfg.get("views", 2), source=root)
    if compare_torch:
        out["ratio_vs_torchvision"] = (out["ppmoco"]["images_per_sec_per_worker"]
                                       / out["torchvision"]["images_per_sec_per_worker"])
    return out


STANDARD_WIDTHS = [64, 128, 256, 512]  # torchvision's ResNets' (a literal: the PyTorch child imports no Paddle)


def moco_reference_spec(cfg):
    """TorchMoCo's arguments for a MOCOModule config, or a ConfigError naming what it cannot mirror."""
    model = cfg["Model"]["model"]
    encoder = model["base_encoder"]
    if encoder["name"] not in ("resnet18", "resnet50"):
        raise ConfigError(f"--compare-torch: Model.model.base_encoder.name: {encoder['name']} has no reference; "
                          "use resnet18 or resnet50")
    if list(encoder.get("widths") or STANDARD_WIDTHS) != STANDARD_WIDTHS:
        raise ConfigError("--compare-torch: Model.model.base_encoder.widths: torchvision's ResNet has the "
                          "standard widths only; drop the override")
    if model.get("bn_splits", 1) != 1:
        raise ConfigError("--compare-torch: Model.model.bn_splits: the reference runs one BN group; set 1")
    return {"arch": encoder["name"], "cifar_stem": bool(encoder.get("cifar_stem")), "dim": model["dim"],
            "hidden_dim": (model.get("projector") or {}).get("hidden_dim"), "K": model["K"], "m": model["m"],
            "T": model["T"]}


def mocov3_reference_spec(cfg):
    """The MoCo v3 reference's arguments for a MOCOv3Module config (TorchMoCoV3's network and head sizes,
    the momentum, torch_mocov3_step's optimizer), or a ConfigError naming what it cannot mirror."""
    from ppmoco.optimizers import settings

    model = cfg["Model"]["model"]
    encoder = model["base_encoder"]
    name = encoder["name"]
    vit = name == "vit_small"
    if name not in ("resnet18", "resnet50", "vit_small"):
        raise ConfigError(f"--compare-torch: Model.model.base_encoder.name: {name} has no MoCo v3 reference; use "
                          "resnet18, resnet50 or vit_small")
    if not vit and list(encoder.get("widths") or STANDARD_WIDTHS) != STANDARD_WIDTHS:
        raise ConfigError("--compare-torch: Model.model.base_encoder.widths: torchvision's ResNet has the "
                          "standard widths only; drop the override")
    if encoder.get("cifar_stem"):
        raise ConfigError("--compare-torch: Model.model.base_encoder.cifar_stem: moco-v3's ResNet has the ImageNet "
                          "stem; set false")
    if vit:
        from torch_reference import VIT_SMALL

        for key, value in VIT_SMALL.items():
            if encoder.get(key) not in (None, value):
                raise ConfigError(f"--compare-torch: Model.model.base_encoder.{key}: {encoder[key]}; the reference is "
                                  f"vits.py's vit_small ({key} {value}); drop the override")
    for key, builder in (("projector_layers", 3 if vit else 2), ("predictor_last_bn", vit)):
        if model.get(key) not in (None, builder):
            raise ConfigError(f"--compare-torch: Model.model.{key}: {model[key]}; builder.py's "
                              f"MoCo_{'ViT' if vit else 'ResNet'} has {builder}; set null")
    for key in ("dim", "mlp_dim", "T", "m"):
        if model.get(key) is None:
            raise ConfigError(f"--compare-torch: Model.model.{key} is not set; the reference needs its value: set it")
    optimizer, values = settings(cfg["Optimizer"])
    if optimizer not in ("LARS", "AdamW"):
        raise ConfigError(f"--compare-torch: Optimizer.name: {optimizer}; main_moco.py trains MoCo v3 with LARS or "
                          "AdamW: set one of them")
    for key in ("exclude_from_weight_decay", "lr_mult"):
        if cfg["Optimizer"].get(key):
            raise ConfigError(f"--compare-torch: Optimizer.{key}: main_moco.py's optimizer treats every parameter "
                              "alike; drop it")
    if optimizer == "LARS":
        args = {"momentum": values["momentum"], "trust_coefficient": values["trust_coefficient"]}
    else:
        args = {"betas": [values["beta1"], values["beta2"]], "eps": values["epsilon"]}
    return {"arch": name, "image_size": crop_size(cfg)[0], "stop_grad_conv1": bool(encoder.get("stop_grad_conv1")),
            "dim": model["dim"], "mlp_dim": model["mlp_dim"], "T": model["T"], "m": model["m"],
            "optimizer": {"optimizer": optimizer, "weight_decay": values["weight_decay"], **args}}


def moco_torch_step(spec, cfg):
    from torch_reference import TorchMoCo, torch_moco_step

    return torch_moco_step(TorchMoCo(**spec), lr=LR, momentum=cfg["Optimizer"]["momentum"],
                           weight_decay=cfg["Optimizer"]["weight_decay"])


def mocov3_torch_step(spec, cfg):
    from torch_reference import TorchMoCoV3, backbone_factory, torch_mocov3_step

    model = TorchMoCoV3(backbone_factory(spec["arch"], spec["image_size"], spec["stop_grad_conv1"]), spec["dim"],
                        spec["mlp_dim"], spec["T"])
    return torch_mocov3_step(model, spec["m"], lr=LR, **spec["optimizer"])


def moco_torch_views(cfg):
    from torch_reference import moco_v2_views

    return moco_v2_views(crop_size(cfg)[0])


def mocov3_torch_views(cfg):
    from torch_reference import moco_v3_views

    crop = random_crop(cfg) or {}  # the crop's smallest area as --crop-min; unset, both default to 0.08
    return moco_v3_views(crop_size(cfg)[0], **({"crop_min": crop["scale"][0]} if "scale" in crop else {}))


class TorchReference(NamedTuple):
    """A method's PyTorch reference (tools/torch_reference.py): `spec(cfg)` what it mirrors of a config
    (a ConfigError where it cannot), `step(spec, cfg)` its step(view1, view2) -> loss, `views(cfg)` its
    data pipeline at the config's crop (path -> [view, view])."""

    spec: Callable
    step: Callable
    views: Callable


TORCH_REFERENCES = {"MOCOModule": TorchReference(moco_reference_spec, moco_torch_step, moco_torch_views),
                    "MOCOv3Module": TorchReference(mocov3_reference_spec, mocov3_torch_step, mocov3_torch_views)}


def torch_reference_spec(cfg):
    """The PyTorch reference's arguments for the config's model, or a ConfigError naming what it cannot mirror."""
    module = cfg["Model"]["module"]
    if module not in TORCH_REFERENCES:
        raise ConfigError(f"--compare-torch: Model.module: the PyTorch references are MoCo's and MoCo v3's steps; "
                          f"{module} has none: benchmark a {' or '.join(TORCH_REFERENCES)} config")
    return TORCH_REFERENCES[module].spec(cfg)


def bench_torch_step(cfg, threads, steps, warmup):
    """The official step in PyTorch (tools/torch_reference.py) on synthetic tensors of the config's shapes."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    spec = torch_reference_spec(cfg)
    step = TORCH_REFERENCES[cfg["Model"]["module"]].step(spec, cfg)
    batch_size = cfg["Data"]["Train"]["sampler"]["batch_size"]
    rng = np.random.default_rng(0)
    h, w = crop_size(cfg)
    views = [torch.from_numpy(rng.standard_normal((batch_size, 3, h, w)).astype("float32")) for _ in range(2)]
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        step(*views)
        times.append(time.perf_counter() - start)
    measured = times[warmup:]
    per_step = sum(measured) / steps
    return {"execution": "pytorch", "torch": torch.__version__, "threads": threads, "reference": spec,
            "images_per_sec": batch_size / per_step, "ms_per_step": 1000 * per_step,
            "ms_per_step_min": 1000 * min(measured), "first_step_s": times[0], "batch_size": batch_size,
            "image_size": [h, w], "steps": steps, "warmup": warmup}


def config_overrides(args):
    """The -o overrides this invocation measures: the preset's, then the command line's."""
    return (PRESETS[args.preset][1] if args.preset else []) + args.override


def with_overrides(cmd, overrides):
    return cmd + [arg for o in overrides for arg in ("-o", o)]


def child_command(args, child, extra=()):
    return with_overrides([sys.executable, os.path.abspath(__file__), "-c", args.config, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--child", child, *extra], config_overrides(args))


def run_measured(cmd, what, env=None):
    """Run `cmd` to its end; (its stdout, the peak resident memory of its own process in MiB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{what} failed (exit {proc.returncode}): {err.read()[-3000:]}")
        return out.read(), usage.ru_maxrss / 1024  # Linux reports KiB


def allocator_environment(allocator):
    """The environment a step child runs in on `allocator` (None: this process's own)."""
    if allocator is None:
        return None
    if user_preloads_allocator(os.environ):
        raise ConfigError("--allocators: LD_PRELOAD already preloads an allocator; unset it or drop --allocators")
    if allocator == "system":
        return {**os.environ, CHOICE: "system"}
    if allocator == "large_blocks":
        return {**preload_environment(os.environ, build_large_blocks(os.environ)), CHOICE: allocator}
    library = find_jemalloc()
    if library is None:
        raise ConfigError(f"--allocators jemalloc: no jemalloc library in {', '.join(library_dirs())}; install it "
                          "(apt install libjemalloc2, conda install jemalloc) or drop jemalloc")
    return {**preload_environment(os.environ, library), CHOICE: "jemalloc"}


def measure_in_child(args, child, conv=None, precision=None, threads=None, allocator=None):
    """A step measurement in a fresh process: its result with the peak memory of that process."""
    overrides = ([] if conv is None else [f"Engine.conv={conv}"]) + PRECISIONS.get(precision, [])
    extra = with_overrides([] if threads is None else ["--threads", str(threads)], overrides)
    stdout, peak_mb = run_measured(child_command(args, child, extra), f"the {child} step",
                                   allocator_environment(allocator))
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_memory_mb"] = peak_mb
    return result


def end_to_end(args, cfg, root, threads):
    """tools/train.py on `root` with --workers loader workers; the mean logged step after --warmup."""
    steps = args.warmup + args.end_to_end
    with tempfile.TemporaryDirectory() as out:
        cmd = with_overrides([sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", args.config],
                             config_overrides(args) + [
                                 f"Data.Train.dataset.root={root}", f"Data.Train.loader.num_workers={args.workers}",
                                 f"Engine.save_load.output_dir={out}", f"Engine.max_steps={steps}",
                                 "Engine.logging_freq=1", "Engine.eval_freq=-1", "Data.Eval=null",
                                 "Engine.save_load.save_epoch=0", f"Engine.num_train_epochs={steps}",
                                 f"Global.num_threads={threads}"])
        _, peak_mb = run_measured(cmd, "the end-to-end run (tools/train.py)")
        with open(os.path.join(out, "train.log"), encoding="utf-8") as f:
            logged = re.findall(r"batch_cost: ([\d.]+) s, reader_cost: ([\d.]+) s", f.read())
    if len(logged) != steps:
        raise SystemExit(f"the end-to-end run logged {len(logged)} steps, expected {steps}: are there "
                         f"{cfg['Data']['Train']['sampler']['batch_size']} images or more in {root}?")
    measured = [(float(b), float(r)) for b, r in logged[args.warmup:]]
    per_step = sum(b for b, _ in measured) / len(measured)
    return {"images_per_sec": cfg["Data"]["Train"]["sampler"]["batch_size"] / per_step,
            "ms_per_step": 1000 * per_step, "reader_ms_per_step": 1000 * sum(r for _, r in measured) / len(measured),
            "workers": args.workers, "steps": len(measured), "warmup": args.warmup, "source": root,
            "peak_memory_mb": peak_mb}


def peak_memory_mb(device):
    import paddle

    if device == "gpu":
        return paddle.device.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_main(args, cfg):
    """A --child process: one step measurement, as one JSON line on stdout."""
    if args.child == "torch":
        result = bench_torch_step(cfg, args.threads, args.steps, args.warmup)
    else:
        from ppmoco.engine import setup_environment

        env = setup_environment(cfg["Global"], cfg["Distributed"])
        with contextlib.redirect_stdout(sys.stderr):
            result = bench_step(cfg, env, args.steps, args.warmup)
        result["threads"] = env.num_threads
    result["malloc"] = loaded_allocator()
    # What MKL was told of an AMD CPU (set by setup_environment, or empty for MKL's generic code).
    result["mkl_debug_cpu_type"] = os.environ.get("MKL_DEBUG_CPU_TYPE")
    print(json.dumps(result))


def main(argv=None):
    args = parse_args(argv)
    overrides = config_overrides(args)
    cfg = load_config(args.config, overrides)
    sampler = cfg["Data"]["Train"]["sampler"]  # a batch divided among the processes: fixed for those measured
    sampler["batch_size"] = train_batch_size(cfg, int(os.environ.get("PADDLE_TRAINERS_NUM", "1")))
    if args.child:
        return child_main(args, cfg)
    if args.compare_torch:
        torch_reference_spec(cfg)  # a model the reference cannot mirror stops here, before any measurement
    import paddle

    from ppmoco.engine import setup_environment
    from ppmoco.fast_path import cpu_info

    env = setup_environment(cfg["Global"], cfg["Distributed"])
    convs = args.convs or [cfg["Engine"]["conv"]]
    precisions = args.precisions or [None]
    allocators = args.allocators or [None]

    def named(*parts):  # a step's name: its settings where more than one is measured
        return "/".join(part for part, several in parts if several)

    # (step name, conv, precision, allocator) of each measurement
    steps = [(named(("eager", True), (conv, len(convs) > 1), (precision, len(precisions) > 1),
                    (allocator, len(allocators) > 1)), conv, precision, allocator)
             for allocator in allocators for conv in convs for precision in precisions]
    result = {"preset": args.preset, "config": os.path.relpath(resolve_config_path(args.config), ROOT),
              "overrides": overrides, "device": env.device, "threads": env.num_threads,
              "processes": env.world_size, "paddle": paddle.__version__, "cpu": cpu_info(),
              "isa_limits": variables_set(ISA_LIMITS), "allocator": variables_set(ALLOCATOR),
              "backbone": cfg["Model"]["model"]["base_encoder"]["name"], "K": cfg["Model"]["model"].get("K"),
              "steps": {}, "ratios": {}}
    if env.world_size > 1 or env.device == "gpu":  # measured in place: a child would leave the process group
        if len(steps) > 1 or args.allocators or args.compare_torch or args.end_to_end or args.extraction:
            raise ConfigError("--convs or --precisions with several values, --allocators, --compare-torch, "
                              "--end-to-end and --extraction measure one process on the CPU; run them without "
                              "paddle.distributed.launch")
        with contextlib.redirect_stdout(sys.stderr):
            step = bench_step(cfg, env, args.steps, args.warmup)
        step["peak_memory_mb"] = peak_memory_mb(env.device)
        step["malloc"] = loaded_allocator()
        result["steps"][steps[0][0]] = step
    else:
        for name, conv, precision, allocator in steps:
            result["steps"][name] = measure_in_child(args, "step", conv=conv if args.convs else None,
                                                     precision=precision, allocator=allocator)
        if args.compare_torch:
            references = [named(("pytorch", True), (allocator, len(allocators) > 1)) for allocator in allocators]
            for reference, allocator in zip(references, allocators):
                result["steps"][reference] = measure_in_child(args, "torch", threads=env.num_threads,
                                                              allocator=allocator)
            for name, *_ in steps:
                for reference in references:
                    ours, theirs = result["steps"][name], result["steps"][reference]
                    result["ratios"][f"step_{name}_vs_{reference}"] = (ours["images_per_sec"]
                                                                       / theirs["images_per_sec"])
                    result["ratios"][f"peak_memory_{name}_vs_{reference}"] = (ours["peak_memory_mb"]
                                                                              / theirs["peak_memory_mb"])
    with tempfile.TemporaryDirectory() as tmp:
        # The end-to-end run reads every step's batch from one epoch: an epoch boundary (the loader's
        # workers starting again) at every step would be measured as the pipeline's rate.
        batches = args.warmup + args.end_to_end + 1 if args.end_to_end else 0
        root = args.data_root or sample_photos(
            tmp, max(args.data_samples, cfg["Data"]["Train"]["sampler"]["batch_size"] * batches))
        with contextlib.redirect_stdout(sys.stderr):  # keep dataset-building chatter off the table
            result["data"] = bench_data(cfg, root, args.data_samples, args.data_passes, args.compare_torch)
        if args.compare_torch:
            result["ratios"]["data_vs_torchvision"] = result["data"]["ratio_vs_torchvision"]
        if args.end_to_end:
            result["end_to_end"] = e2e = end_to_end(args, cfg, root, env.num_threads)
            synthetic = result["steps"][steps[0][0]]
            e2e["execution"], e2e["synthetic_images_per_sec"] = synthetic["execution"], synthetic["images_per_sec"]
            result["ratios"]["end_to_end_vs_synthetic"] = e2e["images_per_sec"] / synthetic["images_per_sec"]
    if args.extraction:
        from benchmark_extraction import bench_extraction

        h, _ = crop_size(cfg)
        with contextlib.redirect_stdout(sys.stderr):
            result["extraction"] = extraction = bench_extraction(
                result["backbone"], h, cfg["Data"]["Train"]["sampler"]["batch_size"], args.extraction,
                env.num_threads, torch=args.compare_torch)
        result["ratios"].update({f"extraction_{name}": value for name, value in extraction["ratios"].items()})
    if env.is_main:
        print_table(result)
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
            print(f"wrote {args.json}")
    return result


def print_table(r):
    first = next(iter(r["steps"].values()))
    rows = [("configuration", f"{r['preset'] or r['config']}: {r['backbone']}, {first['image_size'][0]} px, "
                               f"batch {first['batch_size']} x {r['processes']}"
                               + ("" if r["K"] is None else f", K {r['K']}")),
            ("device / threads", f"{r['device']} / {r['threads']} per process"),
            ("allocator environment", assignments(r["allocator"]) or "none set"),
            ("cpu", f"{r['cpu']['model']} ({', '.join(r['cpu']['flags'])})"
                    + (f", {assignments(r['isa_limits'])}" if r["isa_limits"] else ""))]
    for name, s in r["steps"].items():
        rows += [(f"step: {name}", f"{s['images_per_sec']:.2f} images/s, {s['ms_per_step']:.1f} ms/step "
                                   f"(min {s['ms_per_step_min']:.1f}), first step {s['first_step_s']:.1f} s, "
                                   f"peak memory {s['peak_memory_mb']:.0f} MiB ({s['execution']}"
                                   + (f", {s['conv']} convolutions" if "conv" in s else "")
                                   + (" in bfloat16" if s.get("conv_dtype") == "bfloat16" else "")
                                   + f"; malloc: {os.path.basename(s['malloc'])})")]
        rows += [(f"  {phase}", f"{ms:.1f} ms") for phase, ms in s.get("phases_ms", {}).items()]
    data = r["data"]
    for name in ("ppmoco", "torchvision"):
        if name in data:
            rows.append((f"data: {name}", f"{data[name]['images_per_sec_per_worker']:.1f} images/s per worker "
                                          f"(decode + {data['views']} views)"))
    for name, value in r.get("extraction", {}).get("images_per_sec", {}).items():
        rows.append((f"extraction: {name}", f"{value:.1f} images/s"))
    if "end_to_end" in r:
        e = r["end_to_end"]
        rows.append(("end to end", f"{e['images_per_sec']:.2f} images/s with {e['workers']} loader worker(s) "
                                   f"(synthetic: {e['synthetic_images_per_sec']:.2f})"))
    rows += [(f"ratio: {name}", f"{value:.2f}") for name, value in r["ratios"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def measures_ppmoco_here(argv):
    """Whether this process measures ppmoco's step itself (a step child, or each rank under the
    launcher), and so runs on ppmoco's preferred allocator as tools/train.py does. The measuring
    parent keeps the environment it was given, which the PyTorch child inherits."""
    child = argv[argv.index("--child") + 1] if "--child" in argv[:-1] else None
    return child == "step" or (child is None and int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1)


if __name__ == "__main__":
    run(main, preferred_allocator=measures_ppmoco_here(sys.argv))
