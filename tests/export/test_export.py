"""tools/export.py: the exported Paddle inference model and ONNX model give the backbone's features.

Every exported model is compared with an independent reference: the dygraph backbone, loaded from
the same weights file in eval mode, on images the tool never saw, under the export's criterion (docs/transfer_export.md)
max |difference| <= 1e-4 x max(1, largest |feature|). The ONNX tests need the `export` extra;
without it they skip, unless PPMOCO_REQUIRE_EXPORT_DEPS=1 (set by CI) makes that a failure.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

import ppmoco
from ppmoco.cli import run
from ppmoco.models import build_backbone
from ppmoco.versions import install_command

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOOL = os.path.join(ROOT, "tools", "export.py")
DIGITS = os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml")
DIGITS_ENCODER = {"name": "resnet18", "widths": [8, 16, 32, 64], "cifar_stem": True}
PRETRAINED = "Model.model.base_encoder.pretrained"


def onnx_deps_missing():
    """The export package that cannot be imported, or None; a failure instead when CI requires them."""
    for name in ("paddle2onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            if os.environ.get("PPMOCO_REQUIRE_EXPORT_DEPS") == "1":
                pytest.fail(f"PPMOCO_REQUIRE_EXPORT_DEPS=1 but {name} cannot be imported: "
                            "bash tools/install.sh --test")
            return name
    return None


def assert_same_features(features, reference):
    """The export's criterion: 1e-4 absolute up to features of 1, relative to the largest beyond."""
    assert features.shape == reference.shape
    bound = 1e-4 * max(1.0, float(np.abs(reference).max()))
    assert float(np.abs(features - reference).max()) <= bound


def trained_like_weights(encoder, path, seed):
    """Save a backbone whose BN running statistics are far from Paddle's 0/1 start (as after training,
    so eval mode and train mode differ); return it in eval mode as the reference."""
    backbone = build_backbone(encoder, "test")
    rng = np.random.default_rng(seed)
    for name, tensor in backbone.state_dict().items():
        if name.endswith("_mean"):
            tensor.set_value(rng.normal(0.0, 0.2, tensor.shape).astype("float32"))
        elif name.endswith("_variance"):
            tensor.set_value(rng.uniform(0.3, 3.0, tensor.shape).astype("float32"))
    paddle.save(backbone.state_dict(), str(path))
    backbone.eval()
    return backbone


def features_of(backbone, images):
    with paddle.no_grad():
        return backbone(paddle.to_tensor(images)).numpy()


