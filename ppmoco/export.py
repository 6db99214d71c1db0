"""A backbone as a Paddle inference model and as ONNX, each run back and compared with the backbone.

`paddle.jit.save` traces the backbone's `forward` (a ResNet's global-average-pooled last-stage
features, a ViT's class token after the final norm: its `output_description`) in eval mode, so
BatchNorm uses its running statistics, for the input spec [None, 3, H, W]: any batch size, one image
size. The saved model is then run in Paddle Inference (the predictor a deployment uses,
with its fused CPU kernels) and, with ONNX, the converted model in onnxruntime, on the same random
batch as the backbone itself. Features must agree within TOLERANCE x max(1, largest |feature|).
Everything is written to a hidden folder beside the target and renamed into place only after every
check passed, with export.json describing the export; a failed export leaves nothing behind.
"""
import glob
import importlib
import json
import os
import re
import shutil

import numpy as np
import paddle

from ppmoco import __version__
from ppmoco.data.transforms import build_transforms
from ppmoco.errors import ConfigError, ExportError
from ppmoco.fileio import replace_dir
from ppmoco.inference import NativeOutput, cpu_predictor
from ppmoco.versions import install_command

PREFIX = "model"  # paddle.jit.save writes PREFIX.json (the program) and PREFIX.pdiparams
PROGRAM, PARAMS, ONNX_FILE = f"{PREFIX}.json", f"{PREFIX}.pdiparams", f"{PREFIX}.onnx"
MANIFEST = "export.json"
INPUT_NAME = "image"
ONNX_OPSET = 11  # old enough for most runtimes to load; paddle2onnx raises it where an op needs more
# Pooled features of an untrained ResNet-50 reach ~60 and float32 rounding grows with them, so the
# bound is 1e-4 absolute for features up to 1 and 1e-4 of the largest feature beyond that.
TOLERANCE = 1e-4
CHECK_BATCH = 2
CHECK_SEED = 0
EXPORT_PACKAGES = ("paddle2onnx", "onnxruntime")


def parse_image_size(text):
    """--image-size `N` or `HxW` -> (height, width)."""
    try:
        sides = tuple(int(side) for side in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or min(sides) <= 0:
        raise ConfigError(f"--image-size: expected a size in pixels like 224 or 224x192 (height x width), got {text!r}")
    return sides * 2 if len(sides) == 1 else sides


def config_image_size(cfg):
    """The (height, width) the evaluation transforms (Data.Eval) give every image."""
    evaluation = cfg["Data"]["Eval"]
    ops = (evaluation or {}).get("dataset", {}).get("transform_ops")
    if not ops:
        raise ConfigError("--image-size: not given, and the config has no Data.Eval.dataset.transform_ops to read "
                          "it from; pass the size the backbone was trained at, e.g. --image-size 224")
    size = build_transforms(ops, "Data.Eval.dataset.transform_ops").output_size()
    if size is None:
        raise ConfigError("--image-size: not given, and Data.Eval.dataset.transform_ops give images of varying "
                          "size (no crop or fixed-size resize at the end); pass one, e.g. --image-size 224")
    return size


def pretrained_weights(encoder):
    """The weights file the config names for the backbone; exporting random weights is refused."""
    path = encoder.get("pretrained")
    if path is None:
        raise ConfigError("Model.model.base_encoder.pretrained: not set; name the weights to export, e.g. "
                          "-o Model.model.base_encoder.pretrained=output/mocov2_pt_digits/epoch_80")
    return path


def onnx_tools():
    """(paddle2onnx, onnxruntime), imported; when one is missing, an error saying what to install."""
    modules, missing = [], []
    for name in EXPORT_PACKAGES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--onnx needs {' and '.join(missing)}, not installed here; "
                          f"{install_command('export')}")
    return tuple(modules)


