"""The oneDNN convolution operator (onednn_conv.cc): build once, load once per process, use in a step.

The library is compiled at first use by Paddle's C++ extension builder into
`$XDG_CACHE_HOME/ppmoco/ops/<hash>` (default ~/.cache), the hash covering the source, Paddle's
version and the oneDNN headers, so a new Paddle or a changed source builds anew. A file lock
serialises the build: the processes of a distributed launch wait for the first one's library. A
record next to the library (its SHA-256) lets a truncated or corrupt library be rebuilt instead of
loaded (loading a truncated one crashes the process); a library that does not load is rebuilt once.

Whatever keeps the operator from being built or loaded (no compiler, no headers or headers of
another oneDNN than Paddle's, a cache folder that cannot be written, a library that does not load)
is an OpBuildError naming the cause and the fix, so `Engine.conv: auto` falls back to Paddle's
convolution with one warning.

The network keeps its nn.Conv2D layers (checkpoints, export and the evaluation predictors see
Paddle's convolution); `onednn_convolutions(module)` makes them run on the operator while a
training step is traced or run.
"""
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import time

import paddle

from ppmoco import paddle_internals as internals
from ppmoco.errors import PpmocoError
from ppmoco.fileio import cache_dir

logger = logging.getLogger("ppmoco")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
MODULE = "ppmoco_onednn_conv"
# The onednn-devel release holding the C++ headers of the oneDNN (major, minor) in the libdnnl.so.3
# Paddle ships (3.6 for Paddle 3.3): Paddle's wheel has only forwarding stubs of them.
ONEDNN_DEVEL = {(3, 6): "2025.0.1"}
TESTED_ONEDNN = (3, 6)
# The build's record, next to the library's folder: {"sha256": of the library, "load_error": why
# the library built there does not load, when it does not}.
RECORD = "build-record.json"
# A compile that fails with less than this free on the cache's disk is put down to the disk.
LOW_DISK_BYTES = 256 * 2 ** 20
# File-system failures that rebuilding cannot mend: the cache folder's, for the user to fix.
_CACHE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                 errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


class OpBuildError(PpmocoError):
    """The C++ operator cannot be built or loaded here (no compiler, no or mismatched oneDNN headers, a
    cache folder that cannot be written, a compile error, a library that does not load)."""


def _paddle_dir():
    return os.path.dirname(paddle.__file__)


def headers_hint(version):
    """The command installing oneDNN's C++ headers of `version` ((major, minor, ...))."""
    release = ONEDNN_DEVEL.get(tuple(version[:2]))
    if release is None:
        return f"pip install --no-deps onednn-devel==<its release of oneDNN {version[0]}.{version[1]}>"
    return f"pip install --no-deps onednn-devel=={release}"


def paddle_libdnnl():
    """The oneDNN library Paddle runs on, which the operator links."""
    return os.path.join(_paddle_dir(), "libs", "libdnnl.so.3")


@functools.lru_cache(maxsize=None)
def _library_version(path):
    if not os.path.isfile(path):
        raise OpBuildError(f"the oneDNN convolution runs on Paddle's oneDNN library, and this Paddle has none "
                           f"({path} is missing): install Paddle's CPU wheel for x86-64 Linux, which ships it")
    try:
        import ctypes  # here, not at import: ppmoco imports where ctypes cannot load libraries

        class Version(ctypes.Structure):  # the leading fields of dnnl_version_t (oneapi/dnnl/dnnl_types.h)
            _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]

        function = ctypes.CDLL(path).dnnl_version
        function.restype = ctypes.POINTER(Version)
        version = function().contents
    except (ImportError, OSError, AttributeError, TypeError) as err:
        raise OpBuildError(f"cannot read the oneDNN version of Paddle's {path} ({_cause(err)}): "
                           "reinstall Paddle") from err
    return version.major, version.minor, version.patch


def paddle_onednn_version():
    """(major, minor, patch) of the oneDNN Paddle runs on, as its libdnnl.so.3 reports it
    (`dnnl_version()`); OpBuildError where it cannot be read."""
    return _library_version(paddle_libdnnl())


def _install_hint():
    try:
        return headers_hint(paddle_onednn_version())
    except OpBuildError:
        return headers_hint(TESTED_ONEDNN)