def images(batch, size, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def paddle_inference(folder):
    """A Paddle Inference predictor of the exported model, as a function of a batch."""
    config = paddle.inference.Config(os.path.join(folder, "model.json"), os.path.join(folder, "model.pdiparams"))
    config.disable_glog_info()
    predictor = paddle.inference.create_predictor(config)

    def predict(batch):
        handle = predictor.get_input_handle(predictor.get_input_names()[0])
        handle.reshape(batch.shape)
        handle.copy_from_cpu(batch)
        predictor.run()
        return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    return predict


def declared_shapes(folder):
    """The input and output shapes the saved program declares (-1: any size)."""
    paddle.enable_static()
    try:
        program, _, (output,) = paddle.static.load_inference_model(os.path.join(folder, "model"),
                                                                   paddle.static.Executor(paddle.CPUPlace()))
        (image,) = [op.result(0) for op in program.global_block().ops if op.name() == "pd_op.data"]
        return list(image.shape), list(output.shape)
    finally:
        paddle.disable_static()


def export_cli(*args):
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def export_in_process(capsys, *args):
    """Run tools/export.py's main through ppmoco.cli.run here (no Paddle start-up per case);
    (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("export_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    try:
        run(tool.main, list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    """ResNet-50 (standard widths) exported at 224 px by the CLI from the shipped ImageNet config, with
    ONNX when the export packages are here; its eval-mode reference and the CLI's output."""
    folder = tmp_path_factory.mktemp("resnet50")
    reference = trained_like_weights({"name": "resnet50"}, folder / "weights.pdparams", seed=0)
    onnx = onnx_deps_missing() is None
    proc = export_cli("-c", "mocov2_pt_in1k_1n8c.yaml", "-o", f"{PRETRAINED}={folder / 'weights.pdparams'}",
                      "--image-size", "224", "--out", str(folder / "export"), *(["--onnx"] if onnx else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": str(folder / "export"), "reference": reference, "proc": proc,
            "batches": {n: images(n, 224, seed=n) for n in (1, 2, 3)}}


@pytest.fixture(scope="module")
def predict_resnet50(resnet50):
    return paddle_inference(resnet50["out"])


def test_paddle_inference_model_gives_the_backbone_features(resnet50, predict_resnet50):
    # catches: exporting in train mode (BN batch statistics), exporting other weights than the file's
    batch = resnet50["batches"][2]
    features = predict_resnet50(batch)
    assert features.shape == (2, 2048)
    assert_same_features(features, features_of(resnet50["reference"], batch))


def test_paddle_inference_model_takes_any_batch_size(resnet50, predict_resnet50):
    # catches: a fixed batch dimension in the InputSpec (Paddle Inference runs other batch sizes
    # anyway, but a deployment that reads the declared shape would not)
    assert declared_shapes(resnet50["out"]) == ([-1, 3, 224, 224], [-1, 2048])
    for size in (1, 3):
        batch = resnet50["batches"][size]
        assert_same_features(predict_resnet50(batch), features_of(resnet50["reference"], batch))


def test_onnx_model_in_onnxruntime_gives_the_backbone_features_at_any_batch_size(resnet50):
    # catches: an ONNX model converted from a train-mode program, with other weights, or with a
    # fixed batch dimension; a missing model.onnx
    if onnx_deps_missing():
        pytest.skip("paddle2onnx/onnxruntime not installed (bash tools/install.sh --test installs them)")
    import onnxruntime

    session = onnxruntime.InferenceSession(os.path.join(resnet50["out"], "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and not isinstance(image.shape[0], int) and image.shape[1:] == [3, 224, 224]
    for batch in resnet50["batches"].values():
        assert_same_features(session.run(None, {"image": batch})[0], features_of(resnet50["reference"], batch))


def test_the_cli_reports_what_it_wrote_and_measured(resnet50):
    # catches: a summary or export.json that does not match the export (names, shapes, the
    # measured differences), and a temporary folder left beside the export
    out = resnet50["out"]
    with open(os.path.join(out, "export.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    files = {"model.json", "model.pdiparams"} | ({"model.onnx"} if "--onnx" in resnet50["proc"].args else set())
    assert set(os.listdir(out)) == files | {"export.json"}
    assert sorted(os.listdir(os.path.dirname(out))) == ["export", "weights.pdparams"]
    assert manifest["input"]["shape"] == [None, 3, 224, 224] and manifest["output"]["shape"] == [None, 2048]
    assert manifest["backbone"] == {"name": "resnet50"}
    assert manifest["versions"]["ppmoco"] == ppmoco.__version__
    assert manifest["versions"]["paddlepaddle"] == paddle.__version__
    stdout = resnet50["proc"].stdout
    assert "input image: shape [None, 3, 224, 224] float32" in stdout
    assert f"output {manifest['output']['name']}: shape [None, 2048] float32" in stdout
    assert len(manifest["checks"]) == len(files) - 1
    for name, check in manifest["checks"].items():
        assert 0 <= check["max_abs_diff"] <= check["bound"] == pytest.approx(1e-4 * max(1, check["max_abs_feature"]))
        assert f"{name} vs the backbone (batch of 2): max |difference| {check['max_abs_diff']:.3g}" in stdout


def test_digits_config_exports_at_its_evaluation_size_to_inference_model_dir(tmp_path):
    # catches: an image size not taken from Data.Eval's transforms (16 px here), the backbone's
    # widths/cifar_stem not taken from the config, Inference.model_dir not being the default output
    reference = trained_like_weights(DIGITS_ENCODER, tmp_path / "digits.pdparams", seed=3)
    proc = export_cli("-c", DIGITS, "-o", f"{PRETRAINED}={tmp_path / 'digits.pdparams'}",
                      "-o", f"Inference.model_dir={tmp_path / 'inference'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "input image: shape [None, 3, 16, 16] float32" in proc.stdout
    batch = images(4, 16)
    assert_same_features(paddle_inference(str(tmp_path / "inference"))(batch), features_of(reference, batch))


def test_exporting_again_replaces_the_earlier_export_whole(tmp_path, capsys):
    # catches: writing into the old folder instead of replacing it (its files survive), or refusing
    # to replace an earlier export
    out = tmp_path / "export"
    for seed in (4, 5):
        reference = trained_like_weights(DIGITS_ENCODER, tmp_path / "digits.pdparams", seed=seed)
        code, _, err = export_in_process(capsys, "-c", DIGITS, "-o", f"{PRETRAINED}={tmp_path / 'digits.pdparams'}",
                                         "--out", str(out))
        assert code == 0, err
        assert sorted(os.listdir(out)) == ["export.json", "model.json", "model.pdiparams"]
        (out / "only_in_the_first_export").write_text("x")
    batch = images(2, 16)
    assert_same_features(paddle_inference(str(out))(batch), features_of(reference, batch))
    assert sorted(os.listdir(tmp_path)) == ["digits.pdparams", "export"]


def test_a_failed_check_publishes_nothing_and_keeps_the_earlier_export(tmp_path, capsys, monkeypatch):
    # catches: publishing an export whose check failed, leaving its temporary folder behind, or
    # touching the earlier export meanwhile
    import ppmoco.export

    trained_like_weights(DIGITS_ENCODER, tmp_path / "digits.pdparams", seed=6)
    argv = ("-c", DIGITS, "-o", f"{PRETRAINED}={tmp_path / 'digits.pdparams'}", "--out", str(tmp_path / "export"))
    assert export_in_process(capsys, *argv)[0] == 0
    before = {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(tmp_path / "export")}
    real = ppmoco.export._run_paddle_inference
    monkeypatch.setattr(ppmoco.export, "_run_paddle_inference",
                        lambda folder, batch: (real(folder, batch)[0] + 0.01, "fetch_name_0"))
    code, _, err = export_in_process(capsys, *argv)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: the exported Paddle inference model does not reproduce the backbone: "
                           "max |difference| 0.01 > ")
    assert {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(tmp_path / "export")} == before
    assert sorted(os.listdir(tmp_path)) == ["digits.pdparams", "export"]


@pytest.mark.parametrize("hidden", ["paddle2onnx", "onnxruntime"])
def test_missing_export_package_is_a_one_line_error(tmp_path, capsys, monkeypatch, hidden):
    # catches: an ImportError traceback, an error that does not say what to install, or an export
    # (even a partial one) made before the dependency is checked
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now raises ImportError
    trained_like_weights(DIGITS_ENCODER, tmp_path / "digits.pdparams", seed=7)
    code, out, err = export_in_process(capsys, "-c", DIGITS, "-o", f"{PRETRAINED}={tmp_path / 'digits.pdparams'}",
                                       "--onnx", "--out", str(tmp_path / "export"))
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    install = re.escape(install_command("export"))
    assert re.fullmatch(rf"error: --onnx needs (\w+ and )?\w+, not installed here; {install}", line)
    assert hidden in line
    assert sorted(os.listdir(tmp_path)) == ["digits.pdparams"]


@pytest.mark.parametrize("args, message", [
    ((f"{PRETRAINED}=/nonexistent/weights",),
     f"error: {PRETRAINED}: no weights at /nonexistent/weights or /nonexistent/weights.pdparams; "),
    ((f"{PRETRAINED}=w.pdparams", "Inference.model_dri=export"),
     "error: Inference.model_dri: unknown key; did you mean 'Inference.model_dir'?"),
    ((f"{PRETRAINED}=w.pdparams", "Data.Eval=null"),
     "error: --image-size: not given, and the config has no Data.Eval.dataset.transform_ops"),
    ((f"{PRETRAINED}=w.pdparams", "Data.Eval.dataset.transform_ops.0.ResizeImage={resize_short: 20}"),
     "error: --image-size: not given, and Data.Eval.dataset.transform_ops give images of varying size"),
    ((f"{PRETRAINED}=null",), f"error: {PRETRAINED}: not set; name the weights to export"),
])
def test_bad_input_is_one_error_line_and_leaves_no_output(tmp_path, capsys, monkeypatch, args, message):
    # catches: a traceback or several lines instead of one `error:` line naming the key, exit code
    # other than 2, an output folder created before the input was found bad
    monkeypatch.chdir(tmp_path)
    trained_like_weights(DIGITS_ENCODER, tmp_path / "w.pdparams", seed=8)
    overrides = [item for arg in args for item in ("-o", arg)]
    code, out, err = export_in_process(capsys, "-c", DIGITS, *overrides, "--out", str(tmp_path / "export"))
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(message)
    assert sorted(os.listdir(tmp_path)) == ["w.pdparams"]


@pytest.mark.parametrize("option, message", [
    (("--image-size", "16x"), "error: --image-size: expected a size in pixels like 224 or 224x192"),
    (("--out", "run"), "error: --out: run holds other files (train.log) and an export replaces its whole folder"),
    (("-o", "Inference.model_dir=run"), "error: Inference.model_dir: run holds other files (train.log) "),
    (("--onx",), "error: unrecognized arguments: --onx; see "),  # PROG --help; PROG is pytest here
])
def test_bad_option_is_one_error_line_and_changes_nothing(tmp_path, capsys, monkeypatch, option, message):
    # catches: an export that deletes or writes into a folder it does not own (a run's output), an
    # unparsable size reaching Paddle
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.log").write_text("a run's log")
    trained_like_weights(DIGITS_ENCODER, tmp_path / "w.pdparams", seed=9)
    code, out, err = export_in_process(capsys, "-c", DIGITS, "-o", f"{PRETRAINED}=w.pdparams", *option)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(message)
    assert sorted(os.listdir(tmp_path)) == ["run", "w.pdparams"]
    assert os.listdir(tmp_path / "run") == ["train.log"]


def test_a_conversion_error_paddle2onnx_only_logs_is_an_error_with_its_reason(tmp_path):
    # catches: taking paddle2onnx's silence for success (it logs a failed conversion and returns
    # nothing), which would publish an export without a usable model.onnx
    if onnx_deps_missing():
        pytest.skip("paddle2onnx/onnxruntime not installed (bash tools/install.sh --test installs them)")
    import paddle2onnx

    import ppmoco.export
    from ppmoco.errors import ExportError

    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ExportError, match=r"could not convert the Paddle inference model: \(InvalidArgument\) "
                                          r"Invalid model file"):
        ppmoco.export._convert_to_onnx(paddle2onnx, str(tmp_path))
    assert os.listdir(tmp_path) == ["model.json"]


def test_vit_exports_and_its_paddle_and_onnx_models_give_the_class_token_features(tmp_path, capsys):
    # catches: a ViT whose traced program fixes the batch size (the class token broadcast to a fixed batch),
    # an export of other weights than the file's (the ViT loader), an ONNX model whose attention or LayerNorm
    # differs from Paddle's, export.json calling the class token pooled stage features
    paddle.seed(10)
    backbone = build_backbone({"name": "vit_mini"}, "test")
    rng = np.random.default_rng(10)
    for name, tensor in backbone.state_dict().items():  # LayerNorms, biases and class token off their init
        if name.endswith(".weight") and "norm" in name:
            tensor.set_value(rng.uniform(0.5, 1.5, tensor.shape).astype("float32"))
        elif name.endswith(".bias") or name == "cls_token":
            tensor.set_value(rng.normal(0.0, 0.3, tensor.shape).astype("float32"))
    paddle.save(backbone.state_dict(), str(tmp_path / "vit.pdparams"))
    backbone.eval()
    onnx = onnx_deps_missing() is None
    out = tmp_path / "export"
    code, stdout, err = export_in_process(capsys, "-c", DIGITS, "-o", "Model.model.base_encoder={name: vit_mini}",
                                          "-o", f"{PRETRAINED}={tmp_path / 'vit.pdparams'}", "--out", str(out),
                                          *(["--onnx"] if onnx else []))
    assert code == 0, err
    assert "input image: shape [None, 3, 16, 16] float32" in stdout
    with open(out / "export.json", encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["output"] == dict(manifest["output"], shape=[None, 64],
                                      what="the class token after the final LayerNorm")
    assert manifest["backbone"] == {"name": "vit_mini"}
    assert declared_shapes(str(out)) == ([-1, 3, 16, 16], [-1, 64])
    predict = paddle_inference(str(out))
    batches = [images(n, 16, seed=20 + n) for n in (1, 3)]
    for batch in batches:
        reference = features_of(backbone, batch)
        assert np.abs(reference).max() > 0.5
        assert_same_features(predict(batch), reference)
    if not onnx:
        pytest.skip("paddle2onnx/onnxruntime not installed (bash tools/install.sh --test installs them)")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in batches:
        assert_same_features(session.run(None, {"image": batch})[0], features_of(backbone, batch))
