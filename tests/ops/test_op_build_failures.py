"""Whatever keeps the oneDNN convolution from being built or loaded is a one-line OpBuildError naming
the cause and the fix (so `Engine.conv: auto` falls back to Paddle's convolution with one warning);
the operator is compiled at most once per machine; importing ppmoco needs neither fcntl nor a handle
on the C library; a GPU run never builds it.

Nothing is compiled here: `Toolchain` stands in for Paddle's compile-and-load
(`paddle.utils.cpp_extension.load`) and for loading a library built before, in a cache under
tmp_path, against headers of the oneDNN version Paddle runs on. Each test names the mutation of
ppmoco/ops/conv.py (or the failure of ppmoco 0.9.0's) it catches.
"""
import errno
import os
import subprocess
import sys
import time
from collections import namedtuple

import pytest

from ppmoco import cli
from ppmoco.engine.env import RunEnv
from ppmoco.engine.step import conv_implementation
from ppmoco.errors import ConfigError
from ppmoco.ops import OpBuildError, conv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARY = b"\x7fELF the operator's library " * 64
# What Paddle raises when dlopen refuses a library (its first line; the rest is advice about CUDA).
PADDLE_DLOPEN_ERROR = ("(PreconditionNotMet) The third-party dynamic library ({}) that Paddle depends on is not "
                       "configured correctly. (error code is {}: undefined symbol: dnnl_brand_new)\n"
                       "  Suggestions:\n  1. Check if the third-party dynamic library (e.g. CUDA, CUDNN) ...")
COMPILE_ERROR = ("Failed to run command: <function compile at 0x7f>, errors: Command 'cd cache && python "
                 "ppmoco_onednn_conv_setup.py build' returned non-zero exit status 1.")


def write_headers(include, major, minor):
    """A stand-in for oneDNN's C++ headers of version major.minor in `include`."""
    folder = include / "oneapi" / "dnnl"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dnnl.hpp").write_text("")
    (folder / "dnnl_version.h").write_text(f"#define DNNL_VERSION_MAJOR {major}\n#define DNNL_VERSION_MINOR {minor}\n"
                                           "#define DNNL_VERSION_PATCH 1\n")


class Toolchain:
    """Paddle's compile-and-load and the loader of a built library, recording what they were asked."""

    def __init__(self, include):
        self.include = include
        self.compiles = 0
        self.compile_outcome = "ok"  # or "compile error", "load error", an OSError to raise
        self.load_errors = []  # what the next loads of a cached library raise
        self.loaded = []  # the library's bytes each load of a cached library saw

    @property
    def folder(self):
        return conv.build_directory(str(self.include))

    @property
    def library(self):
        return os.path.join(self.folder, conv.MODULE, conv.MODULE + ".so")

    def compile_and_load(self, name, build_directory, **kwargs):
        self.compiles += 1
        if isinstance(self.compile_outcome, OSError):
            raise self.compile_outcome
        if self.compile_outcome == "compile error":
            raise RuntimeError(COMPILE_ERROR)
        os.makedirs(os.path.dirname(self.library), exist_ok=True)
        with open(self.library, "wb") as f:
            f.write(LIBRARY)
        if self.compile_outcome == "load error":
            raise RuntimeError(PADDLE_DLOPEN_ERROR.format(self.library, self.library))
        return "fresh module"

    def load(self, built):
        with open(os.path.join(built, conv.MODULE + ".so"), "rb") as f:
            self.loaded.append(f.read())
        if self.load_errors:
            raise self.load_errors.pop(0)
        return "cached module"


@pytest.fixture
def toolchain(tmp_path, monkeypatch):
    include = tmp_path / "include"
    write_headers(include, *conv.paddle_onednn_version()[:2])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", sys.executable)  # any program: nothing is compiled
    monkeypatch.delenv("PADDLE_LOCAL_SIZE", raising=False)
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    monkeypatch.setattr(conv, "onednn_include_dir", lambda: str(include))
    fake = Toolchain(include)
    monkeypatch.setattr(conv, "_cpp_extension_load", fake.compile_and_load)
    monkeypatch.setattr(conv, "_load", fake.load)
    return fake


def build():
    return conv.onednn_conv_module.__wrapped__()  # uncached: the process's loaded module stays


def build_error():
    with pytest.raises(OpBuildError) as caught:
        build()
    message = str(caught.value)
    assert "\n" not in message
    return message


