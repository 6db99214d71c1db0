"""tools/benchmark.py runs on a tiny configuration and writes valid JSON (no speed assertions)."""
import json
import os
import subprocess
import sys

import pytest

from ppmoco.config import load_config
from ppmoco.errors import ConfigError
from ppmoco.host_allocator import find_jemalloc

from optional_deps import bfloat16_units_or_skip, jemalloc_or_skip, torch_or_skip

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402

PHASES = {"momentum_update", "enqueue", "optimizer", "key_fwd", "query_fwd_bwd"}
MOCOV3_PHASES = {"momentum_update", "optimizer", "key_fwd", "query_fwd_bwd"}  # no queue
# (config, overrides): MoCo v2 on the digits, batch 16 and a short queue.
TINY_MOCO = ("mocov2_pt_digits_1n2c.yaml", ["Data.Train.sampler.batch_size=16", "Model.model.K=64"])
# MoCo v3 (LARS) on the digits with a network the PyTorch reference mirrors: ResNet-18 of standard widths with
# the ImageNet stem (16 px: 1x1 maps from layer3 on), batch 8, the config's head (64 out, 256 wide).
TINY_MOCOV3 = ("mocov3_pt_digits_1n2c.yaml", ["Data.Train.sampler.batch_size=8",
                                              "Model.model.base_encoder.widths=[64,128,256,512]",
                                              "Model.model.base_encoder.cifar_stem=false"])


def run_benchmark(tmp_path, *args, env=None, model=TINY_MOCO):
    out = tmp_path / "bench.json"
    config, model_overrides = model
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "-c", os.path.join(ROOT, "configs", config),
           *[arg for o in model_overrides for arg in ("-o", o)], "--steps", "2", "--warmup", "1",
           "--data-samples", "4", "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=None if env is None else dict(os.environ, **env))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_benchmark_measures_each_convolution_in_its_own_process(tmp_path):
    # Measured as on an AVX2-only CPU and with an allocator setting: both recorded and printed.
    result, stdout = run_benchmark(tmp_path, "-o", "Model.model.base_encoder.widths=[4,8,8,8]",
                                   "--convs", "onednn", "paddle", "--data-passes", "2",
                                   env={"ONEDNN_MAX_CPU_ISA": "AVX2", "MALLOC_CONF": "dirty_decay_ms:-1",
                                        "MKL_DEBUG_CPU_TYPE": ""})
    assert result["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"} and ", ONEDNN_MAX_CPU_ISA=AVX2" in stdout
    assert result["allocator"] == {"MALLOC_CONF": "dirty_decay_ms:-1"} and "MALLOC_CONF=dirty_decay_ms:-1" in stdout
    assert list(result["steps"]) == ["eager/onednn", "eager/paddle"]
    for name, step in result["steps"].items():
        assert step["batch_size"] == 16 and step["image_size"] == [16, 16] and step["steps"] == 2
        phases = step["phases_ms"]
        assert set(phases) == PHASES and step["execution"] == "eager"
        # Catches: a child measuring the config's convolution instead of the one it was given, and one that
        # overrode the MKL code path the user chose (empty: MKL's generic code on an AMD CPU).
        assert step["conv"] == name.split("/")[1] and step["mkl_debug_cpu_type"] == ""
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(step["ms_per_step"], rel=1e-6)
        assert step["images_per_sec"] == pytest.approx(16 / (step["ms_per_step"] / 1000), rel=1e-9)
        assert step["first_step_s"] > 0 and step["threads"] == result["threads"]
    # Each step's peak is its own process's (one shared process would report one peak for both).
    peaks = [step["peak_memory_mb"] for step in result["steps"].values()]
    assert min(peaks) > 100 and peaks[0] != peaks[1]
    data = result["data"]
    assert data["samples"] == 4 and len(data["ppmoco"]["passes"]) == 2 and "torchvision" not in data
    assert sorted(data["ppmoco"]["passes"])[0] <= data["ppmoco"]["images_per_sec_per_worker"] \
        <= sorted(data["ppmoco"]["passes"])[-1]
    assert result["ratios"] == {} and result["device"] == "cpu"
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    assert result["cpu"]["model"] and result["cpu"]["model"] in cpuinfo
    assert all(f" {flag}" in cpuinfo for flag in result["cpu"]["flags"])
    assert "step: eager/onednn" in stdout and "data: ppmoco" in stdout


