"""The tools restart themselves on jemalloc where it is installed, else on ppmoco's large-block
cache (ppmoco/host_allocator.py).

The runs on jemalloc need it installed (apt install libjemalloc2); without it they skip, unless
PPMOCO_REQUIRE_JEMALLOC=1 (set by CI) makes that a failure.
"""
import os
import re
import subprocess
import sys

import pytest

from ppmoco.errors import ConfigError
from ppmoco.host_allocator import (
    CHOICE,
    JEMALLOC_CONF,
    PRELOADED,
    find_jemalloc,
    loaded_allocator,
    preload_environment,
    preload_wanted,
)

from optional_deps import jemalloc_or_skip

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LIB = "/opt/lib/libjemalloc.so.2"
BUILT = "/cache/ppmoco/malloc/0123/libppmoco_large_blocks.so"


def found():
    return LIB


def not_found():
    return None


def built(environ):
    return BUILT


def build_fails(environ):
    raise ConfigError("ppmoco's large-block cache cannot be built: the C compiler 'cc' does not run")


@pytest.fixture(scope="module")
def jemalloc():
    return jemalloc_or_skip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_which_runs_restart_on_which_allocator(capsys):
    assert preload_wanted({}, found, built) == LIB
    assert preload_wanted({CHOICE: "jemalloc"}, found, built) == LIB
    assert preload_wanted({}, not_found, built) == BUILT  # auto: the large-block cache where jemalloc is missing
    assert preload_wanted({CHOICE: "large_blocks"}, found, built) == BUILT
    assert capsys.readouterr().err == ""
    # auto without either: glibc's malloc, said once; a chosen one missing: the one-line error.
    assert preload_wanted({}, not_found, build_fails) is None
    assert capsys.readouterr().err == ("warning: ppmoco's large-block cache cannot be built: the C compiler 'cc' "
                                       "does not run; this run uses the C library's malloc, with more memory "
                                       "(docs/performance.md, Memory)\n")
    with pytest.raises(ConfigError, match="large-block cache cannot be built"):
        preload_wanted({CHOICE: "large_blocks"}, found, build_fails)
    # Catches: the opt-out ignored; a restarted process restarting again (the mark unread); a
    # preload of the user's own allocator (ppmoco's included) replaced or doubled.
    assert preload_wanted({CHOICE: "system"}, found, built) is None
    assert preload_wanted({PRELOADED: LIB}, found, built) is None
    assert preload_wanted({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, found, built) is None
    assert preload_wanted({"LD_PRELOAD": BUILT}, not_found, built) is None
    assert preload_wanted({"LD_PRELOAD": "/opt/libfaketime.so"}, found, built) == LIB  # not an allocator
    with pytest.raises(ConfigError, match="PPMOCO_ALLOCATOR=jemalloc: no jemalloc library in .*apt install"):
        preload_wanted({CHOICE: "jemalloc"}, not_found, built)
    with pytest.raises(ConfigError, match="PPMOCO_ALLOCATOR='tcmalloc': expected one of auto, jemalloc, "
                                          "large_blocks, system"):
        preload_wanted({CHOICE: "tcmalloc"}, found, built)


def test_the_restart_environment_keeps_what_the_user_set():
    env = preload_environment({"PATH": "/bin"}, LIB)
    assert env == {"PATH": "/bin", "LD_PRELOAD": LIB, "MALLOC_CONF": JEMALLOC_CONF, PRELOADED: LIB}
    assert preload_environment({"PATH": "/bin"}, BUILT) == {"PATH": "/bin", "LD_PRELOAD": BUILT, PRELOADED: BUILT}
    # Catches: the user's preloads or jemalloc settings overwritten.
    env = preload_environment({"LD_PRELOAD": "/opt/libfaketime.so", "MALLOC_CONF": "narenas:2"}, LIB)
    assert env["LD_PRELOAD"] == f"{LIB} /opt/libfaketime.so" and env["MALLOC_CONF"] == "narenas:2"


def test_find_jemalloc_takes_the_first_folder_that_has_it(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    assert find_jemalloc([str(first), str(second)]) is None
    (second / "libjemalloc.so.2").write_bytes(b"")
    (first / "libjemalloc.so").write_bytes(b"")
    assert find_jemalloc([str(first), str(second)]) == str(first / "libjemalloc.so")


def test_loaded_allocator_reads_the_process_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f02-7f03 rw-p 00000000 00:00 0 [heap]\n7f04-7f05 r--p 00000000 00:00 0\n")
    assert loaded_allocator(str(maps)) == "the C library's"
    maps.write_text(maps.read_text() + "7f06-7f07 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert loaded_allocator(str(maps)) == "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    maps.write_text(maps.read_text().replace("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", BUILT))
    assert loaded_allocator(str(maps)) == BUILT
    assert loaded_allocator(str(tmp_path / "missing")) == "the C library's"


def test_a_bad_choice_is_a_one_line_error_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c",
                           os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml"), "-o",
                           f"Engine.save_load.output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, **{CHOICE: "tcmalloc"}))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: environment variable PPMOCO_ALLOCATOR='tcmalloc': expected one of auto, jemalloc, large_blocks, "
        "system"]
    assert not (tmp_path / "out").exists()


def _train(out, allocator):
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "MALLOC_CONF", PRELOADED)}
    env[CHOICE] = allocator
    proc = subprocess.run([sys.executable, "-u", os.path.join(ROOT, "tools", "train.py"), "-c",
                           os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml"), "-o",
                           f"Engine.save_load.output_dir={out}", "Engine.max_steps=3", "Engine.num_train_epochs=1",
                           "Engine.eval_freq=-1", "Data.Eval=null", "Engine.logging_freq=1",
                           "Data.Train.sampler.batch_size=32", "Model.model.K=256"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "train.log"), encoding="utf-8") as f:
        return f.read()


def _weights(run):
    return [(run / "step_3" / name).read_bytes() for name in ("model.pdparams", "optimizer.pdopt")]


@pytest.mark.slow
def test_training_restarts_on_the_large_block_cache_with_the_same_results(tmp_path):
    # Catches: the restart not happening (or without the arguments: another run), the opt-out
    # ignored, and any result that depends on where memory lies (a read of uninitialised memory, a
    # block handed out twice).
    log = _train(tmp_path / "large_blocks", "large_blocks")
    assert re.search(r"host memory allocator \(malloc\): \S+/ppmoco/malloc/\w+/libppmoco_large_blocks\.so", log)
    log = _train(tmp_path / "system", "system")
    assert "host memory allocator (malloc): the C library's" in log
    assert _weights(tmp_path / "large_blocks") == _weights(tmp_path / "system")


@pytest.mark.slow
def test_training_restarts_on_jemalloc_with_the_same_results(tmp_path, jemalloc):
    log = _train(tmp_path / "jemalloc", "auto")
    assert f"host memory allocator (malloc): {jemalloc}" in log
    _train(tmp_path / "system", "system")
    assert _weights(tmp_path / "jemalloc") == _weights(tmp_path / "system")
