"""Promise 1: kill -9 at random moments, including inside a checkpoint write, then rerun the same
command with auto_resume until it finishes: the result is bit-identical to an uninterrupted run."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import paddle
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fault_helpers import (  # noqa: E402
    CHECKPOINT_FILES,
    ROOT,
    assert_same_weights,
    checkpoints,
    load_weights,
    run_train,
    train_cmd,
    wait_until,
)

pytestmark = pytest.mark.slow

STEPS = 16
# The one command every attempt runs: a checkpoint after every step, none rotated away.
COMMON = (f"Engine.max_steps={STEPS}", "Engine.save_load.save_steps=1", "Engine.save_load.keep_last=0",
          "Engine.save_load.auto_resume=true")
# Each killed attempt first saves a checkpoint of its own (so every attempt makes progress), then
# is killed in the middle of its next checkpoint write, or after a random delay (fixed seed).
KILLS = ("during_save", "random", "during_save", "random", "random")


def _saved(out):
    return (out / "train.log").read_text().count("saved checkpoint") if (out / "train.log").exists() else 0


def _writing(out, pid):
    """Temporary checkpoint folders process `pid` is writing (`.tmp-<name>-<pid>`)."""
    return [n for n in os.listdir(out) if n.startswith(".tmp-") and n.endswith(f"-{pid}")]


def _progress(proc, out):
    """Wait until this attempt has saved a checkpoint of its own, so every attempt moves on."""
    before = _saved(out)
    wait_until(proc, lambda: _saved(out) > before, "a new checkpoint")


def _kill_during_save(proc, out):
    """SIGSTOP the run while it writes a checkpoint folder, then SIGKILL it; return that folder."""
    while True:
        wait_until(proc, lambda: _writing(out, proc.pid), "a checkpoint write")
        os.kill(proc.pid, signal.SIGSTOP)
        frozen = _writing(out, proc.pid)
        if frozen:  # still mid-write: stopped before its rename
            os.kill(proc.pid, signal.SIGKILL)
            return frozen[0]
        os.kill(proc.pid, signal.SIGCONT)  # renamed in between; catch the next one


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train(out, *COMMON)
    return out


def test_kill9_repeatedly_then_resume_equals_uninterrupted_run(tmp_path, straight):
    out = tmp_path / "run"
    rng = random.Random(20240)
    expected_resumes, left_behind = [], []
    for kind in KILLS:
        with open(tmp_path / "attempt.log", "a") as log:
            proc = subprocess.Popen(train_cmd(out, *COMMON), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            _progress(proc, out)
            if kind == "during_save":
                left_behind.append(_kill_during_save(proc, out))
                assert (out / left_behind[-1]).is_dir()  # the kill really left a half-written checkpoint
            else:
                time.sleep(rng.uniform(0.0, 0.4))
                os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        expected_resumes.append((out / "latest").read_text().strip())
    run_train(out, *COMMON)

    log = (out / "train.log").read_text()
    resumed = [os.path.basename(p) for p in re.findall(r"resumed from (\S+):", log)]
    assert resumed == expected_resumes  # each attempt went on from the newest complete checkpoint
    assert not [n for n in resumed if n.startswith(".")]
    assert len(set(resumed)) == len(resumed) and resumed == sorted(resumed, key=lambda n: int(n[5:]))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]  # cleaned by the next save

    assert (out / "latest").read_text().strip() == f"step_{STEPS}"
    assert_same_weights(straight / f"step_{STEPS}", out / f"step_{STEPS}")
    assert checkpoints(out) == checkpoints(straight) == sorted(f"step_{s}" for s in range(1, STEPS + 1))
    for name in checkpoints(out):  # every checkpoint left is complete, loadable and right
        folder = out / name
        assert sorted(os.listdir(folder)) == sorted(CHECKPOINT_FILES)
        paddle.load(str(folder / "optimizer.pdopt"))
        state = json.loads((folder / "trainer_state.json").read_text())
        assert json.loads((folder / "meta.json").read_text())["global_step"] == state["global_step"]
        assert load_weights(folder).keys() == load_weights(straight / name).keys()
        assert_same_weights(straight / name, folder)