def onednn_include_dir():
    """The folder holding oneapi/dnnl/dnnl.hpp: Paddle's own include, else the Python prefix's (where
    the onednn-devel package puts it)."""
    candidates = [os.path.join(_paddle_dir(), "include", "third_party", "install", "onednn", "include"),
                  os.path.join(sysconfig.get_path("data"), "include"), os.path.join(sys.prefix, "include")]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "oneapi", "dnnl", "dnnl.hpp")):
            return folder
    raise OpBuildError(f"the oneDNN convolution needs oneDNN's C++ headers, in none of {candidates}: "
                       f"{_install_hint()}")


def headers_version(include_dir):
    """(major, minor) of the oneDNN headers in `include_dir`, from their dnnl_version.h."""
    path = os.path.join(include_dir, "oneapi", "dnnl", "dnnl_version.h")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as err:
        raise OpBuildError(f"oneDNN's C++ headers in {include_dir} lack a readable dnnl_version.h "
                           f"({err.strerror}): {_install_hint()}") from err
    found = dict(re.findall(r"^\s*#\s*define\s+DNNL_VERSION_(MAJOR|MINOR)\s+(\d+)", text, re.MULTILINE))
    if len(found) != 2:
        raise OpBuildError(f"{path} names no oneDNN version (DNNL_VERSION_MAJOR, DNNL_VERSION_MINOR): "
                           f"{_install_hint()}")
    return int(found["MAJOR"]), int(found["MINOR"])


def check_onednn_version(include_dir):
    """OpBuildError unless the headers in `include_dir` are of the oneDNN (major, minor) Paddle runs on:
    the operator is compiled against the headers and runs on Paddle's library."""
    library = paddle_onednn_version()
    headers = headers_version(include_dir)
    if headers != tuple(library[:2]):
        raise OpBuildError(f"oneDNN's C++ headers in {include_dir} are of oneDNN {headers[0]}.{headers[1]}, but "
                           f"Paddle runs oneDNN {'.'.join(map(str, library))} ({paddle_libdnnl()}): "
                           f"{headers_hint(library)}")


def cache_root():
    """Where built operators are kept: $XDG_CACHE_HOME/ppmoco/ops (default ~/.cache/ppmoco/ops)."""
    return cache_dir("ops")


def build_directory(include_dir):
    digest = hashlib.sha256(paddle.__version__.encode())
    for path in (SOURCE, os.path.join(include_dir, "oneapi", "dnnl", "dnnl_version.h")):
        with open(path, "rb") as f:
            digest.update(f.read())
    return os.path.join(cache_root(), digest.hexdigest()[:16])


def _cause(err):
    """`err` in one line; for Paddle's failure to open a library, the loader's own words; for a failed
    compile, the command's exit."""
    text = str(err).strip() or type(err).__name__
    dlopen = re.search(r"\(error code is ([^\n]*)\)", text)
    if dlopen:
        return dlopen.group(1)
    line = " ".join(text.splitlines()[0].split())
    command = re.match(r"Failed to run command: .*?, errors: (.+)", line)  # the builder's, naming a function
    return command.group(1) if command else line


def _is_cache_error(err):
    return isinstance(err, OSError) and err.errno in _CACHE_ERRNOS


def _cache_error(err, folder):
    where = getattr(err, "filename", None) or folder
    reason = getattr(err, "strerror", None) or _cause(err)
    return OpBuildError(f"the oneDNN convolution's build cache cannot be written at {where} ({reason}): free disk "
                        f"space or make {cache_root()} writable, or set XDG_CACHE_HOME to a writable folder to "
                        "move the cache (the operator is built in $XDG_CACHE_HOME/ppmoco/ops)")


def _load_error(folder, cause):
    return OpBuildError(f"the oneDNN convolution built in {folder} does not load ({cause}): check that Paddle's "
                        f"{paddle_libdnnl()} loads (reinstall Paddle), then delete {folder} to build it again")


