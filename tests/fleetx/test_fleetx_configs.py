"""PaddleFleetX's own MoCo config files (v2.4.1, see fleetx_files.py) load, build the same MoCo as
ppmoco's configs, train and evaluate through tools/train.py changed only in data paths, sizes and
device; every FleetX key for what ppmoco does not do is a one-line error naming it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ppmoco.config import load_config
from ppmoco.data.datasets import build_dataset
from ppmoco.data.transforms import ColorJitter, NormalizeImage, RandCropImage
from ppmoco.engine.env import apply_flags
from ppmoco.engine.lr import build_schedule
from ppmoco.errors import ConfigError
from ppmoco.fleetx import module_args

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "faults"))
sys.path.insert(0, os.path.dirname(__file__))
from fleetx_files import NAMES, fleetx_configs, shrink, write_configs  # noqa: E402

from fault_helpers import ROOT, TRAIN, assert_user_error, describe, image_tree  # noqa: E402

V1, V2, LINCLS = NAMES


@pytest.fixture
def fleetx_dir(tmp_path):
    """FleetX's four files exactly as shipped, in FleetX's folder layout."""
    return write_configs(tmp_path / "configs", fleetx_configs())


def load(folder, name, *overrides):
    return load_config(str(folder / name), list(overrides))


# Catches: a FleetX key dropped from the schema (unknown key), or a head mapped wrongly: v2's
# projector out_dim/classifier num_classes swapped, v1 given a hidden layer, the linear classes lost.
def test_fleetx_files_load_and_map_to_ppmoco_arguments(fleetx_dir):
    v2 = load(fleetx_dir, V2)
    assert module_args("MOCOModule", v2["Model"]) == {
        "T": 0.2, "base_encoder": {"name": "resnet50", "with_pool": False, "num_classes": 0},
        "projector": {"hidden_dim": 2048}, "dim": 128}
    v1 = load(fleetx_dir, V1)
    assert module_args("MOCOModule", v1["Model"]) == {
        "base_encoder": {"name": "resnet50", "with_pool": False, "num_classes": 0}, "dim": 128}
    lincls = load(fleetx_dir, LINCLS)
    args = module_args("MOCOClsModule", lincls["Model"])
    assert (args["num_classes"], args["topk"], args["base_encoder"]["pretrained"]) == (
        1000, [1, 5], "./pretrained/mocov2/model")
    # FleetX's values stay FleetX's: its seed, batch keys, lr and epochs.
    assert (v2["Global"]["seed"], v2["Global"]["local_batch_size"], v2["Engine"]["num_train_epochs"]) == (2022, 1, 200)
    assert build_schedule(v2["Optimizer"]["lr"]).unit == "epoch"
    assert build_schedule(v1["Optimizer"]["lr"])(120, 200) == pytest.approx(0.003)


# Catches: ppmoco's reference recipe leaking into a FleetX file (ImageNet mean/std instead of FleetX's
# 0.5, v1's hue 0.1 instead of 0.4, bilinear instead of bicubic) or DecodeImage kept as a pipeline op.
def test_fleetx_augmentation_values_are_honoured(fleetx_dir, tmp_path):
    image_tree(tmp_path / "images")
    cfg = load(fleetx_dir, V1, f"Data.Train.dataset.root={tmp_path / 'images'}")
    ops = build_dataset(cfg["Data"]["Train"]["dataset"], "Data.Train.dataset", 0).transform.ops
    assert [type(op).__name__ for op in ops] == ["RandCropImage", "RandomGrayscale", "ColorJitter",
                                                "RandFlipImage", "NormalizeImage", "ToCHWImage"]
    crop, jitter, normalize = ops[0], ops[2], ops[4]
    assert isinstance(crop, RandCropImage) and (crop.interpolation, crop.backend) == ("bicubic", "pil")
    assert isinstance(jitter, ColorJitter) and jitter.strengths[3] == pytest.approx(0.4)
    assert isinstance(normalize, NormalizeImage)
    np.testing.assert_allclose(normalize.mean, [0.5] * 3)
    np.testing.assert_allclose(normalize.std, [0.5] * 3)
    assert normalize.scale == np.float32(1.0 / 255.0)


# Catches: the translation building a different network than ppmoco's own config for the same recipe
# (FleetX's v2 file and configs/mocov2_pt_in1k_1n8c.yaml give the same module arguments).
def test_fleetx_v2_builds_the_same_moco_as_ppmoco_v2(fleetx_dir):
    ours = load_config(os.path.join(ROOT, "configs", V2))["Model"]
    theirs = load(fleetx_dir, V2)["Model"]
    mine = module_args("MOCOModule", ours)
    fleetx = module_args("MOCOModule", theirs)
    assert {k: v for k, v in mine.items() if k not in ("K", "m", "bn_splits")} == {
        **fleetx, "base_encoder": {"name": "resnet50"}}
    assert (mine["K"], mine["m"], mine["bn_splits"]) == (65536, 0.999, 1)  # FleetX's MoCo defaults


REFUSED = [
    ("Engine.run_mode=step", "Engine.run_mode"),
    ("Engine.accumulate_steps=4", "Engine.accumulate_steps"),
    ("Distributed.mp_degree=2", "Distributed.mp_degree"),
    ("Distributed.pp_degree=2", "Distributed.pp_degree"),
    ("Distributed.sharding.sharding_degree=8", "Distributed.sharding.sharding_degree"),
    ("Model.use_recompute=true", "Model.use_recompute"),
    ("Fused.tensor_fusion=true", "Fused.tensor_fusion"),
    ("Inference.mp_degree=2", "Inference.mp_degree"),
    ("Global.micro_batch_size=4", "Global.micro_batch_size"),
    ("Global.local_batch_size=64", "Global.local_batch_size"),
    ("Global.global_batch_size=100", "Global.global_batch_size"),
    ("Model.loss.train.name=MSELoss", "Model.loss.train.name"),
    ("Engine.unknown_key=1", "Engine.unknown_key"),
    ("Profiler.scheduler=[5,1]", "Profiler.scheduler"),
]


# Catches: a FleetX feature ppmoco lacks silently accepted (the run would not be what the file says),
# and keys unknown to both projects becoming silent.
@pytest.mark.parametrize("override,key", REFUSED, ids=[key for _, key in REFUSED])
def test_what_ppmoco_does_not_do_is_refused_by_key(fleetx_dir, override, key):
    with pytest.raises(ConfigError) as err:
        load(fleetx_dir, V2, override)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


BUILD_REFUSED = [
    (V2, "Model.model.momentum_projector.out_dim=1024", "Model.model.momentum_projector: must mirror"),
    (V2, "Model.model.momentum_encoder.name=resnet18", "Model.model.momentum_encoder: must mirror"),
    (V2, "Model.model.{}_projector.in_dim=512", "Model.model.base_projector.in_dim: 512"),
    (V1, "Model.model.{}_classifier.num_features=512", "Model.model.base_classifier.num_features"),
    (V2, "Model.model.{}_projector.name=Identity", "Model.model.base_projector.name"),
    (V2, "Model.model.dim=64", "Model.model: set FleetX's"),
    (V2, "Model.loss.train.epsilon=0.1", "Model.loss.train.epsilon"),
    (V2, "Model.metric.train.topk=[1]", "Model.metric"),
    (LINCLS, "Model.metric.eval.topk=[1,2]", "Model.metric.eval.topk"),
]


# Catches: a key encoder that is not a copy of the query encoder, head sizes that do not chain, or a
# loss/metric setting ppmoco would not compute, accepted instead of named.
@pytest.mark.parametrize("name,override,message", BUILD_REFUSED, ids=[m for _, _, m in BUILD_REFUSED])
def test_inconsistent_fleetx_model_is_refused(fleetx_dir, name, override, message):
    """`{}` in an override stands for both the base and the momentum part (a mirrored change)."""
    cfg = load(fleetx_dir, name, *{override.format(part) for part in ("base", "momentum")})
    with pytest.raises(ConfigError) as err:
        module_args(cfg["Model"]["module"], cfg["Model"])
    assert str(err.value).startswith(message)


# Catches: FleetX's option spellings (to_rgb, channel_first, backend, lr run_mode) accepted at values
# ppmoco would not honour.
@pytest.mark.parametrize("override,message", [
    ("Data.Train.dataset.transform_ops.0.DecodeImage.to_rgb=false", "transform_ops.0.DecodeImage.to_rgb"),
    ("Data.Train.dataset.transform_ops.0.DecodeImage.channel_first=true", "DecodeImage.channel_first"),
    ("Data.Train.dataset.transform_ops.1.RandCropImage.backend=skimage", "RandCropImage.backend"),
    ("Optimizer.lr.update_unit=step", "Optimizer.lr.run_mode"),
])
def test_fleetx_op_and_schedule_spellings_are_checked(fleetx_dir, tmp_path, override, message):
    image_tree(tmp_path / "images")
    cfg = load(fleetx_dir, V2, f"Data.Train.dataset.root={tmp_path / 'images'}", override)
    with pytest.raises(ConfigError) as err:
        build_dataset(cfg["Data"]["Train"]["dataset"], "Data.Train.dataset", 0)
        build_schedule(cfg["Optimizer"]["lr"])
    assert message in str(err.value)


# Catches: Global.flags ignored (the flag keeps its value), or FleetX's CUDA flags failing a CPU build.
def test_flags_are_set_and_cuda_flags_skipped_on_cpu():
    import paddle

    before = paddle.get_flags(["FLAGS_check_nan_inf"])["FLAGS_check_nan_inf"]
    try:
        skipped = apply_flags({"FLAGS_check_nan_inf": not before, **BASE_FLAGS})
        assert paddle.get_flags(["FLAGS_check_nan_inf"])["FLAGS_check_nan_inf"] is (not before)
    finally:
        paddle.set_flags({"FLAGS_check_nan_inf": before})
    assert skipped == ([] if paddle.device.is_compiled_with_cuda() else sorted(BASE_FLAGS))
    with pytest.raises(ConfigError, match="Global.flags.check_nan_inf"):
        apply_flags({"check_nan_inf": True})


BASE_FLAGS = fleetx_configs()["base.yaml"]["Global"]["flags"]


def run_train(config, cwd, *overrides):
    cmd = [sys.executable, TRAIN, "-c", str(config)]
    for override in overrides:
        cmd += ["-o", override]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def tiny_data(tmp_path):
    """Two classes of 16 images in class folders, with FleetX-style list files of relative paths."""
    root = tmp_path / "ILSVRC2012"
    image_tree(root / "train", per_class=16)
    lines = [f"train/{c}/{i}.png {label}\n" for label, c in enumerate("ab") for i in range(16)]
    (root / "train_list.txt").write_text("".join(lines))
    (root / "val_list.txt").write_text("".join(lines[::2]))
    return {"root": str(root / "train"), "image_root": str(root), "train_list": str(root / "train_list.txt"),
            "val_list": str(root / "val_list.txt"), "num_classes": 2}


@pytest.mark.slow
# Catches: FleetX files that load but do not run (a mapped key the engine or the data pipeline then
# rejects), a pretrained path in FleetX's form (no .pdparams) not found, the linear evaluation not
# evaluating, the profiler window never recorded (no Chrome trace) and global_batch_size unchecked.
def test_fleetx_files_pretrain_and_evaluate(tmp_path, tiny_data):
    trees = {name: shrink(tree, data=tiny_data) for name, tree in fleetx_configs().items()}
    trees[f"moco/{LINCLS}"] = shrink(fleetx_configs()[f"moco/{LINCLS}"], data=tiny_data,
                                     pretrained=str(tmp_path / "v2" / "epoch_1" / "model"))
    folder = write_configs(tmp_path / "ppfleetx" / "configs" / "vis", trees)
    trace_dir = tmp_path / "traces"

    for name, out in ((V1, "v1"), (V2, "v2")):
        overrides = ["Engine.num_train_epochs=1", f"Engine.save_load.output_dir={tmp_path / out}"]
        if name == V2:
            overrides += ["Profiler.enable=true", "Profiler.scheduler=[1,3]", f"Profiler.profiler_log={trace_dir}"]
        proc = run_train(folder / name, tmp_path, *overrides)
        assert proc.returncode == 0, describe(proc)
        assert (tmp_path / out / "epoch_1" / "model.pdparams").is_file()
    traces = list(trace_dir.glob("*.json"))
    assert traces and json.loads(traces[0].read_text())["traceEvents"], os.listdir(trace_dir)

    out = tmp_path / "lincls"
    proc = run_train(folder / LINCLS, tmp_path, "Engine.num_train_epochs=2", f"Engine.save_load.output_dir={out}")
    assert proc.returncode == 0, describe(proc)
    log = (out / "train.log").read_text()
    assert f"backbone tensors from {tmp_path / 'v2' / 'epoch_1' / 'model.pdparams'} (ppmoco MoCo checkpoint)" in log
    assert yaml.safe_load((out / "config.yaml").read_text())["Engine"]["eval_iters"] == 1
    assert log.count("[eval] linear top1=") == 2 and " top5=" in log  # eval_freq 1: after each epoch
    assert (out / "best" / "model.pdparams").is_file()

    proc = run_train(folder / V2, tmp_path, "Global.global_batch_size=16",
                     f"Engine.save_load.output_dir={tmp_path / 'x'}")
    assert_user_error(proc, "Global.global_batch_size: 16", "1 process(es)")