@pytest.mark.slow
def test_benchmark_compares_with_pytorch_and_runs_end_to_end(tmp_path):
    torch_or_skip()
    result, stdout = run_benchmark(tmp_path, "-o", "Model.model.bn_splits=1", "-o",
                                   "Model.model.base_encoder.widths=[64,128,256,512]",
                                   "--compare-torch", "--end-to-end", "1", "--data-passes", "1",
                                   "--extraction", "1")
    ours, reference = result["steps"]["eager"], result["steps"]["pytorch"]
    assert result["isa_limits"] == {} and result["allocator"] == {}  # none set: the defaults
    assert reference["reference"] == {"arch": "resnet18", "cifar_stem": True, "dim": 64, "hidden_dim": 64,
                                      "K": 64, "m": 0.99, "T": 0.2}
    assert reference["threads"] == ours["threads"] and reference["image_size"] == [16, 16]
    # The step runs on ppmoco's allocator as tools/train.py does, the reference on the environment it
    # was given. Catches: the step child not restarted on jemalloc, or the PyTorch child put on it too.
    assert ours["malloc"] == (find_jemalloc() or "the C library's") and reference["malloc"] == "the C library's"
    ratios = result["ratios"]
    # Catches: ratios inverted or taken from another row.
    assert ratios["step_eager_vs_pytorch"] == pytest.approx(ours["images_per_sec"] / reference["images_per_sec"])
    assert ratios["peak_memory_eager_vs_pytorch"] == pytest.approx(ours["peak_memory_mb"] / reference["peak_memory_mb"])
    data = result["data"]
    assert ratios["data_vs_torchvision"] == pytest.approx(data["ppmoco"]["images_per_sec_per_worker"]
                                                          / data["torchvision"]["images_per_sec_per_worker"])
    e2e = result["end_to_end"]
    assert e2e["steps"] == 1 and e2e["workers"] == 1 and e2e["synthetic_images_per_sec"] == ours["images_per_sec"]
    assert e2e["images_per_sec"] == pytest.approx(16 / (e2e["ms_per_step"] / 1000))
    assert ratios["end_to_end_vs_synthetic"] == pytest.approx(e2e["images_per_sec"] / ours["images_per_sec"])
    extraction = result["extraction"]
    # Catches: extraction measured on another model or size than the config's, its ratios not carried over.
    assert (extraction["arch"], extraction["size"], extraction["batch"]) == ("resnet18", 16, 16)
    assert ratios["extraction_ppmoco_static_vs_torchvision"] == extraction["ratios"]["ppmoco_static_vs_torchvision"]
    assert "ratio: step_eager_vs_pytorch" in stdout and "extraction: torchvision" in stdout


@pytest.mark.slow
def test_benchmark_measures_each_precision_in_its_own_process(tmp_path):
    bfloat16_units_or_skip()
    result, stdout = run_benchmark(tmp_path, "-o", "Model.model.base_encoder.widths=[4,8,8,8]",
                                   "--precisions", "float32", "bfloat16")
    # Catches: a child measuring the config's precision instead of the one it was given.
    assert {name: step["conv_dtype"] for name, step in result["steps"].items()} == {
        "eager/float32": "float32", "eager/bfloat16": "bfloat16"}
    assert "onednn convolutions in bfloat16" in stdout


