import os
import subprocess
import sys

import pytest
import yaml

from ppmoco.config import load_config, merge, parse_value, resolve_config_path, train_batch_size
from ppmoco.errors import ConfigError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def write(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


BASE = {"Model": {"module": "MOCOModule", "model": {"K": 16, "T": 0.2}},
        "Optimizer": {"lr": {"name": "CosineDecay", "learning_rate": 0.03}},
        "Data": {"Train": {"dataset": {"name": "ContrastiveLearningDataset", "root": "x",
                                       "transform_ops": [{"RandCropImage": {"size": 32}},
                                                         {"ToCHWImage": None}]}}}}


@pytest.mark.parametrize("text,value", [("true", True), ("1e-3", 1e-3), ("5E4", 5e4), ("[1, 2]", [1, 2]),
                                        ("null", None), ("0.5", 0.5), ("7", 7), ("abc", "abc"),
                                        ("__import__('os')", "__import__('os')")])
def test_values_are_typed_by_yaml(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "Model": {"model": {"T": 0.07}},
                                            "Data": {"Train": {"dataset": {"transform_ops": [{"ToCHWImage": None}]}}}})
    cfg = load_config(child)
    assert cfg["Model"]["model"] == {"K": 16, "T": 0.07}
    assert cfg["Data"]["Train"]["dataset"]["transform_ops"] == [{"ToCHWImage": None}]
    assert cfg["Data"]["Train"]["dataset"]["root"] == "x"
    assert cfg["Engine"]["save_load"]["keep_last"] == 3  # defaults filled in
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_overrides_with_list_index_and_typing(tmp_path):
    path = write(tmp_path / "c.yaml", BASE)
    cfg = load_config(path, ["Data.Train.dataset.transform_ops.0.RandCropImage.size=96",
                             "Optimizer.lr.learning_rate=1e-3", "Engine.save_load.auto_resume=true",
                             "Model.model.base_encoder.pretrained=./pretrained/moco/mocov2_pt_imagenet2012_resnet50",
                             "Engine.num_train_epochs=200"])
    assert cfg["Data"]["Train"]["dataset"]["transform_ops"][0] == {"RandCropImage": {"size": 96}}
    assert cfg["Optimizer"]["lr"]["learning_rate"] == 1e-3
    assert cfg["Engine"]["save_load"]["auto_resume"] is True
    assert cfg["Engine"]["num_train_epochs"] == 200
    assert cfg["Model"]["model"]["base_encoder"]["pretrained"].endswith("resnet50")


