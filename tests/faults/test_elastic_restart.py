"""Restarts in place by paddle.distributed.launch (`--elastic_level 1 --max_restart 3`, one node, a real etcd
server on loopback as its master: without one the launcher runs a job once). A rank killed with SIGKILL
mid-epoch, or one that fails once, makes the launcher restart the job, which goes on by itself (auto_resume
off) from its newest checkpoint and ends with the weights of a run stopped at that checkpoint and resumed by
hand, bit for bit; a rank that fails in the same step every time ends the restarts with one line."""
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from etcd_helpers import (  # noqa: E402
    attempts,
    before_restart,
    elastic_launch_cmd,
    etcd_or_skip,
    etcd_server,
    launcher_env,
    restart_line,
    stepped_after_restart,
    steps_logged,
    stop_launch,
    stopped_at,
)
from fault_helpers import (  # noqa: E402
    ROOT,
    SMALL_DATA,
    TRAIN,
    assert_same_weights,
    checkpoints,
    describe,
    launch_cmd,
    run,
    save_rgb,
    train_args,
    training_pids,
    wait_until,
    worker_logs,
)

pytestmark = pytest.mark.slow

STEPS, SAVE, MAX_RESTART = 12, 4, 3
# auto_resume stays off: a restart goes on from its job's checkpoints by itself.
COMMON = (f"Engine.max_steps={STEPS}", f"Engine.save_load.save_steps={SAVE}", "Engine.save_load.keep_last=0")
LAUNCH_BOUND_S = 300  # a whole launch, restarts included (about 40 s here)
# The image folder: 2 ranks x 8 images per step, in list order (no shuffle), 12 steps in one epoch.
IMAGES, BATCH, BAD_STEP = 2 * 8 * STEPS, 8, 7
BAD_INDEX = (BAD_STEP - 1) * BATCH * 2 + 1  # rank 1's first image of step 7: rank r reads positions r, r + 2, ...


@pytest.fixture(autouse=True)
def _etcd_present():
    etcd_or_skip()


def start_elastic(tmp_path, master, out, *overrides, max_restart=MAX_RESTART, preexec_fn=None):
    log = open(tmp_path / "launch.out", "w")
    cmd = elastic_launch_cmd(tmp_path / "logs", master, TRAIN, *train_args(out, *COMMON, *overrides),
                             max_restart=max_restart)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=preexec_fn)
    log.close()
    return proc


def plain_launch(tmp_path, name, out, *overrides):
    """Two processes as `paddle.distributed.launch` runs them without a master: one run, no restart."""
    proc = run(launch_cmd(tmp_path / f"{name}_logs", "--nproc_per_node", "2", TRAIN, *train_args(out, *COMMON,
                                                                                                  *overrides)))
    assert proc.returncode == 0, describe(proc) + worker_logs(tmp_path / f"{name}_logs")[-3000:]
    return out


def resumed_by_hand(tmp_path, straight, checkpoint, *overrides):
    """A run stopped at `straight`'s `checkpoint` (a copy of it) and resumed by hand with auto_resume."""
    out = stopped_at(straight, checkpoint, tmp_path / "by_hand")
    plain_launch(tmp_path, "by_hand", out, "Engine.save_load.auto_resume=true", *overrides)
    assert f"resumed from {out / checkpoint}:" in (out / "train.log").read_text()
    return out


def assert_no_preemption_or_hang(out, tmp_path):
    """The launcher ends the survivors of a failed attempt with SIGTERM: they write no preemption checkpoint
    and stop with no preemption or watchdog line."""
    steps = [name for name in checkpoints(out) if name.startswith("step_")]
    assert steps == sorted(f"step_{s}" for s in range(SAVE, STEPS + 1, SAVE)), checkpoints(out)
    logs = worker_logs(tmp_path / "logs")
    assert "error: stopped by" not in logs and "made no progress" not in logs