@pytest.mark.slow
def test_benchmark_measures_each_allocator_in_its_own_process(tmp_path):
    torch_or_skip()
    library = jemalloc_or_skip()
    result, stdout = run_benchmark(tmp_path, "-o", "Model.model.bn_splits=1", "-o",
                                   "Model.model.base_encoder.widths=[64,128,256,512]",
                                   "--allocators", "system", "large_blocks", "jemalloc", "--compare-torch",
                                   "--data-passes", "1")
    steps = result["steps"]
    allocators = ("system", "large_blocks", "jemalloc")
    names = [f"{side}/{allocator}" for side in ("eager", "pytorch") for allocator in allocators]
    assert list(steps) == names
    # Catches: a child on another malloc than its name says (ppmoco's step restarting itself on
    # jemalloc under `system`, or PyTorch's not preloaded).
    built = steps["eager/large_blocks"]["malloc"]
    assert built.endswith("/libppmoco_large_blocks.so")
    assert {name: step["malloc"] for name, step in steps.items()} == {
        "eager/system": "the C library's", "eager/large_blocks": built, "eager/jemalloc": library,
        "pytorch/system": "the C library's", "pytorch/large_blocks": built, "pytorch/jemalloc": library}
    # Catches: a ratio taken against the wrong reference row: each ppmoco step against each PyTorch one.
    ratios = result["ratios"]
    for ours in names[:3]:
        for theirs in names[3:]:
            assert ratios[f"step_{ours}_vs_{theirs}"] == pytest.approx(
                steps[ours]["images_per_sec"] / steps[theirs]["images_per_sec"])
            assert ratios[f"peak_memory_{ours}_vs_{theirs}"] == pytest.approx(
                steps[ours]["peak_memory_mb"] / steps[theirs]["peak_memory_mb"])
    assert "step: eager/jemalloc" in stdout and "malloc: libjemalloc" in stdout