def _unwritable(case, toolchain, tmp_path, monkeypatch):
    """Make the cache fail as `case` says; returns what the message must name."""
    if case == "read-only cache":
        real = os.makedirs

        def makedirs(path, *args, **kwargs):
            if str(path).startswith(str(tmp_path / "cache")):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)
        monkeypatch.setattr(conv.os, "makedirs", makedirs)
        return "Read-only file system"
    if case == "cache under a file":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
        return "Not a directory"
    if case == "lock not creatable":
        os.makedirs(toolchain.folder + ".lock")  # a folder where the lock file goes
        return "Is a directory"
    if case == "full disk writing the build files":
        toolchain.compile_outcome = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                                            os.path.join(toolchain.folder, "ppmoco_onednn_conv_setup.py"))
        return "No space left on device"
    assert case == "full disk while compiling"  # the compiler's own error, with the disk nearly full
    toolchain.compile_outcome = "compile error"
    usage = namedtuple("usage", "total used free")(2 ** 40, 2 ** 40 - 2 ** 20, 2 ** 20)
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda path: usage)
    return "1 MB free"


@pytest.mark.parametrize("case", ["read-only cache", "cache under a file", "lock not creatable",
                                  "full disk writing the build files", "full disk while compiling"])
def test_an_unwritable_or_full_cache_names_the_cache_and_XDG_CACHE_HOME(toolchain, tmp_path, monkeypatch,
                                                                       caplog, capsys, case):
    # Catches: the cache's OSError not made an OpBuildError (ppmoco 0.9.0: os.makedirs and
    # open(lock) outside any try: the OSError escaped Engine.conv: auto, and the tools told the user
    # to fix Engine.save_load.output_dir); the full disk while compiling reported as a compile error.
    cause = _unwritable(case, toolchain, tmp_path, monkeypatch)
    message = build_error()
    assert cause in message and "XDG_CACHE_HOME" in message and "free disk space" in message, message
    monkeypatch.setattr("ppmoco.engine.step.onednn_conv_module", build)
    caplog.clear()
    assert conv_implementation("auto", RunEnv("cpu", 1, 0, 1, 1)) == "paddle"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "XDG_CACHE_HOME" in warnings[0], warnings
    with pytest.raises(ConfigError, match="Engine.conv: onednn: .*XDG_CACHE_HOME.*; or set Engine.conv: paddle"):
        conv_implementation("onednn", RunEnv("cpu", 1, 0, 1, 1))
    with pytest.raises(SystemExit) as exited:
        cli.run(lambda argv: build(), argv=[])
    assert exited.value.code == 2
    reported = capsys.readouterr().err.strip()
    assert "XDG_CACHE_HOME" in reported and "output_dir" not in reported and "\n" not in reported, reported


def test_a_compile_error_with_disk_to_spare_is_one_line_naming_the_source(toolchain):
    toolchain.compile_outcome = "compile error"
    message = build_error()
    assert f"building {conv.SOURCE} in {toolchain.folder} failed (the compiler's message is above)" in message
    assert message.endswith("is above): Command 'cd cache && python ppmoco_onednn_conv_setup.py build' returned "
                            "non-zero exit status 1."), message


def test_a_cached_library_that_does_not_load_is_built_again_once(toolchain, caplog):
    # Catches: the loader's error let out (ppmoco 0.9.0: a RuntimeError, not an OpBuildError, so
    # Engine.conv: auto failed), or no rebuild.
    assert build() == "fresh module" and toolchain.compiles == 1
    assert build() == "cached module" and toolchain.compiles == 1
    toolchain.load_errors = [RuntimeError(PADDLE_DLOPEN_ERROR.format(toolchain.library, toolchain.library))]
    assert build() == "fresh module" and toolchain.compiles == 2
    assert any("does not load" in r.getMessage() and "undefined symbol: dnnl_brand_new" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    assert build() == "cached module" and toolchain.compiles == 2


def test_a_library_that_does_not_load_after_its_rebuild_is_refused_and_not_built_again(toolchain):
    # Catches: building again and again (the failure not recorded: every process of every run would
    # compile), or a second rebuild in the same call.
    build()
    toolchain.load_errors = [RuntimeError(PADDLE_DLOPEN_ERROR.format(toolchain.library, toolchain.library))]
    toolchain.compile_outcome = "load error"
    message = build_error()
    assert toolchain.compiles == 2
    assert f"does not load ({toolchain.library}: undefined symbol: dnnl_brand_new)" in message, message
    assert f"then delete {toolchain.folder} to build it again" in message
    assert build_error() == message and toolchain.compiles == 2


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "build not finished"])
def test_a_damaged_library_is_built_again_without_being_loaded(toolchain, damage):
    # Loading a truncated library kills the process (SIGBUS in dlopen: the next test). Catches:
    # loading whatever library is in the cache (ppmoco 0.9.0), or trusting one without a record.
    build()
    data = LIBRARY[:100] if damage == "truncated" else LIBRARY[:-1] + b"?" if damage == "corrupt" else LIBRARY
    with open(toolchain.library, "wb") as f:
        f.write(data)
    if damage == "build not finished":  # the library linked, the process killed before the record
        os.remove(os.path.join(toolchain.folder, conv.RECORD))
    assert build() == "fresh module" and toolchain.compiles == 2
    assert build() == "cached module" and toolchain.compiles == 2
    assert toolchain.loaded == [LIBRARY], "a damaged library was loaded"