def _processes_here():
    """How many processes the launch started on this machine (1 when not launched)."""
    for name in ("PADDLE_LOCAL_SIZE", "PADDLE_TRAINERS_NUM"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 1


@contextlib.contextmanager
def _build_lock(path):
    """Hold the machine's lock on the build at `path` within; yields whether it is held: not where the
    system (no fcntl: Windows) or the file system (some network ones) has no file locks."""
    try:
        import fcntl  # here, not at import: importing ppmoco needs no fcntl
    except ImportError:
        yield False
        return
    with open(path, "a") as lock:  # the lock is released when the file closes
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = True
        except OSError as err:
            logger.debug(f"cannot lock {path} ({err.strerror}): building the oneDNN convolution unlocked")
            held = False
        yield held


def _sha256(path):
    """The SHA-256 of the file at `path`, None where there is none."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _read_record(folder):
    try:
        with open(os.path.join(folder, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(folder, library, load_error=None):
    record = {"sha256": _sha256(library)}
    if load_error is not None:
        record["load_error"] = load_error
    path = os.path.join(folder, RECORD)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def _load(built):
    """The module of the library built before in `built` (registers its operators in Paddle)."""
    return internals.load_custom_op_library(MODULE, built)


def _cpp_extension_load(**kwargs):
    from paddle.utils.cpp_extension import load

    return load(**kwargs)


def _compile(folder, include_dir):
    """Compile the operator into `folder` and load it (what `paddle.utils.cpp_extension.load` does), and
    record the library; OpBuildError where that fails, OSError where the cache folder does."""
    built = os.path.join(folder, MODULE)
    library = os.path.join(built, MODULE + ".so")
    logger.info(f"compiling the oneDNN convolution operator into {folder} (once)")
    started = time.perf_counter()
    try:
        module = _cpp_extension_load(name=MODULE, sources=[SOURCE], extra_include_paths=[include_dir],
                                     extra_cxx_cflags=["-O3"],
                                     # Paddle's own libdnnl (its libs folder is on the search and run paths):
                                     # one oneDNN in the process, running on Paddle's OpenMP threads.
                                     extra_ldflags=["-l:libdnnl.so.3"], build_directory=folder)
    except Exception as err:  # noqa: BLE001 - a failed compile is reported in one line
        if _is_cache_error(err):
            raise
        if os.path.isfile(library):  # compiled, but it does not load: recorded, so no process rebuilds it
            _write_record(folder, library, load_error=_cause(err))
            raise _load_error(folder, _cause(err)) from err
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < LOW_DISK_BYTES:
            raise OpBuildError(f"building the oneDNN convolution in {folder} failed with {free // 2 ** 20} MB free "
                               "on its disk: free disk space, or set XDG_CACHE_HOME to a folder on another disk to "
                               "move the cache (the operator is built in $XDG_CACHE_HOME/ppmoco/ops)") from err
        raise OpBuildError(f"building {SOURCE} in {folder} failed (the compiler's message is above): "
                           f"{_cause(err)}") from err
    _write_record(folder, library)
    logger.debug(f"oneDNN convolution operator compiled and loaded in {time.perf_counter() - started:.1f} s")
    return module


def _load_or_build(folder, include_dir, locked):
    """The operator's module: the library in `folder` when its record vouches for it and it loads,
    else built (once) and loaded. `locked`: this process holds the build lock."""
    built = os.path.join(folder, MODULE)
    library = os.path.join(built, MODULE + ".so")
    record = _read_record(folder)
    digest = _sha256(library)
    if digest is not None and digest == record.get("sha256"):
        if record.get("load_error"):
            raise _load_error(folder, record["load_error"])
        try:
            return _load(built)
        except Exception as err:  # noqa: BLE001 - rebuilt once, then reported in one line
            if _is_cache_error(err):
                raise
            logger.warning(f"the oneDNN convolution in {library} does not load ({_cause(err)}): building it again")
    elif digest is not None and record:
        logger.warning(f"the oneDNN convolution in {library} is not the library built there (truncated or "
                       "corrupt): building it again")
    # Not loaded: a library without a record is one whose build did not finish (or an earlier ppmoco's).
    if not locked and _processes_here() > 1:
        raise OpBuildError(f"this system has no file locks, so the oneDNN convolution is built by a single process, "
                           f"and {_processes_here()} start together: build it once first with "
                           "python -c \"import ppmoco.ops; ppmoco.ops.onednn_conv_module()\"")
    # A new file, not one written over: processes that have the old library open keep it intact.
    if os.path.isdir(built):
        shutil.rmtree(built)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, RECORD))
    return _compile(folder, include_dir)


@functools.lru_cache(maxsize=None)
def onednn_conv_module():
    """The loaded operator module (compiled on the first call on this machine); OpBuildError if it
    cannot be built or loaded."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise OpBuildError(f"the oneDNN convolution is compiled at first use and needs a C++ compiler "
                           f"('{compiler}' not found): install g++")
    paddle_onednn_version()
    include_dir = onednn_include_dir()
    check_onednn_version(include_dir)
    folder = build_directory(include_dir)
    try:
        os.makedirs(folder, exist_ok=True)
        with _build_lock(folder + ".lock") as locked:
            return _load_or_build(folder, include_dir, locked)
    except OSError as err:
        raise _cache_error(err, folder) from err


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
