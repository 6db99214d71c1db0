"""Two runs, one output_dir: the second refuses in one line naming the holder; a stale lock is taken over."""
import json
import os
import socket
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.engine.lock import LOCK_NAME, OutputDirInUse, OutputDirLock, process_start  # noqa: E402

from fault_helpers import assert_user_error, run, run_train  # noqa: E402


@pytest.fixture
def sleeper():
    """A live process of this host to name as a lock's holder."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def holder(pid, **changes):
    return dict({"host": socket.gethostname(), "pid": pid, "start": process_start(pid), "time": 0.0,
                 "command": "tools/train.py -c other.yaml"}, **changes)


def write_lock(folder, info):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_NAME), "w", encoding="utf-8") as f:
        f.write(info if isinstance(info, str) else json.dumps(info))


def test_a_live_holder_is_refused_and_its_lock_survives(tmp_path, sleeper):
    # Catches a lock that is only checked for existence by pid (the sleeper is alive), a second run
    # that removes or overwrites the holder's lock on its way out, and an unnamed holder.
    write_lock(tmp_path, holder(sleeper.pid))
    with pytest.raises(OutputDirInUse, match=rf"is in use by the run of pid {sleeper.pid} on "
                                             rf"{socket.gethostname()} since .* \(tools/train.py -c other.yaml\); "
                                             rf"wait for it, .* or delete .*{LOCK_NAME} if that run is gone"):
        OutputDirLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sleeper.pid


@pytest.mark.parametrize("stale", [
    lambda pid: holder(pid),  # the process is gone
    lambda pid: holder(os.getpid(), start=-1),  # the pid lives on in a process started at another time
    lambda pid: '{"host": "node-b", "pi',  # damaged (written whole by design): names no process
])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, stale, caplog):
    # Catches a run refused forever after a kill -9 of the holder, and a recycled pid read as the holder.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, stale(gone.pid))
    lock = OutputDirLock(str(tmp_path))
    with lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock.info
    assert "took over the lock" in caplog.text and not (tmp_path / LOCK_NAME).exists()
    assert sorted(os.listdir(tmp_path)) == []  # no aside or stale copy left behind


def test_a_lock_from_another_host_is_respected(tmp_path):
    # Catches a pid checked on the wrong machine (pid 1 exists here, and a gone pid would read as stale).
    write_lock(tmp_path, holder(1, host="node-b"))
    with pytest.raises(OutputDirInUse, match="pid 1 on node-b"):
        OutputDirLock(str(tmp_path)).acquire()


def test_release_leaves_another_runs_lock(tmp_path):
    # Catches release() deleting whatever lock is there: a run whose lock was taken over as stale must
    # not delete its successor's.
    lock = OutputDirLock(str(tmp_path)).acquire()
    write_lock(tmp_path, holder(1))
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 1


@pytest.mark.slow
def test_train_refuses_a_folder_in_use_and_writes_nothing_there(tmp_path, sleeper):
    # Catches the lock taken after the log or checkpoints are written (the second run's lines would
    # land in the first run's train.log), evaluation tools taking the lock, and a kill -9'd run's
    # lock blocking the folder for good.
    out = tmp_path / "run"
    write_lock(out, holder(sleeper.pid))
    (out / "train.log").write_text("the first run's log\n")
    proc = run_train(out, "Engine.max_steps=1", expect=2)
    assert_user_error(proc, f"is in use by the run of pid {sleeper.pid}")
    assert sorted(os.listdir(out)) == [LOCK_NAME, "train.log"]
    assert (out / "train.log").read_text() == "the first run's log\n"
    evaluation = run([sys.executable, "tools/eval.py", "-c", "configs/moco_lincls_digits_1n2c.yaml", "-o",
                      f"Engine.save_load.output_dir={out}", "-o", "Eval.protocol=knn", "-o",
                      "Model.model.base_encoder.pretrained=null", "-o", "Model.model.base_encoder.widths=[8,16,16,16]"])
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    sleeper.kill()
    sleeper.wait()
    proc = run_train(out, "Engine.max_steps=1")
    assert "took over the lock" in proc.stdout + proc.stderr and not (out / LOCK_NAME).exists()
    assert (out / "step_1").is_dir()