@pytest.mark.slow
def test_benchmark_measures_mocov3_against_its_pytorch_step(tmp_path):
    torch_or_skip()
    result, stdout = run_benchmark(tmp_path, "--compare-torch", "--data-passes", "1", model=TINY_MOCOV3)
    ours, reference = result["steps"]["eager"], result["steps"]["pytorch"]
    # Catches: the reference built from other settings than the config's (head, temperature, momentum, the
    # optimizer and its arguments).
    assert reference["reference"] == {
        "arch": "resnet18", "image_size": 16, "stop_grad_conv1": False, "dim": 64, "mlp_dim": 256, "T": 0.2,
        "m": 0.99, "optimizer": {"optimizer": "LARS", "weight_decay": 1e-6, "momentum": 0.9,
                                 "trust_coefficient": 0.001}}
    assert reference["image_size"] == ours["image_size"] == [16, 16] and reference["batch_size"] == 8
    # MoCo v3's phases found on its module: its before_step (the momentum update) and momentum encoder timed.
    # Catches: a phase not wrapped where the step calls it (0 ms, its time counted as the query's).
    phases = ours["phases_ms"]
    assert set(phases) == MOCOV3_PHASES and all(v > 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(ours["ms_per_step"], rel=1e-6)
    assert result["ratios"]["step_eager_vs_pytorch"] == pytest.approx(ours["images_per_sec"]
                                                                      / reference["images_per_sec"])
    assert "torchvision" in result["data"] and result["K"] is None
    assert "batch 8 x 1\n" in stdout and "  key_fwd " in stdout and "enqueue" not in stdout


# The presets' configs and what the PyTorch reference mirrors of them (the v3 ones: the configs' heads).
PRESET_REFERENCES = {
    "r50_224": {"arch": "resnet50", "cifar_stem": False, "dim": 128, "hidden_dim": 2048, "K": 65536, "m": 0.999,
                "T": 0.2},
    "r18c_32": {"arch": "resnet18", "cifar_stem": True, "dim": 128, "hidden_dim": 512, "K": 4096, "m": 0.999,
                "T": 0.2},
    "r50_v3": {"arch": "resnet50", "image_size": 224, "stop_grad_conv1": False, "dim": 256, "mlp_dim": 4096,
               "T": 1.0, "m": 0.99, "optimizer": {"optimizer": "LARS", "weight_decay": 1e-6, "momentum": 0.9,
                                                  "trust_coefficient": 0.001}},
    "vit_small_v3": {"arch": "vit_small", "image_size": 224, "stop_grad_conv1": True, "dim": 256, "mlp_dim": 4096,
                     "T": 0.2, "m": 0.99, "optimizer": {"optimizer": "AdamW", "weight_decay": 0.1,
                                                        "betas": [0.9, 0.999], "eps": 1e-8}},
}
PRESET_BATCH = {"r50_224": 32, "r18c_32": 256, "r50_v3": 32, "vit_small_v3": 32}


@pytest.mark.parametrize("preset", sorted(benchmark.PRESETS))
def test_each_preset_loads_its_config_and_the_reference_mirrors_it(preset):
    # Catches: a preset on another config or batch than docs/performance.md's table, or one the PyTorch
    # reference cannot mirror (found only once a measurement starts).
    args = benchmark.parse_args(["--preset", preset])
    cfg = load_config(args.config, benchmark.config_overrides(args))
    assert cfg["Data"]["Train"]["sampler"]["batch_size"] == PRESET_BATCH[preset]
    assert benchmark.torch_reference_spec(cfg) == PRESET_REFERENCES[preset]


def test_a_preset_applies_its_overrides_on_the_config_given():
    # Catches: -c ignored under --preset, or the preset's overrides put after the command line's.
    config = os.path.join(ROOT, "configs", "mocov3_pt_digits_1n2c.yaml")
    args = benchmark.parse_args(["--preset", "r50_v3", "-c", config, "-o", "Data.Train.sampler.batch_size=4"])
    assert args.config == config
    assert benchmark.config_overrides(args) == ["Data.Train.sampler.batch_size=32", "Data.Train.sampler.batch_size=4"]


# Each MoCo v3 setting the reference (builder.py, main_moco.py on moco-v3's networks) cannot mirror: the
# overrides on TINY_MOCOV3 (or its config) and the key the refusal names.
MOCOV3_REFUSALS = {
    "widths": (["Model.model.base_encoder.widths=[8,16,32,64]"], "Model.model.base_encoder.widths"),
    "cifar_stem": (["Model.model.base_encoder.cifar_stem=true"], "Model.model.base_encoder.cifar_stem"),
    "vit_mini": (["Model.model.base_encoder.name=vit_mini", "Model.model.base_encoder.widths=null",
                  "Model.model.base_encoder.cifar_stem=null"], "Model.model.base_encoder.name: vit_mini"),
    "vit_depth": (["Model.model.base_encoder.name=vit_small", "Model.model.base_encoder.widths=null",
                   "Model.model.base_encoder.cifar_stem=null", "Model.model.base_encoder.depth=6"],
                  "Model.model.base_encoder.depth"),
    "projector_layers": (["Model.model.projector_layers=3"], "Model.model.projector_layers"),
    "predictor_last_bn": (["Model.model.predictor_last_bn=true"], "Model.model.predictor_last_bn"),
    "momentum_optimizer": (["Optimizer.name=Momentum"], "Optimizer.name"),
    "lr_mult": (["Optimizer.lr_mult={predictor: 10}"], "Optimizer.lr_mult"),
}


@pytest.mark.parametrize("case", MOCOV3_REFUSALS)
def test_the_mocov3_reference_refuses_what_it_cannot_mirror(case):
    extra, key = MOCOV3_REFUSALS[case]
    config, model_overrides = TINY_MOCOV3
    cfg = load_config(os.path.join(ROOT, "configs", config), model_overrides + extra)
    with pytest.raises(ConfigError, match="--compare-torch: " + key):
        benchmark.torch_reference_spec(cfg)


def test_the_references_cover_moco_and_mocov3_only():
    cfg = load_config(os.path.join(ROOT, "configs", "moco_lincls_digits_1n2c.yaml"))
    with pytest.raises(ConfigError, match="Model.module: .*MOCOModule or MOCOv3Module"):
        benchmark.torch_reference_spec(cfg)


def test_benchmark_refuses_an_allocator_preloaded_by_hand():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--allocators", "system"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, LD_PRELOAD="/nowhere/libjemalloc.so.2"))
    assert proc.returncode == 2 and "LD_PRELOAD already preloads an allocator" in proc.stderr


def test_benchmark_refuses_a_model_the_reference_cannot_mirror():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "-c",
                           os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml"), "--compare-torch"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Model.model.base_encoder.widths" in proc.stderr


def test_benchmark_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--steps, --data-samples and --data-passes must be >= 1" in proc.stderr


# Catches: the grad-sync benchmark not running both ways under launch, or recording the wrong setting.
@pytest.mark.slow
@pytest.mark.parametrize("sync", ["fused", "dataparallel"])
def test_grad_sync_benchmark_runs_on_two_processes(tmp_path, sync):
    out = tmp_path / "sync.json"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "logs"), os.path.join(ROOT, "tools", "benchmark_grad_sync.py"), "--sync", sync,
           "--arch", "resnet18", "--px", "16", "--batch", "2", "--steps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["sync"], result["processes"], result["batch"]) == (sync, 2, 2)
    assert result["median_step_s"] > 0 and result["cpu"]["model"]