def test_a_truncated_library_in_the_cache_does_not_kill_the_process(tmp_path):
    # The real loader on half of a real shared library, whose build record is the whole one's. Catches
    # (as a crash by SIGBUS or an error, in a process of its own): loading the library unchecked.
    half = os.path.join(os.path.dirname(conv.paddle_libdnnl()), "libwarpctc.so")
    if not os.path.isfile(half):
        import _ctypes
        half = _ctypes.__file__
    write_headers(tmp_path / "include", *conv.paddle_onednn_version()[:2])
    code = ("import os, sys\nfrom ppmoco.ops import conv\n"
            "include, real = sys.argv[1:3]\nconv.onednn_include_dir = lambda: include\n"
            "folder = conv.build_directory(include)\nbuilt = os.path.join(folder, conv.MODULE)\n"
            "library = os.path.join(built, conv.MODULE + '.so')\nos.makedirs(built)\n"
            "data = open(real, 'rb').read()\nopen(library, 'wb').write(data)\n"
            "conv._write_record(folder, library)\nopen(library, 'wb').write(data[:len(data) // 2])\n"
            "def compile_and_load(name, build_directory, **kwargs):\n"
            "    os.makedirs(built, exist_ok=True)\n    open(library, 'wb').write(data)\n    return 'rebuilt'\n"
            "conv._cpp_extension_load = compile_and_load\nprint(conv.onednn_conv_module())\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CXX": sys.executable}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "include"), half], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["rebuilt"], (proc.returncode, proc.stderr[-3000:])


def test_headers_of_another_onednn_than_paddles_are_refused_before_anything_is_built(toolchain):
    # Catches: no version check (the operator compiled against other headers than the library it runs on).
    major, minor, patch = conv.paddle_onednn_version()
    write_headers(toolchain.include, major, minor + 1)
    message = build_error()
    assert (f"headers in {toolchain.include} are of oneDNN {major}.{minor + 1}, but Paddle runs oneDNN "
            f"{major}.{minor}.{patch} ({conv.paddle_libdnnl()}): {conv.headers_hint((major, minor))}") in message
    assert toolchain.compiles == 0 and not os.path.exists(conv.cache_root())
    (toolchain.include / "oneapi" / "dnnl" / "dnnl_version.h").write_text("#define DNNL_VERSION_PATCH 1\n")
    assert "names no oneDNN version" in build_error()


def test_paddles_onednn_version_is_read_from_its_library_and_matches_the_installed_headers():
    version = conv.paddle_onednn_version()
    assert len(version) == 3 and all(type(v) is int for v in version) and version[0] >= 3
    assert tuple(version[:2]) in conv.ONEDNN_DEVEL, "a new oneDNN in Paddle: add its onednn-devel release"
    assert conv.headers_hint(version) == f"pip install --no-deps onednn-devel=={conv.ONEDNN_DEVEL[version[:2]]}"
    assert "<its release of oneDNN 9.9>" in conv.headers_hint((9, 9))
    try:
        include = conv.onednn_include_dir()
    except OpBuildError:
        pytest.skip("oneDNN's C++ headers are not installed")
    assert conv.headers_version(include) == version[:2]


def test_a_paddle_without_a_readable_libdnnl_is_a_one_line_error(toolchain, tmp_path, monkeypatch):
    # Catches: the ctypes failure let out (ImportError, OSError, AttributeError), or a missing
    # library named as something else.
    monkeypatch.setattr(conv, "paddle_libdnnl", lambda: str(tmp_path / "libdnnl.so.3"))
    assert f"Paddle has none ({tmp_path / 'libdnnl.so.3'} is missing)" in build_error()
    import _ctypes  # a real library without dnnl_version()
    monkeypatch.setattr(conv, "paddle_libdnnl", lambda: _ctypes.__file__)
    assert "cannot read the oneDNN version of Paddle's" in build_error()
    monkeypatch.setitem(sys.modules, "ctypes", None)
    conv._library_version.cache_clear()
    monkeypatch.setattr(conv, "paddle_libdnnl", lambda: conv._paddle_dir() + "/libs/libdnnl.so.3")
    assert "cannot read the oneDNN version" in build_error()
    assert toolchain.compiles == 0