@pytest.fixture(scope="module")
def straight_digits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight_digits")
    return plain_launch(tmp, "straight", tmp / "run")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_is_restarted_and_the_job_goes_on_from_its_newest_checkpoint(tmp_path, straight_digits, rank):
    # Catches a restart that starts afresh (auto_resume is off: it would overwrite the job's checkpoints, and
    # its weights differ), one refused by the lock of the killed rank 0, one that goes on from anything but the
    # newest checkpoint, survivors that write a preemption checkpoint when the launcher stops them, and a
    # launch that gives up instead of restarting.
    out = tmp_path / "run"
    with etcd_server(tmp_path / "etcd") as master:
        proc = start_elastic(tmp_path, master, out)
        try:
            wait_until(proc, lambda: steps_logged(out) >= SAVE + 2, f"{SAVE + 2} steps", timeout=180, poll=0.005)
            pid = next(p for p, r in training_pids(out).items() if r == rank)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_until(proc, lambda: stepped_after_restart(out), "a step after the restart", timeout=180, poll=0.01)
            recovery = time.monotonic() - killed
            code = proc.wait(timeout=LAUNCH_BOUND_S)
        finally:
            stop_launch(proc, out)
    launcher = (tmp_path / "launch.out").read_text(errors="replace")
    assert code == 0, launcher[-3000:] + worker_logs(tmp_path / "logs")[-3000:]
    assert re.search(rf"Container rank {rank} status failed .* code -9", launcher)
    newest, done = before_restart(out)
    assert restart_line(out, 1) == newest and restart_line(out, 2) is None
    lost = done - int(newest.rsplit("_", 1)[1])
    # At most the checkpoint interval: none when the kill follows a save, SAVE when it lands in one (on a
    # loaded machine the kill can come steps after SAVE + 2).
    assert 0 <= lost <= SAVE
    print(f"\nSIGKILL of rank {rank} after step {done}: first step of the restart {recovery:.1f} s after the kill, "
          f"{lost} step(s) lost (done again)")
    assert [len(a["failures"]) for a in attempts(out)][1:] == [0]  # the restart itself did not fail
    assert_no_preemption_or_hang(out, tmp_path)
    by_hand = resumed_by_hand(tmp_path, straight_digits, os.path.basename(newest))
    assert_same_weights(by_hand / f"step_{STEPS}", out / f"step_{STEPS}")
    assert_same_weights(straight_digits / f"step_{STEPS}", out / f"step_{STEPS}")


def image_list(root):
    """IMAGES random images of 32 px in `root` and their list file (label 0), in reading order."""
    for i in range(IMAGES):
        save_rgb(root / f"{i:03d}.png", seed=i)
    (root / "list.txt").write_text("".join(f"{i:03d}.png 0\n" for i in range(IMAGES)))
    return root


def list_data(root):
    return (*SMALL_DATA, "Data.Train.dataset.root=null", f"Data.Train.dataset.image_root={root}",
            f"Data.Train.dataset.cls_label_path={root / 'list.txt'}", "Data.Train.sampler.shuffle=false",
            f"Data.Train.sampler.batch_size={BATCH}")


@pytest.fixture(scope="module")
def straight_images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight_images")
    images = image_list(tmp / "images")
    return images, plain_launch(tmp, "straight", tmp / "run", *list_data(images))


def broken_copy(tmp_path, source):
    """A copy of the images in `source` under tmp_path/images in which the image rank 1 reads in step
    BAD_STEP is bytes that are no image: (the copy, that image's path, its good bytes)."""
    images = tmp_path / "images"
    shutil.copytree(source, images)
    bad = images / f"{BAD_INDEX:03d}.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not an image\n")
    return images, bad, good


def test_a_rank_that_fails_once_is_restarted_and_the_job_goes_on(tmp_path, straight_images):
    # The image rank 1 reads in step 7 cannot be read until the launcher has seen the failure (a file being
    # rewritten, a storage hiccup). Catches the failing rank's cause or step left unrecorded, a restart that
    # starts afresh or from the wrong checkpoint, and a restart stopped as a repeated failure after one.
    source, straight = straight_images
    images, bad, good = broken_copy(tmp_path, source)
    out = tmp_path / "run"
    with etcd_server(tmp_path / "etcd") as master:
        proc = start_elastic(tmp_path, master, out, *list_data(images))
        try:
            wait_until(proc, lambda: f"cannot decode image {bad}" in worker_logs(tmp_path / "logs"),
                       "rank 1's failure", timeout=180, poll=0.01)
            bad.write_bytes(good)
            code = proc.wait(timeout=LAUNCH_BOUND_S)
        finally:
            stop_launch(proc, out)
    launcher = (tmp_path / "launch.out").read_text(errors="replace")
    assert code == 0, launcher[-3000:] + worker_logs(tmp_path / "logs")[-3000:]
    assert restart_line(out, 1) == str(out / "step_4") and restart_line(out, 2) is None
    first, restart = attempts(out)
    rank1 = [f for f in first["failures"] if f["rank"] == 1]
    assert [(f["step"], f["resumed"]) for f in rank1] == [(BAD_STEP, None)], first
    assert rank1[0]["cause"].startswith(f"cannot decode image {bad}: cannot identify image file")
    assert restart["failures"] == []
    assert_no_preemption_or_hang(out, tmp_path)
    by_hand = resumed_by_hand(tmp_path, straight, "step_4", *list_data(source))
    assert_same_weights(by_hand / f"step_{STEPS}", out / f"step_{STEPS}")


