"""tools/convert.py on the command line: what it writes and says, and every input it refuses.

A refusal is one `error: ...` line naming the file or option and the fix, exit code 2, and no
output file (nor its temporary).
"""
import errno
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import paddle
import pytest

from ppmoco import fileio
from ppmoco.cli import run
from ppmoco.models.resnet import Architecture

from transfer_helpers import random_tensors

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOOL = os.path.join(ROOT, "tools", "convert.py")


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save(folder, name, tensors, prefix=""):
    path = str(folder / name)
    paddle.save({prefix + k: v for k, v in tensors.items()}, path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source files, one per case; ResNet-18s as they are cheap."""
    folder = tmp_path_factory.mktemp("sources")
    r18 = random_tensors(Architecture("resnet18"), seed=1)
    incomplete = {k: v for k, v in r18.items() if k != "layer4.1.bn2._mean"}
    r34 = random_tensors(Architecture("resnet34"), seed=2)
    odd_depth = {k: v for k, v in r34.items() if not k.startswith("layer1.2.")}  # blocks per stage 2-4-6-3
    (folder / "garbage.pdparams").write_bytes(np.random.default_rng(0).bytes(4096))
    return {
        # a PaddleFleetX MoCo checkpoint: backbone under base_encoder.0., like FleetX writes it
        "r18": save(folder, "r18_fleetx.pdparams", r18, prefix="base_encoder.0."),
        "tiny": save(folder, "tiny.pdparams", random_tensors(Architecture("resnet18", (4, 8, 8, 8), True), 3)),
        "cifar": save(folder, "cifar.pdparams", random_tensors(Architecture("resnet18", cifar_stem=True), 4)),
        "wide": save(folder, "narrow.pdparams", random_tensors(Architecture("resnet18", (32, 64, 128, 256)), 5)),
        "incomplete": save(folder, "incomplete.pdparams", incomplete),
        "odd_depth": save(folder, "odd.pdparams", odd_depth),
        "garbage": str(folder / "garbage.pdparams"),
        "missing": str(folder / "not_there"),
    }


def convert_cli(argv, capsys):
    """tools/convert.py's main through ppmoco.cli.run, as the script runs it: (exit code, stdout, stderr)."""
    try:
        run(load_tool().main, argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_and_reports_the_tensor_count(sources, tmp_path, capsys):
    dst = str(tmp_path / "r18.pdparams")
    code, out, err = convert_cli([sources["r18"], dst, "--to", "paddleclas"], capsys)
    assert code == 0, err
    written = paddle.load(dst)
    lines = out.splitlines()
    # catches: a count that is not the file's, the wrong format or source named
    assert lines[0] == (f"wrote {len(written)} tensors in paddleclas format to {dst}, from {sources['r18']} "
                        "(PaddleFleetX MoCo checkpoint): a ResNet-18")
    assert len(written) == 100 and "use_first_short_conv: False" in lines[1]
    assert not os.path.exists(dst + ".tmp")


def test_detectron2_file_is_mocos_plain_pickle(sources, tmp_path, capsys):
    dst = str(tmp_path / "r18.pkl")
    code, out, err = convert_cli([sources["r18"], dst, "--to", "detectron2"], capsys)
    assert code == 0, err
    with open(dst, "rb") as f:
        record = pickle.load(f)
    # catches: torch tensors instead of numpy (detectron2 would need torch to read them back as MoCo's
    # files), a missing matching_heuristics (detectron2 would then demand exact names)
    assert sorted(record) == ["__author__", "matching_heuristics", "model"]
    assert record["matching_heuristics"] is True and isinstance(record["__author__"], str)
    model = record["model"]
    assert all(isinstance(v, np.ndarray) for v in model.values())
    counters = [k for k in model if k.endswith(".num_batches_tracked")]
    assert len(counters) == 20 and all(model[k].dtype == np.int64 and model[k].shape == () for k in counters)
    assert {model[k].dtype for k in model if k not in counters} == {np.dtype("float32")}
    assert f"wrote {len(model)} tensors" in out and len(model) == 120


def test_the_script_reports_errors_through_ppmoco_cli(sources, tmp_path):
    proc = subprocess.run([sys.executable, TOOL, sources["r18"], str(tmp_path / "x.onnx"), "--to", "onnx"],
                          capture_output=True, text=True, timeout=300)
    # catches: the script not going through ppmoco.cli.run (a traceback, exit code 1)
    assert proc.returncode == 2 and proc.stderr == ("error: --to: unknown format 'onnx'; use one of torchvision, "
                                                    "detectron2, paddle-vision, paddleclas, paddledet, timm\n")
    assert os.listdir(tmp_path) == []
    # catches: argparse's usage text and 'convert.py: error:' instead of ppmoco's one line
    proc = subprocess.run([sys.executable, TOOL, sources["r18"], str(tmp_path / "x.pth")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == ("error: the following arguments are required: --to; "
                                                    "see convert.py --help\n")


REFUSALS = [
    ("r18", "x.pth", "onnx", "--to: unknown format 'onnx'; use one of torchvision, detectron2, paddle-vision, "
                             "paddleclas, paddledet, timm"),
    ("r18", "x.pdparams", "paddledet", "--to paddledet: {src} (PaddleFleetX MoCo checkpoint) is a ResNet-18; "
                                       "PaddleDetection's ResNet-18/34 always give block res2a a 64->64 projection"),
    ("tiny", "x.pdparams", "paddle-vision", "--to paddle-vision: {src} (ResNet state_dict) is a ResNet-18 with widths "
                                            "[4, 8, 8, 8] and the CIFAR stem, but paddle.vision builds ResNets with "
                                            "widths [64, 128, 256, 512] and the 7x7 ImageNet stem only; use --to "
                                            "torchvision"),
    ("tiny", "x.pdparams", "paddleclas", "is a ResNet-18 with widths [4, 8, 8, 8] and the CIFAR stem, but PaddleClas"),
    ("tiny", "x.pdparams", "paddledet", "is a ResNet-18 with widths [4, 8, 8, 8] and the CIFAR stem, but "
                                        "PaddleDetection"),
    ("tiny", "x.pkl", "detectron2", "is a ResNet-18 with widths [4, 8, 8, 8] and the CIFAR stem, but detectron2"),
    ("cifar", "x.pkl", "detectron2", "is a ResNet-18 with the CIFAR stem, but detectron2"),
    ("cifar", "x.pdparams", "paddleclas", "is a ResNet-18 with the CIFAR stem, but PaddleClas"),
    ("wide", "x.pdparams", "paddle-vision", "is a ResNet-18 with widths [32, 64, 128, 256], but paddle.vision"),
    ("garbage", "x.pth", "torchvision", "SRC: cannot read {src}"),
    ("missing", "x.pth", "torchvision", "SRC: no weights at {src} or {src}.pdparams; download them there or fix the "
                                        "path"),
    ("incomplete", "x.pth", "torchvision", "SRC: {src} (ResNet state_dict) is not a complete ResNet-18: missing: "
                                           "layer4.1.bn2._mean; is the file damaged?"),
    ("odd_depth", "x.pth", "torchvision", "SRC: {src} (ResNet state_dict) holds a ResNet of [2, 4, 6, 3] basic blocks "
                                          "per stage, which is none of resnet18 [2, 2, 2, 2] basic blocks"),
    ("r18", "x.pth", "detectron2", "DST: detectron2 reads only files named *.pkl; name the output {dst_stem}.pkl"),
    ("r18", "x.pth", "paddledet", "DST: PaddleDetection reads only files named *.pdparams"),
]


@pytest.mark.parametrize("source, dst_name, fmt, message", REFUSALS,
                         ids=[f"{s}-{f}-{m[:24]}" for s, _, f, m in REFUSALS])
def test_refusals_are_one_line_exit_2_and_write_nothing(sources, tmp_path, capsys, source, dst_name, fmt, message):
    dst = str(tmp_path / dst_name)
    code, out, err = convert_cli([sources[source], dst, "--to", fmt], capsys)
    expected = message.format(src=sources[source], dst_stem=os.path.splitext(dst)[0])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_torchvision_without_torch_says_how_to_install_it(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    code, out, err = convert_cli([sources["r18"], str(tmp_path / "x.pth"), "--to", "torchvision"], capsys)
    assert code == 2 and err == ("error: --to torchvision: writing a PyTorch file needs torch: pip install torch "
                                 "(the CPU build is enough)\n")
    assert os.listdir(tmp_path) == []


def test_destination_folder_is_refused(sources, tmp_path, capsys):
    code, out, err = convert_cli([sources["r18"], str(tmp_path), "--to", "paddle-vision"], capsys)
    assert code == 2 and err.startswith(f"error: DST: {tmp_path} is a folder") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_disk_full_while_writing_leaves_no_file(sources, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    code, out, err = convert_cli([sources["r18"], str(tmp_path / "x.pdparams"), "--to", "paddle-vision"], capsys)
    # catches: the temporary file left behind, a traceback instead of the error line
    assert code == 2 and err.startswith(f"error: DST: cannot write {tmp_path / 'x.pdparams'}: No space left on "
                                        "device;") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []
