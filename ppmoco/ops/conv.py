"""The oneDNN convolution operator (onednn_conv.cc): build once, load once per process, use in a step.

The library is compiled at first use by Paddle's C++ extension builder into
`$XDG_CACHE_HOME/ppmoco/ops/<hash>` (default ~/.cache), the hash covering the source, Paddle's
version and the oneDNN headers, so a new Paddle or a changed source builds anew. A file lock
serialises the build: the processes of a distributed launch wait for the first one's library.

The network keeps its nn.Conv2D layers (checkpoints, export and the evaluation predictors see
Paddle's convolution); `onednn_convolutions(module)` makes them run on the operator while a
training step is traced or run.
"""
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import time

import paddle

from ppmoco import paddle_internals as internals
from ppmoco.errors import PpmocoError

logger = logging.getLogger("ppmoco")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
MODULE = "ppmoco_onednn_conv"
# The oneDNN C++ headers of the version of the libdnnl.so.3 Paddle ships (3.6 for Paddle 3.3):
# Paddle's wheel has only forwarding stubs of them; this package has the headers alone.
HEADERS_HINT = "pip install --no-deps onednn-devel==2025.0.1"


class OpBuildError(PpmocoError):
    """The C++ operator cannot be built here (no compiler, no oneDNN headers, a compile error)."""


def _paddle_dir():
    return os.path.dirname(paddle.__file__)


def onednn_include_dir():
    """The folder holding oneapi/dnnl/dnnl.hpp: Paddle's own include, else the Python prefix's (where
    the onednn-devel package puts it)."""
    candidates = [os.path.join(_paddle_dir(), "include", "third_party", "install", "onednn", "include"),
                  os.path.join(sysconfig.get_path("data"), "include"), os.path.join(sys.prefix, "include")]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "oneapi", "dnnl", "dnnl.hpp")):
            return folder
    raise OpBuildError(f"the oneDNN convolution needs oneDNN's C++ headers, in none of {candidates}: "
                       f"{HEADERS_HINT}")


def build_directory(include_dir):
    digest = hashlib.sha256(paddle.__version__.encode())
    for path in (SOURCE, os.path.join(include_dir, "oneapi", "dnnl", "dnnl_version.h")):
        with open(path, "rb") as f:
            digest.update(f.read())
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ppmoco", "ops", digest.hexdigest()[:16])


@functools.lru_cache(maxsize=None)
def onednn_conv_module():
    """The loaded operator module (compiled on the first call on this machine); OpBuildError if it
    cannot be built."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise OpBuildError(f"the oneDNN convolution is compiled at first use and needs a C++ compiler "
                           f"('{compiler}' not found): install g++")
    include_dir = onednn_include_dir()
    folder = build_directory(include_dir)
    os.makedirs(folder, exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        built = os.path.join(folder, MODULE)
        if os.path.isfile(os.path.join(built, MODULE + ".so")):
            return internals.load_custom_op_library(MODULE, built)
        from paddle.utils.cpp_extension import load

        logger.info(f"compiling the oneDNN convolution operator into {folder} (once)")
        started = time.perf_counter()
        try:
            module = load(name=MODULE, sources=[SOURCE], extra_include_paths=[include_dir],
                          extra_cxx_cflags=["-O3"],
                          # Paddle's own libdnnl (its libs folder is on the search and run paths):
                          # one oneDNN in the process, running on Paddle's OpenMP threads.
                          extra_ldflags=["-l:libdnnl.so.3"], build_directory=folder)
        except Exception as err:  # noqa: BLE001 - a failed compile is reported in one line
            raise OpBuildError(f"building {SOURCE} in {folder} failed (the compiler's message is above): "
                               f"{err}") from err
    logger.debug(f"oneDNN convolution operator compiled and loaded in {time.perf_counter() - started:.1f} s")
    return module


def onednn_conv2d(x, weight, stride, padding, bfloat16=False):
    """Convolution of NCHW float32 `x` with OIHW `weight` (no bias, groups 1, dilation 1); with
    `bfloat16` the inputs (and, for the gradients, d out) are rounded to bfloat16 and the products
    accumulated in float32 on the CPU's bfloat16 units; results are float32 either way."""
    return onednn_conv_module().onednn_conv2d(x, weight, list(stride), list(padding), bfloat16)


def computes(layer):
    """Whether the operator computes what `layer` does: a float32, bias-free, ungrouped, undilated
    NCHW nn.Conv2D with zero padding given as numbers."""
    if not isinstance(layer, paddle.nn.Conv2D):
        return False
    conv = internals.conv2d_settings(layer)
    return (layer.bias is None and conv["groups"] == 1 and conv["dilation"] == [1, 1]
            and conv["data_format"] == "NCHW" and conv["padding_mode"] == "zeros"
            and conv["padding_algorithm"] == "EXPLICIT" and len(conv["padding"]) == 2
            and all(isinstance(p, int) for p in conv["padding"]) and layer.weight.dtype == paddle.float32)


def _forward(layer, stride, padding, bfloat16, x):
    if x.dtype != paddle.float32:  # e.g. under autocast: Paddle's kernels take the other types
        return type(layer).forward(layer, x)
    return onednn_conv2d(x, layer.weight, stride, padding, bfloat16)


@contextlib.contextmanager
def onednn_convolutions(module, bfloat16=False):
    """Within: every convolution of `module` the operator `computes` runs on it (computing in
    bfloat16 with `bfloat16`), eagerly or while a static program is traced (the weight is read at
    each call, so swapped parameters are seen)."""
    onednn_conv_module()
    layers = [layer for layer in module.sublayers(include_self=True) if computes(layer)]
    for layer in layers:
        conv = internals.conv2d_settings(layer)
        layer.forward = functools.partial(_forward, layer, conv["stride"], conv["padding"], bfloat16)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