def launch_to_its_end(tmp_path, out, *args, **kwargs):
    """An elastic launch (start_elastic's arguments after `out`) on an etcd of its own, waited for to its end:
    (its exit code, the seconds it took, the launcher's output)."""
    started = time.monotonic()
    with etcd_server(tmp_path / "etcd") as master:
        proc = start_elastic(tmp_path, master, out, *args, **kwargs)
        try:
            code = proc.wait(timeout=LAUNCH_BOUND_S)
        finally:
            stop_launch(proc, out)
    return code, time.monotonic() - started, (tmp_path / "launch.out").read_text(errors="replace")


def test_a_rank_that_fails_in_the_same_step_every_time_ends_the_restarts_with_one_line(tmp_path, straight_images):
    # Catches a restart loop that fails silently (the launcher's own last words are its exit code) or with a
    # traceback or an unrelated rank's error (the rank waiting for the failed one) as its last line, and one
    # that retrains up to the failing step again after the failure has repeated.
    source, _ = straight_images
    images, bad, _ = broken_copy(tmp_path, source)
    out = tmp_path / "run"
    code, took, launcher = launch_to_its_end(tmp_path, out, *list_data(images))
    assert code != 0, launcher[-3000:]
    history = attempts(out)
    # Paddle 3.3.1's launcher deploys the job max_restart + 2 times: `while restarts <= max_restart` counts
    # the restart it is about to make after it.
    assert len(history) == MAX_RESTART + 2, history
    failed = [[(f["step"], f["resumed"]) for f in a["failures"] if f["rank"] == 1] for a in history]
    assert failed == [[(BAD_STEP, None)], [(BAD_STEP, "step_4")], [(BAD_STEP, "step_4")], [], []], failed
    line = (f"error: attempts 1 and 2 of this job both went on from step_4 and failed on rank 1 in step {BAD_STEP}: "
            f"cannot decode image {bad}: cannot identify image file")
    errors = [text for text in launcher.splitlines() if text.startswith("error: ")]
    assert errors and errors[-1].startswith(line), errors[-3:]
    last = launcher[launcher.rindex("Container rank"):]
    assert "Traceback" not in last and last.count("\nerror: ") == 1, last
    print(f"\nthe same failure in every attempt: {len(history)} attempts, the launch ended after {took:.0f} s")


def _small_files():
    """Launcher child setup: files may not grow past 64 KiB, so the logs are written and a checkpoint is not,
    as on a full disk (test_disk_faults.py)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_disk_ends_the_restarts_with_one_line(tmp_path):
    # Rank 0 cannot write its first checkpoint, and no restart changes that. Catches a restart loop that trains
    # up to the same save again until --max_restart runs out, and one that ends with another line than the cause.
    out = tmp_path / "run"
    code, took, launcher = launch_to_its_end(tmp_path, out, max_restart=1, preexec_fn=_small_files)
    assert code != 0, launcher[-3000:]
    cause = (f"cannot write checkpoint {out / f'step_{SAVE}'}: File too large; free disk space or set "
             "Engine.save_load.output_dir to a writable folder (earlier checkpoints are intact)")
    errors = [text for text in launcher.splitlines() if text.startswith("error: ")]
    assert errors and errors[-1].startswith(
        f"error: attempts 0 and 1 of this job both went on from the start and failed on rank 0 in step {SAVE}: "
        f"{cause}; restarting cannot get past that"), errors[-3:]
    assert [[(f["step"], f["cause"]) for f in a["failures"] if f["rank"] == 0] for a in attempts(out)] == \
        [[(SAVE, cause)], [(SAVE, cause)], []]
    assert checkpoints(out) == [] and not [name for name in os.listdir(out) if name.startswith(".tmp")]
    print(f"\na full disk: the launch ended after {took:.0f} s, 3 attempts, the third stopped before training")
