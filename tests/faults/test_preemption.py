"""Preemption: SIGTERM / SIGINT / SIGUSR1 stop training at a step boundary with a checkpoint, exit 75,
and auto_resume continues bit-identically; every rank stops at the same step."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.engine.checkpoint import check_complete  # noqa: E402
from ppmoco.engine.preemption import EXIT_PREEMPTED  # noqa: E402

from fault_helpers import (  # noqa: E402
    ROOT,
    TRAIN,
    assert_same_weights,
    checkpoints,
    describe,
    launch_cmd,
    run_train,
    train_args,
    train_cmd,
    wait_until,
    worker_logs,
)

pytestmark = pytest.mark.slow
STEPS = 12
COMMON = (f"Engine.max_steps={STEPS}", "Engine.save_load.auto_resume=true")


def steps_logged(out):
    log = out / "train.log"
    return len(re.findall(r"\[train\] epoch", log.read_text())) if log.exists() else 0


def start(out, *overrides):
    return subprocess.Popen(train_cmd(out, *COMMON, *overrides), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def losses(out):
    """The loss of every step in the run's log (logging_freq 1), in order."""
    return [float(x) for x in re.findall(r"\[train\] .*?loss: ([-\d.e+]+)", (out / "train.log").read_text())]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train(out, *COMMON)
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_at_the_step_and_resume_equals_an_uninterrupted_run(tmp_path, straight, signum):
    # Catches a signal that kills the run (default action: no checkpoint, exit -15), a checkpoint of
    # the wrong position (resume would redo or skip a batch: the weights differ), an exit code a
    # requeue script cannot tell from a crash, and loader workers dying of the signal (2 here, signalled
    # too): Paddle then raises in the training process mid-step, before any checkpoint.
    out = tmp_path / "run"
    proc = start(out, "Data.Train.loader.num_workers=2")
    wait_until(proc, lambda: steps_logged(out) >= 3, "three steps")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    for pid in [proc.pid, *map(int, workers)]:  # as Slurm signals every process of a job step
        os.kill(pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stdout[-2000:] + stderr[-2000:]
    stopped = re.search(rf"error: stopped by {signum.name} after step (\d+): saved (\S+); run the same command "
                        r"with -o Engine.save_load.auto_resume=true to continue$", stderr.strip())
    assert stopped, stderr[-2000:]
    step = int(stopped.group(1))
    assert 3 <= step < STEPS and stopped.group(2) == str(out / f"step_{step}")
    check_complete(str(out / f"step_{step}"))
    assert (out / "latest").read_text().strip() == f"step_{step}"
    resumed = run_train(out, *COMMON)
    assert f"resumed from {out / f'step_{step}'}" in resumed.stdout + resumed.stderr
    assert_same_weights(straight / f"step_{STEPS}", out / f"step_{STEPS}")
    assert losses(out)[-(STEPS - step):] == losses(straight)[step:]  # each resumed step logged the same loss


def test_a_second_signal_stops_at_once_and_leaves_only_whole_checkpoints(tmp_path):
    # Catches a handler that swallows every further signal (Ctrl-C twice must end the run) and a
    # checkpoint left half-written by it (resume would then fail or load garbage).
    out = tmp_path / "run"
    proc = start(out, "Engine.save_load.save_steps=1")
    wait_until(proc, lambda: steps_logged(out) >= 3, "three steps")
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    for name in checkpoints(out):
        check_complete(str(out / name))
    resumed = run_train(out, *COMMON)
    assert "resumed from" in resumed.stdout + resumed.stderr and (out / f"step_{STEPS}").is_dir()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # Catches ranks that decide alone: the signalled rank would leave and the other wait in its next
    # collective until gloo times out, or rank 0 would save a step the other rank never finished.
    # Several ranks agree about every CHECK_SECONDS, not after every step: enough steps to stop within.
    out, logs = tmp_path / "run", tmp_path / "logs"
    cmd = launch_cmd(logs, "--nproc_per_node", "2", TRAIN,
                     *train_args(out, *COMMON, "Engine.max_steps=1000", "Data.Train.sampler.batch_size=16",
                                 "Model.model.K=128"))
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(launcher, lambda: steps_logged(out) >= 3, "three steps")
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [pid for pid in workers if "PADDLE_TRAINER_ID=1\0" in open(f"/proc/{pid}/environ").read()]
    assert len(workers) == 2 and len(rank1) == 1, workers
    os.kill(int(rank1[0]), signal.SIGUSR1)
    output, _ = launcher.communicate(timeout=180)
    assert launcher.returncode != 0, output[-2000:]
    text = worker_logs(logs)
    steps = re.findall(r"error: stopped by (SIGUSR1|a stop signal on another rank) after step (\d+)", text)
    assert sorted(name for name, _ in steps) == ["SIGUSR1", "a stop signal on another rank"], text[-3000:]
    assert steps[0][1] == steps[1][1]
    check_complete(str(out / f"step_{steps[0][1]}"))
    assert (out / "latest").read_text().strip() == f"step_{steps[0][1]}", describe(launcher)


def test_a_repeated_sigterm_or_sigusr1_is_ignored_and_a_second_ctrl_c_stops_at_once():
    # Catches a repeated SIGTERM (the launcher's three, Slurm's and the launcher's) taken for a second Ctrl-C:
    # the process would die before the step its ranks agree on, without its checkpoint.
    code = ("import os, signal, time\nfrom ppmoco.engine.preemption import StopSignals\n"
            "with StopSignals() as stop:\n"
            "    for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM):\n"
            "        os.kill(os.getpid(), signum)\n"
            "        time.sleep(0.05)\n"
            "    print('still running after', stop.received, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(10)\n"
            "print('not stopped')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout == "still running after SIGTERM\n" and proc.returncode != 0, describe(proc)


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    # paddle.distributed.launch passes a SIGTERM on to its processes up to three times, 0.2 s apart (and Slurm
    # signals them itself besides). Catches a repeated SIGTERM taken for a second Ctrl-C: the processes would
    # die before the step they agree on, without the checkpoint, and the launcher would not exit with 15.
    out, logs = tmp_path / "run", tmp_path / "logs"
    cmd = launch_cmd(logs, "--nproc_per_node", "2", TRAIN,
                     *train_args(out, *COMMON, "Engine.max_steps=1000",
                                 "Model.model.base_encoder.widths=[32,64,64,64]"))
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(launcher, lambda: steps_logged(out) >= 3, "three steps")
    launcher.send_signal(signal.SIGTERM)  # in a step of about 0.5 s: the second SIGTERM comes before its end
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == signal.SIGTERM, output[-2000:]
    text = worker_logs(logs)
    steps = re.findall(r"error: stopped by (?:SIGTERM|a stop signal on another rank) after step (\d+)", text)
    assert len(steps) == 2 and steps[0] == steps[1], text[-3000:]
    check_complete(str(out / f"step_{steps[0]}"))
    assert (out / "latest").read_text().strip() == f"step_{steps[0]}"


def test_ranks_agree_on_each_stop_check_without_a_collective_every_step(tmp_path):
    # StopSignals alone in two real processes (stop_signals_worker.py), 2 ms steps, rank 1 signalled at
    # step SIGNAL_AT. Catches: a collective after every step (on a GPU run its .item() drains the GPU's
    # queue each step); ranks checking on steps of their own (a rank's check then meets the other's next
    # one: the ranks stop at different steps, or one waits forever); checks so rare that a signal waits
    # past the grace period; and, when the default group is NCCL, the flag sent through it (a GPU tensor
    # read back every check) instead of a gloo group.
    logs = tmp_path / "logs"
    cmd = launch_cmd(logs, "--nproc_per_node", "2", os.path.join(ROOT, "tests", "faults", "stop_signals_worker.py"),
                     str(tmp_path))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-2000:] + worker_logs(logs)[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for run in ("gloo", "nccl"):
        a, b = r0[run], r1[run]
        assert a["collectives"] == b["collectives"] and a["stopped"] == b["stopped"], (run, a, b)
        assert (a["received"], b["received"]) == ("a stop signal on another rank", "SIGUSR1")
        assert a["collectives"][0] == 1 and a["collectives"][-1] == a["stopped"] >= 200
        assert len(a["collectives"]) == a["checks"] <= a["stopped"] / 5, (run, a["collectives"])
        assert b["latency"] < 1.0, (run, b)
    assert r0["gloo"]["groups"] == ["default"]
    assert len(r0["nccl"]["groups"]) == 1 and r0["nccl"]["groups"][0].lower().startswith("gloo:")
    assert r0["nccl"]["groups"] != ["default"]