def check_target(out_dir, option):
    """Refuse an output folder this export may not replace: only a new or empty folder or an earlier
    export (it has export.json) is replaced, so a typo cannot delete a run's checkpoints."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{option}: {out_dir} is a file; name a folder for the export")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        held = sorted(os.listdir(out_dir))
        named = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ExportError(f"{option}: {out_dir} holds other files ({named}) and an export replaces its whole "
                          "folder; name a new or empty folder with --out DIR")


def export_backbone(backbone, out_dir, image_size, onnx=None, manifest=None):
    """Export `backbone` to `out_dir` as described above; return the report written to export.json.

    `onnx` is onnx_tools()'s pair, or None for the Paddle inference model alone; `manifest` adds
    entries to export.json (where the backbone and its weights came from).
    """
    backbone.eval()
    images = np.random.default_rng(CHECK_SEED).standard_normal((CHECK_BATCH, 3, *image_size), dtype=np.float32)
    with paddle.no_grad():
        reference = backbone(paddle.to_tensor(images)).numpy()
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, f".{glob.escape(name)}.tmp-*")):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    try:
        os.makedirs(tmp)
        report = _export_into(tmp, backbone, image_size, images, reference, onnx)
        report.update(manifest or {})
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _export_into(folder, backbone, image_size, images, reference, onnx):
    spec = paddle.static.InputSpec([None, 3, *image_size], "float32", name=INPUT_NAME)
    with NativeOutput():  # PIR's warning about an `out` argument it ignores while tracing
        paddle.jit.save(backbone, os.path.join(folder, PREFIX), input_spec=[spec])
    features, output_name = _run_paddle_inference(folder, images)
    checks = {"Paddle Inference": _compare("Paddle inference model", features, reference)}
    versions = {"ppmoco": __version__, "paddlepaddle": paddle.__version__}
    if onnx is not None:
        paddle2onnx, onnxruntime = onnx
        _convert_to_onnx(paddle2onnx, folder)
        features = _run_onnxruntime(onnxruntime, os.path.join(folder, ONNX_FILE), images)
        checks["ONNX in onnxruntime"] = _compare("ONNX model (onnxruntime)", features, reference)
        versions.update(paddle2onnx=paddle2onnx.__version__, onnxruntime=onnxruntime.__version__)
    return {
        "input": {"name": INPUT_NAME, "shape": [None, 3, *image_size], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": output_name, "shape": [None, int(reference.shape[1])], "dtype": "float32",
                   "what": getattr(backbone, "output_description", "global-average-pooled last-stage features")},
        "files": {file: os.path.getsize(os.path.join(folder, file)) for file in sorted(os.listdir(folder))},
        "onnx_opset": ONNX_OPSET if onnx is not None else None,
        "checks": checks,
        "tolerance": f"max |difference| <= {TOLERANCE:g} x max(1, largest |feature|)",
        "versions": versions,
    }


def _compare(what, features, reference):
    """The differences of `features` from the backbone's; an ExportError beyond the tolerance."""
    scale = float(np.abs(reference).max())
    bound = TOLERANCE * max(1.0, scale)
    diff = float(np.abs(features - reference).max()) if features.shape == reference.shape else float("inf")
    if not diff <= bound:  # also refuses NaN
        raise ExportError(f"the exported {what} does not reproduce the backbone: max |difference| {diff:.3g} > "
                          f"{bound:.3g} on a batch of {len(reference)} (shape {list(features.shape)}, expected "
                          f"{list(reference.shape)}); nothing was written (check the Paddle and export package "
                          f"versions: {install_command('export')})")
    return {"batch": len(reference), "max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-30),
            "max_abs_feature": scale, "bound": bound}


def _run_paddle_inference(folder, images):
    """The Paddle inference model's features for `images`, and the name of its output."""
    with NativeOutput():  # the oneDNN passes print debug lines to stdout
        predictor = cpu_predictor(os.path.join(folder, PREFIX), os.cpu_count() or 1)
        image = predictor.get_input_handle(predictor.get_input_names()[0])
        image.reshape(images.shape)
        image.copy_from_cpu(images)
        predictor.run()
    output_name = predictor.get_output_names()[0]
    return predictor.get_output_handle(output_name).copy_to_cpu(), output_name


def _convert_to_onnx(paddle2onnx, folder):
    """The Paddle inference model in `folder` -> ONNX_FILE there.

    Asked for bytes (no save_file), paddle2onnx skips its optimizer, which pip-installs packages at
    run time. It logs a conversion error instead of raising it, and its logger then calls
    sys.exit(-1), so the reason is read from its output.
    """
    with NativeOutput() as output:
        try:
            model = paddle2onnx.export(os.path.join(folder, PROGRAM), os.path.join(folder, PARAMS), save_file=None,
                                       opset_version=ONNX_OPSET, verbose=False)
        except (Exception, SystemExit):
            model = None
    if not model:
        log = re.sub(r"\x1b\[[0-9;]*m", "", output.text)  # without its colour codes
        found = re.findall(r"Failed to convert PaddlePaddle model: (.*)", log)
        reason = found[-1].strip() if found else "no model and no reason given"
        raise ExportError(f"paddle2onnx {paddle2onnx.__version__} could not convert the Paddle inference model: "
                          f"{reason}; install the pinned versions: {install_command('export')}")
    with open(os.path.join(folder, ONNX_FILE), "wb") as f:
        f.write(model)


def _run_onnxruntime(onnxruntime, onnx_file, images):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # its notes on initializers it removes say nothing to the user
    session = onnxruntime.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
    (image,), (features,) = session.get_inputs(), session.get_outputs()
    return session.run([features.name], {image.name: images})[0]


def describe(report, out_dir):
    """What an export wrote and measured, as lines for the console."""
    files = [f"{file} ({size / 2 ** 20:.1f} MiB)" for file, size in report["files"].items()]
    lines = [f"wrote {out_dir}: {', '.join(files)}, {MANIFEST}"]
    for side in ("input", "output"):
        spec = report[side]
        lines.append(f"  {side} {spec['name']}: shape {spec['shape']} {spec['dtype']}")
    for name, check in report["checks"].items():
        lines.append(f"  {name} vs the backbone (batch of {check['batch']}): max |difference| "
                     f"{check['max_abs_diff']:.3g}, {check['max_rel_diff']:.3g} of the largest |feature| "
                     f"{check['max_abs_feature']:.3g} (bound {check['bound']:.3g})")
    return lines
