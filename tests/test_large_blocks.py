"""ppmoco's large-block cache (ppmoco/large_blocks.c): built at first use, each malloc function
right under it (tests/large_blocks_client.py runs them in a process that preloads it), and its
build failures named with their fix."""
import os
import platform
import subprocess
import sys

import pytest

from ppmoco.errors import ConfigError
from ppmoco.host_allocator import LARGE_BLOCKS_NAME, build_large_blocks, large_blocks_directory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the cache runs on glibc's malloc")
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "large_blocks_client.py")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        path = build_large_blocks({})
    assert path == os.path.join(str(cache), "ppmoco", "malloc", os.path.basename(os.path.dirname(path)),
                                LARGE_BLOCKS_NAME)
    return path


def run_client(library, scenario, timeout=120):
    env = dict(os.environ, LD_PRELOAD=library)
    return subprocess.run([sys.executable, CLIENT, scenario], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("scenario", ["churn", "reuse", "calloc_after_reuse", "realloc", "alignment", "fork"])
def test_malloc_functions_under_the_cache(library, scenario):
    # Catches (each tried): blocks overlapping after a wrong split (churn's bytes, from 5 threads at
    # once: also a missing lock); no merge with either freed neighbour, first fit instead of best
    # fit, a free block at the top not grown, freed pages never reused (reuse's addresses, the
    # range growing with each round); calloc's memset dropped; realloc moving within its block;
    # alignments above a page served from the range; the fork handlers dropped (children forked
    # while threads allocate hang).
    proc = run_client(library, scenario)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("scenario, message", [("double_free", "free(): double free"),
                                               ("interior_pointer", "free(): invalid pointer")])
def test_a_bad_free_aborts_as_glibc_does(library, scenario, message):
    proc = run_client(library, scenario)
    assert proc.returncode == -6 and f"ppmoco large-block cache: {message}" in proc.stderr


def test_the_library_is_built_once_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    log = tmp_path / "compiles"
    compiler = tmp_path / "counting-cc"
    compiler.write_text(f'#!/bin/sh\necho >> "{log}"\nexec cc "$@"\n')
    compiler.chmod(0o755)
    first = build_large_blocks({"CC": str(compiler)})
    assert build_large_blocks({"CC": str(compiler)}) == first and log.read_text().count("\n") == 1
    # Another compiler builds its own copy; what a build leaves is the library alone.
    other = build_large_blocks({})
    assert other != first and os.path.dirname(other) == large_blocks_directory("cc")
    assert os.listdir(os.path.dirname(first)) == [LARGE_BLOCKS_NAME]


@pytest.mark.parametrize("case, expected", [
    ("no compiler", r"the C compiler '.*no-such-cc' does not run \(No such file or directory\): install one "
                    r"\(apt install gcc\) or name it in CC"),
    ("compile error", r"does not compile with '.*failing-cc' \(no headers here\): install gcc or clang, or name "
                      r"another compiler in CC"),
    ("cache not writable", r"its cache folder .* cannot be written \(Not a directory\): make it writable, or set "
                           r"XDG_CACHE_HOME to a writable folder"),
])
def test_a_failed_build_is_one_error_naming_the_fix(tmp_path, monkeypatch, case, expected):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = {}
    if case == "no compiler":
        env["CC"] = str(tmp_path / "no-such-cc")
    elif case == "compile error":
        failing = tmp_path / "failing-cc"
        failing.write_text("#!/bin/sh\necho 'no headers here' >&2\nexit 1\n")
        failing.chmod(0o755)
        env["CC"] = str(failing)
    else:
        (tmp_path / "cache").write_text("a file where the cache folder goes")
    with pytest.raises(ConfigError, match=expected) as caught:
        build_large_blocks(env)
    assert "\n" not in str(caught.value)
    if case != "cache not writable":  # no half-built library left behind
        folder = large_blocks_directory(env["CC"])
        assert os.listdir(folder) == []
