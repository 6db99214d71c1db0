"""Promise 6 through tools/train.py: a bad config is one line naming the key or file with the fix,
exit 2, no traceback unless --debug, and the output folder is left alone."""
import os
import subprocess
import sys

import paddle
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.models import build_backbone  # noqa: E402

from fault_helpers import DIGITS_V2, assert_untouched, assert_user_error, run, run_train, train_cmd  # noqa: E402

# Rejected while the config loads, before Paddle is imported and before anything is written.
AT_LOAD = {
    "unknown_key": ("Engine.save_load.kep_last=2",
                    "Engine.save_load.kep_last: unknown key; did you mean 'Engine.save_load.keep_last'?"),
    "wrong_type": ("Engine.max_steps=many", "Engine.max_steps: expected int, got str 'many'"),
    "wrong_type_lr": ("Optimizer.lr.learning_rate=fast", "Optimizer.lr.learning_rate: 'fast' must be a number > 0"),
    "zero_lr": ("Optimizer.lr.learning_rate=0",
                "Optimizer.lr.learning_rate: 0 must be a number > 0; e.g. -o Optimizer.lr.learning_rate=0.03"),
    "negative_lr": ("Optimizer.lr.learning_rate=-0.1", "Optimizer.lr.learning_rate: -0.1 must be a number > 0"),
    "zero_batch": ("Data.Train.sampler.batch_size=0", "Data.Train.sampler.batch_size: 0 must be > 0; e.g."),
    "negative_batch": ("Data.Train.sampler.batch_size=-8", "Data.Train.sampler.batch_size: -8 must be > 0"),
    "zero_max_steps": ("Engine.max_steps=0", "Engine.max_steps: 0 must be > 0, or -1 for no limit"),
    "negative_momentum": ("Optimizer.momentum=-0.9", "Optimizer.momentum: -0.9 must lie in [0, 1)"),
    "negative_weight_decay": ("Optimizer.weight_decay=-1e-4", "Optimizer.weight_decay: -0.0001 must be >= 0"),
    "negative_workers": ("Data.Train.loader.num_workers=-1", "Data.Train.loader.num_workers: -1 must be >= 0"),
    "negative_seed": ("Global.seed=-1", "Global.seed: -1 must lie in [0, 2**32)"),
    "negative_threads": ("Global.num_threads=-2", "Global.num_threads: -2 must be >= 0"),
    "knn_k_zero": ("Eval.knn.ks=[0,20]", "Eval.knn.ks: [0, 20] must be a non-empty list of ints > 0"),
    "eval_shuffled": ("Data.Eval.sampler.shuffle=true",
                      "Data.Eval.sampler: evaluation visits every sample once; set shuffle: false"),
}


@pytest.mark.parametrize("override, message", AT_LOAD.values(), ids=AT_LOAD.keys())
def test_bad_value_rejected_at_load(tmp_path, override, message):
    out = tmp_path / "run"
    proc = run(train_cmd(out, override), timeout=120)
    assert_user_error(proc, message)
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = run([*train_cmd(tmp_path / "run", "Optimizer.lr.learning_rate=0"), "--debug"], timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = run(train_cmd(tmp_path / "run", config=missing), timeout=120)
    assert_user_error(proc, f"config file not found: {missing}; check the -c path")


def test_misspelt_config_name_lists_the_closest_shipped_configs(tmp_path):
    # Catches: a multi-line or traceback error, and a hint that lists nothing or the wrong names.
    proc = run(train_cmd(tmp_path / "run", config="mocov2_pt_in1k_1n4c.yaml"), timeout=120)
    assert_user_error(proc, "config file not found: mocov2_pt_in1k_1n4c.yaml; check the -c path",
                      "(closest: mocov2_pt_in1k_1n8c.yaml, mocov1_pt_in1k_1n8c.yaml, mocov2_pt_in100_1n8c.yaml)")
    assert not (tmp_path / "run").exists()


def test_bare_config_name_from_another_directory(tmp_path):
    """FleetX's documented `tools/train.py -c mocov2_pt_in1k_1n8c.yaml`, run outside the project:
    the config is found (the error is about the key after it, not a missing file)."""
    # Catches: resolving the name against the working directory.
    cmd = train_cmd(tmp_path / "run", "Engine.save_load.kep_last=2", config="mocov2_pt_in1k_1n8c.yaml")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "Engine.save_load.kep_last: unknown key")


def test_base_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\nGlobal:\n  seed: 1\n")
    (tmp_path / "b.yaml").write_text(f"_base_: [{DIGITS_V2}, a.yaml]\n")
    proc = run(train_cmd(tmp_path / "run", config=tmp_path / "a.yaml"), timeout=120)
    assert_user_error(proc, "_base_ cycle: ", "a.yaml -> ", "b.yaml -> ", "remove one of these _base_ entries")
    assert not (tmp_path / "run").exists()


def test_invalid_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("Global:\n  seed: [1, 2\n")
    proc = run(train_cmd(tmp_path / "run", config=tmp_path / "bad.yaml"), timeout=120)
    assert_user_error(proc, f"{tmp_path / 'bad.yaml'} line ", "invalid YAML")


# Rejected when the module or the Engine is built (Paddle imported, nothing trained or saved).
AT_SETUP = {
    "zero_K": ("Model.model.K=0",
               "Model.model.K: 0 is out of range; it must be > 0 and a multiple of the global batch"),
    "negative_K": ("Model.model.K=-128",
                   "Model.model.K: -128 is out of range; it must be > 0 and a multiple of the global batch"),
    "wrong_type_K": ("Model.model.K=lots", "Model.model.K: expected int"),
    "K_not_multiple": ("Model.model.K=100", "Model.model.K: 100 must be a multiple of the global batch size 32 "
                       "(batch_size x processes); e.g. K=96"),
    "K_below_batch": ("Model.model.K=16", "Model.model.K: 16 must be a multiple of the global batch size 32 "
                      "(batch_size x processes); e.g. K=32"),
}


@pytest.mark.slow
@pytest.mark.parametrize("override, message", AT_SETUP.values(), ids=AT_SETUP.keys())
def test_bad_value_rejected_at_setup(tmp_path, override, message):
    out = tmp_path / "run"
    proc = run_train(out, override, expect=2, timeout=120)
    assert_user_error(proc, message)
    assert_untouched(out)


@pytest.mark.slow
def test_missing_pretrained_file(tmp_path):
    missing = tmp_path / "weights" / "moco_r18"
    out = tmp_path / "run"
    proc = run_train(out, f"Model.model.base_encoder.pretrained={missing}", expect=2, timeout=120)
    assert_user_error(proc, f"Model.model.base_encoder.pretrained: no weights at {missing} or {missing}.pdparams",
                      "fix the path, or set Model.model.base_encoder.pretrained to null")
    assert_untouched(out)


@pytest.mark.slow
def test_pretrained_weights_of_another_architecture(tmp_path):
    other = build_backbone({"name": "resnet18", "widths": [4, 8, 8, 8]}, "test")
    path = tmp_path / "other_resnet18.pdparams"
    paddle.save(other.state_dict(), str(path))
    out = tmp_path / "run"
    proc = run_train(out, f"Model.model.base_encoder.pretrained={path}", expect=2, timeout=120)
    assert_user_error(proc, f"Model.model.base_encoder.pretrained: {path} (ResNet state_dict) does not fit "
                      "the backbone", "shape mismatch", "different architecture (name, widths or cifar_stem)")
    assert_untouched(out)
