"""PaddleClas's and PaddleDetection's real classes load the converted files the way their trainers
do and compute ppmoco's features.

They run in real_frameworks.py's own process, from the folder requirements-transfer.txt is
installed into. Without them these tests skip, unless PPMOCO_REQUIRE_TRANSFER_DEPS=1 (CI sets it):
then a missing package fails them, so they cannot silently stop running.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from ppmoco.transfer import convert

from real_frameworks import DEPS, DEPS_MISSING

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_frameworks.py")
REQUIRED = os.environ.get("PPMOCO_REQUIRE_TRANSFER_DEPS") == "1"
# The same Paddle kernels on the same weights: measured identical; 1e-5 leaves room for a pooling
# implemented differently (PaddleClas's AdaptiveAvgPool2D vs ppmoco's mean).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def outputs(r50, r18, tmp_path_factory):
    """The real frameworks' features of the r50/r18 images from the converted files."""
    folder = tmp_path_factory.mktemp("real")
    files = {"paddleclas-r50": (r50, "paddleclas"), "paddleclas-r18": (r18, "paddleclas"),
             "paddledet-r50": (r50, "paddledet")}
    args = []
    for option, (backbone, fmt) in files.items():
        path = str(folder / f"{option}.pdparams")
        convert(backbone.checkpoint, path, fmt)
        args += [f"--{option}", path]
    assert np.array_equal(r50.images, r18.images)  # the worker takes one set of images
    np.save(folder / "images.npy", r50.images)
    proc = subprocess.run([sys.executable, WORKER, "--images", str(folder / "images.npy"),
                           "--out", str(folder / "out.npz"), *args], capture_output=True, text=True, timeout=600)
    if proc.returncode == DEPS_MISSING:
        message = (f"{proc.stderr.strip().splitlines()[-1]}; install them with: python -m pip install --no-deps "
                   f"--target {DEPS} -r requirements-transfer.txt")
        if REQUIRED:
            pytest.fail(f"PPMOCO_REQUIRE_TRANSFER_DEPS=1: {message}")
        pytest.skip(message)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(folder / "out.npz"))


def max_diff(a, b):
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def test_paddleclas_resnet50_from_global_pretrained_model(r50, outputs):
    # catches: a name PaddleClas skips (its loader only logs it), conv0/conv1 crossed, short.bn from short.conv
    assert max_diff(outputs["paddleclas_r50"], r50.features) <= TOLERANCE


def test_paddleclas_resnet18_with_use_first_short_conv_false(r18, outputs):
    # catches: the configs/transfer/ advice for ResNet18/34 being wrong (then blocks.0 computes something else)
    assert max_diff(outputs["paddleclas_r18"], r18.features) <= TOLERANCE


def test_paddledet_resnet50_from_pretrain_weights_every_stage(r50, outputs):
    # catches: branch2a/2b crossed, res4 blocks misnamed (pretrain_weights skips them), the stem misnamed
    for index, expected in enumerate(r50.stages):
        assert max_diff(outputs[f"paddledet_r50_res{index + 2}"], expected) <= TOLERANCE, f"res{index + 2}"