def test_without_fcntl_one_process_builds_unlocked_and_a_launch_loads_but_does_not_build(toolchain, monkeypatch):
    # Catches: fcntl imported unguarded (an ImportError, not an OpBuildError), or several processes
    # of a launch building into one folder unlocked.
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "2")
    message = build_error()
    assert "no file locks" in message and "2 start together" in message and "onednn_conv_module()" in message
    assert toolchain.compiles == 0
    monkeypatch.delenv("PADDLE_LOCAL_SIZE")
    assert build() == "fresh module" and toolchain.compiles == 1
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "2")
    assert build() == "cached module" and toolchain.compiles == 1


IMPORT_EVERY_MODULE = """
import importlib, os, sys
import ppmoco
root = os.path.dirname(ppmoco.__file__)
names = sorted('ppmoco' + os.path.join(folder, name)[len(root):-3].replace(os.sep, '.').replace('.__init__', '')
               for folder, _, files in os.walk(root) for name in files if name.endswith('.py'))
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f'{name}: {err!r}')
print(len(names), 'modules;', 'failed:', failed)
"""
NO_FCNTL = "import sys\nsys.modules['fcntl'] = None  # as on Windows\n"
NO_C_LIBRARY = """
import ctypes
class CDLL(ctypes.CDLL):  # as where Python has no handle on the C library (ctypes.CDLL(None) fails on Windows)
    def __init__(self, name, *args, **kwargs):
        if name is None or 'libc.' in str(name):
            raise OSError('no handle on the C library here')
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = CDLL
"""


@pytest.mark.parametrize("prelude", [NO_FCNTL, NO_C_LIBRARY], ids=["no fcntl", "no C library handle"])
def test_every_ppmoco_module_imports_without_fcntl_or_a_handle_on_the_c_library(prelude):
    # Catches: `import fcntl` at the top of ppmoco/ops/conv.py (ppmoco 0.9.0), `import ctypes` there
    # or a ctypes.CDLL(None) run at import (ppmoco/inference.py).
    proc = subprocess.run([sys.executable, "-c", prelude + IMPORT_EVERY_MODULE], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("failed: []"), proc.stdout


CONCURRENT_PROCESS = """
import os, sys, time
from ppmoco.ops import conv
include, log, go = sys.argv[1:4]
conv.onednn_include_dir = lambda: include
def compile_and_load(name, build_directory, **kwargs):
    with open(log, 'a') as f:
        f.write(f'{os.getpid()}\\n')
    time.sleep(1)  # a compile takes a while: the others arrive meanwhile
    built = os.path.join(build_directory, name)
    os.makedirs(built, exist_ok=True)
    with open(os.path.join(built, name + '.so'), 'wb') as f:
        f.write(b'library')
    return 'built'
conv._cpp_extension_load = compile_and_load
conv._load = lambda built: 'loaded'
open(f'{go}.{os.getpid()}', 'w').close()
while not os.path.exists(go):
    time.sleep(0.01)
print(conv.onednn_conv_module())
"""


def test_processes_starting_together_compile_the_operator_once(tmp_path):
    # Three processes ask for the operator at once. Catches: the build lock not taken (each compiles).
    write_headers(tmp_path / "include", *conv.paddle_onednn_version()[:2])
    log, go = tmp_path / "compiles.log", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": ROOT, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CXX": sys.executable}
    for name in ("PADDLE_LOCAL_SIZE", "PADDLE_TRAINERS_NUM"):
        env.pop(name, None)
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_PROCESS, str(tmp_path / "include"), str(log), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    try:
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("go.*"))) < 3 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
            time.sleep(0.05)
        go.write_text("")
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    assert sorted(out.split()[-1] for out, _ in outputs) == ["built", "loaded", "loaded"]
    assert len(log.read_text().split()) == 1


@pytest.mark.parametrize("setting", ["auto", "onednn"])
def test_a_gpu_run_never_builds_the_operator(monkeypatch, setting):
    # Catches: conv_implementation building (or loading) the operator whatever the device.
    def module():
        raise AssertionError("the oneDNN convolution was built for a GPU run")
    monkeypatch.setattr("ppmoco.engine.step.onednn_conv_module", module)
    assert conv_implementation(setting, RunEnv("gpu", 1, 0, 1, 1)) == "paddle"