@pytest.mark.parametrize("override,message", [
    ("Engine.num_train_epoch=3", r"Engine.num_train_epoch: unknown key; did you mean 'Engine.num_train_epochs'\?"),
    ("Engine.save_load.keep_lst=1", r"did you mean 'Engine.save_load.keep_last'"),
    ("Engine.num_train_epochs=abc", r"Engine.num_train_epochs: expected int, got str 'abc'"),
    ("Engine.num_train_epochs=1.5", r"Engine.num_train_epochs: expected int, got float"),
    ("Engine.save_load.auto_resume=1", r"Engine.save_load.auto_resume: expected true/false"),
    ("Global.device=tpu", r"Global.device: 'tpu' is not one of auto, cpu, gpu"),
    ("Engine.conv=mkldnn", r"Engine.conv: 'mkldnn' is not one of auto, onednn, paddle"),
    # every schedule takes it, so it is checked once, here, not by the schedule
    ("Optimizer.lr.learning_rate=-1.0", r"Optimizer.lr.learning_rate: -1.0 must be a number > 0; "
                                        r"e\.g\. -o Optimizer.lr.learning_rate=0.03"),
    ("Data.Train.dataset.transform_ops.5.X=1", r"needs a list index in \[0, 2\)"),
    ("Engine.logging_freq", r"expected key.path=value"),
])
def test_bad_overrides_name_the_key(tmp_path, override, message):
    path = write(tmp_path / "c.yaml", BASE)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_float_key_accepts_int(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", BASE), ["Optimizer.weight_decay=0"])
    assert cfg["Optimizer"]["weight_decay"] == 0


def test_base_cycle_and_missing_files(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="_base_ cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    write(tmp_path / "bad.yaml", "Engine: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml line 1: invalid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_config_names_resolve_to_shipped_configs_from_any_cwd(tmp_path, monkeypatch):
    """-c NAME.yaml and FleetX's ppfleetx/configs/vis/moco/NAME.yaml find configs/NAME.yaml."""
    shipped = load_config(os.path.join(ROOT, "configs", "mocov2_pt_in1k_1n8c.yaml"))
    monkeypatch.chdir(tmp_path)  # nowhere near the project
    # Catches: looking the name up under the working directory instead of the project's configs/.
    assert load_config("mocov2_pt_in1k_1n8c.yaml") == shipped
    # Catches: dropping the fall-back to the file name (FleetX's spelling, configs/NAME from elsewhere).
    assert load_config("ppfleetx/configs/vis/moco/mocov2_pt_in1k_1n8c.yaml") == shipped
    assert load_config("configs/mocov2_pt_in1k_1n8c.yaml") == shipped
    # Catches: only file names looked up in configs/ (a config in a subfolder of configs/ not found).
    assert resolve_config_path("base/digits.yaml") == os.path.join(ROOT, "configs", "base", "digits.yaml")
    # Catches: the benchmark configs reachable only by their path.
    assert resolve_config_path("svm_voc07.yaml") == os.path.join(ROOT, "configs", "benchmarks", "svm_voc07.yaml")
    # Catches: _base_ resolved against the working directory or by name instead of next to its file.
    digits = load_config("mocov2_pt_digits_1n2c.yaml")
    assert digits["Model"]["model"]["base_encoder"]["widths"] == [8, 16, 32, 64]
    # Catches: configs/ searched before an existing path (a user's own file of the same name wins).
    write(tmp_path / "mocov2_pt_in1k_1n8c.yaml", BASE)
    assert load_config("mocov2_pt_in1k_1n8c.yaml")["Model"]["model"]["K"] == 16
    # Catches: an absolute path silently replaced by a shipped config of the same name.
    with pytest.raises(ConfigError, match="config file not found: .*elsewhere/mocov2_pt_in1k_1n8c.yaml"):
        load_config(str(tmp_path / "elsewhere" / "mocov2_pt_in1k_1n8c.yaml"))


def test_shipped_configs_load():
    # configs/base/ holds what the runnable configs inherit, not runs of its own; configs/transfer/
    # holds other frameworks' configs; configs/benchmarks/ holds runnable ones.
    for folder in ("configs", os.path.join("configs", "benchmarks")):
        names = sorted(n for n in os.listdir(os.path.join(ROOT, folder)) if n.endswith(".yaml"))
        assert names, folder
        for name in names:
            cfg = load_config(os.path.join(ROOT, folder, name))
            assert cfg["Model"]["module"], name


def test_train_cli_unknown_key_is_one_line_exit_2(tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c",
         os.path.join(ROOT, "configs", "mocov2_pt_in1k_1n8c.yaml"),
         "-o", f"Engine.save_load.output_dir={out_dir}", "-o", "Engine.save_load.kep_last=2"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: Engine.save_load.kep_last: unknown key; did you mean 'Engine.save_load.keep_last'? "
        "(valid here: output_dir, save_epoch, save_steps, ckpt_dir, keep_last, auto_resume)")
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists()


def test_eval_sampler_must_visit_every_sample_once_when_evaluating(tmp_path):
    digits = os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml")
    for override in ("Data.Eval.sampler.shuffle=true", "Data.Eval.sampler.drop_last=true"):
        with pytest.raises(ConfigError, match=r"^Data.Eval.sampler: evaluation visits every sample once; "
                                              r"set shuffle: false and drop_last: false$"):
            load_config(digits, [override])
    # no evaluation images, no evaluator: the sampler is never used, as before
    path = write(tmp_path / "c.yaml", BASE)
    assert load_config(path, ["Data.Eval.sampler.shuffle=true"])["Data"]["Eval"]["sampler"]["shuffle"] is True


def test_bfloat16_evaluation_is_refused_for_the_linear_protocol():
    # Catches the check looking at the wrong key or protocol (the feature protocols must pass).
    digits = os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml")
    with pytest.raises(ConfigError, match=r"^Eval.precision: bfloat16 applies to the feature protocols \(knn, svm, "
                                          r"lowshot_svm\); the linear protocol's logits stay float32"):
        load_config(digits, ["Eval.precision=bfloat16", "Eval.protocol=linear"])
    assert load_config(digits, ["Eval.precision=bfloat16", "Eval.protocol=knn"])["Eval"]["precision"] == "bfloat16"
    with pytest.raises(ConfigError, match=r"^Eval.precision: "):
        load_config(digits, ["Eval.precision=float16"])


def test_the_removed_static_execution_is_a_one_line_error_and_auto_and_eager_still_load():
    # Configs and checkpoints' config.yaml written when Engine.execution had a static mode still name
    # it; auto and eager stay valid values. Catches: static accepted silently, or auto refused.
    digits = os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml")
    for value in ("auto", "eager"):
        assert load_config(digits, [f"Engine.execution={value}"])["Engine"]["execution"] == value
    with pytest.raises(ConfigError) as err:
        load_config(digits, ["Engine.execution=static"])
    message = str(err.value)
    assert message.startswith("Engine.execution: 'static' is not supported: the static training program was removed")
    assert message.endswith("set Engine.execution: auto or remove the key") and "\n" not in message


def test_cifar10_linear_evaluation_uses_the_seeds_views():
    # main_lincls.py of the MoCo v2 + SupContrast seed: RandomResizedCrop(32) (scale 0.08-1) and flip to
    # train; Resize(36) + CenterCrop(32) to test. Catches: testing on the raw 32 px image.
    cfg = load_config(os.path.join(ROOT, "configs", "moco_lincls_cifar10_1n2c.yaml"))
    train = [next(iter(op)) for op in cfg["Data"]["Train"]["dataset"]["transform_ops"]]
    assert train == ["RandCropImage", "RandFlipImage", "NormalizeImage", "ToCHWImage"]
    crop = cfg["Data"]["Train"]["dataset"]["transform_ops"][0]["RandCropImage"]
    assert crop == {"size": 32}  # RandCropImage's default scale is torchvision's (0.08, 1)
    test = cfg["Data"]["Eval"]["dataset"]["transform_ops"]
    assert test[:2] == [{"ResizeImage": {"size": 36}}, {"CenterCropImage": {"size": 32}}]


def test_a_null_train_batch_divides_the_global_batch_among_the_processes():
    # For jobs whose process count changes (an elastic launch that lost a node). Catches a per-process batch
    # that does not follow the process count, a global batch that does not divide silently rounded, and a
    # null batch without a global one (or with a fixed local one) accepted.
    digits = os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml")
    cfg = load_config(digits, ["Data.Train.sampler.batch_size=null", "Global.global_batch_size=48"])
    assert [train_batch_size(cfg, n) for n in (1, 2, 3)] == [48, 24, 16]
    with pytest.raises(ConfigError, match=r"^Global.global_batch_size: 48 images cannot be divided among 5 "):
        train_batch_size(cfg, 5)
    assert train_batch_size(load_config(digits, ["Data.Train.sampler.batch_size=8"]), 3) == 8
    for extra, key in (([], "Data.Train.sampler.batch_size: null"),
                       (["Global.global_batch_size=48", "Global.local_batch_size=24"], "Global.local_batch_size: 24")):
        with pytest.raises(ConfigError, match=f"^{key}"):
            load_config(digits, ["Data.Train.sampler.batch_size=null", *extra])
