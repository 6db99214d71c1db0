"""A rank that hangs (here: reading a FIFO no one writes, like a stuck network file system) ends the run
within Engine.hang_timeout, and its own line names it; the rank waiting for it says it waits."""
import os
import re
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.engine.watchdog import EXIT_HUNG, Watchdog, where  # noqa: E402

from fault_helpers import ROOT, TRAIN, launch_cmd, save_rgb, train_args, worker_logs  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_overdue_only_after_the_timeout_and_never_while_paused():
    # Catches a watchdog that fires during an evaluation or a checkpoint write (paused), one that
    # never fires, and a pause that leaves the quiet time running (a step right after would be overdue).
    clock = Clock()
    dog = Watchdog(10, rank=1, clock=clock)
    clock.now = 9.0
    assert dog.overdue() is None
    clock.now = 11.0
    assert dog.overdue() == 11.0
    with dog.paused():
        clock.now = 500.0
        assert dog.overdue() is None
    assert dog.overdue() is None
    dog.beat()
    clock.now = 520.0
    assert dog.overdue() == 10.0 + 10.0
    assert Watchdog(0, rank=0, clock=clock).overdue() is None


def test_the_report_tells_a_hanging_rank_from_one_waiting_in_a_collective():
    # Catches a report that names no place, or calls every rank the one that hangs.
    def stuck():
        time.sleep(5)

    thread = threading.Thread(target=stuck, daemon=True)
    thread.start()
    time.sleep(0.2)
    frame = sys._current_frames()[thread.ident]
    spot, in_collective = where(frame)
    assert re.fullmatch(r".*test_hang_watchdog.py:\d+ in stuck", spot) and not in_collective
    assert re.fullmatch(r"rank 1 made no progress for 12 s \(Engine.hang_timeout 10 s\), stuck outside any "
                        r"collective: this rank hangs, at .*test_hang_watchdog.py:\d+ in stuck; stopping",
                        Watchdog(10, rank=1).report(12.0, frame))


def test_a_rank_blocked_inside_paddles_collectives_is_reported_as_waiting():
    # Catches every stuck rank reported as the one that hangs (the waiting ranks would accuse themselves).
    namespace = {}
    code = "import time\ndef all_reduce():\n    time.sleep(5)\n"
    exec(compile(code, os.path.join(os.sep, "x", "paddle", "distributed", "collective.py"), "exec"), namespace)
    thread = threading.Thread(target=namespace["all_reduce"], daemon=True)
    thread.start()
    time.sleep(0.2)
    report = Watchdog(10, rank=0).report(12.0, sys._current_frames()[thread.ident])
    assert "rank 0 made no progress for 12 s (Engine.hang_timeout 10 s), waiting in a collective for another rank" \
        in report


@pytest.mark.slow
def test_a_rank_stuck_reading_ends_the_run_and_names_itself(tmp_path):
    # Catches a hang that lasts until gloo's 30 s timeout (with its traceback naming no rank) or
    # forever, and a watchdog armed only after the first step (rank 1 hangs on its first batch).
    images = tmp_path / "images"
    for i in range(16):
        save_rgb(images / f"{i:02d}.png", seed=i)
    os.remove(images / "01.png")
    os.mkfifo(images / "01.png")  # sample 1: rank 1's first image (unshuffled, 2 ranks)
    (tmp_path / "list.txt").write_text("".join(f"{i:02d}.png 0\n" for i in range(16)))
    out, logs = tmp_path / "run", tmp_path / "logs"
    overrides = ["Data.Train.dataset.root=null", f"Data.Train.dataset.image_root={images}",
                 f"Data.Train.dataset.cls_label_path={tmp_path / 'list.txt'}", "Data.Train.dataset.builtin=null",
                 "Data.Train.sampler.shuffle=false", "Data.Train.sampler.batch_size=4", "Model.model.K=16",
                 "Data.Eval=null", "Engine.hang_timeout=5", "Engine.max_steps=2"]
    start = time.monotonic()
    proc = subprocess.run(launch_cmd(logs, "--nproc_per_node", "2", TRAIN, *train_args(out, *overrides)),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    text = worker_logs(logs)
    assert proc.returncode != 0 and took < 60, (took, text[-3000:])
    assert re.search(r"error: rank 1 made no progress for \d+ s \(Engine.hang_timeout 5 s\), stuck outside any "
                     r"collective: this rank hangs, at .*; stopping", text), text[-3000:]
    # Which exit code the launcher prints is a race: rank 0's collective fails as soon as rank 1 is gone,
    # and under load the launcher may see rank 0 first. The code itself: the test below.


def test_the_watchdog_ends_its_process_with_exit_hung_and_says_why():
    # Catches a watchdog that logs but leaves the process hanging, or ends it with a code the
    # launcher cannot tell from a crash.
    code = ("import time\nfrom ppmoco.engine.watchdog import Watchdog\n"
            "with Watchdog(0.5, rank=1):\n    time.sleep(30)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == EXIT_HUNG and time.monotonic() - start < 20, (proc.returncode, proc.stderr)
    assert re.search(r"error: rank 1 made no progress for \d+ s \(Engine.hang_timeout 0.5 s\), stuck outside any "
                     r"collective: this rank hangs, at <string>:4 in <module>; stopping", proc.stderr), proc.stderr
