"""Promises 2 and 3 on loopback (gloo on CPU): a killed rank ends the launch quickly with a message
naming it and the run resumes; two 1-process "nodes" train exactly like one 2-process node."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fault_helpers import (  # noqa: E402
    ROOT,
    TRAIN,
    assert_same_weights,
    describe,
    free_port,
    launch_cmd,
    run,
    train_args,
    training_pids,
    wait_until,
    worker_logs,
)

pytestmark = pytest.mark.slow

STEPS = 12
# Same seed, same global batch (2 x 32) and the same CPU threads per process in every topology:
# the thread count changes float summation order, so it is pinned (FAST sets Global.num_threads=1).
COMMON = (f"Engine.max_steps={STEPS}", "Engine.save_load.save_steps=2", "Engine.save_load.keep_last=0",
          "Engine.save_load.auto_resume=true")
# How long a launch may take to notice a dead rank and exit (measured: about 1 s on loopback).
DEAD_RANK_BOUND_S = 60


def one_node(tmp_path, out, log_name):
    return launch_cmd(tmp_path / log_name, "--nproc_per_node", "2", TRAIN, *train_args(out, *COMMON))


def assert_launch_ok(proc, log_dir):
    assert proc.returncode == 0, describe(proc) + worker_logs(log_dir)[-5000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One node, two processes, uninterrupted: the run every other topology must reproduce."""
    tmp = tmp_path_factory.mktemp("one_node")
    out = tmp / "run"
    proc = run(one_node(tmp, out, "logs"))
    assert_launch_ok(proc, tmp / "logs")
    assert "2 process(es) x batch 32" in (out / "train.log").read_text()
    return out


def test_dead_rank_stops_the_launch_and_the_run_resumes(tmp_path, reference):
    out = tmp_path / "run"
    with open(tmp_path / "launch.out", "w") as log:
        proc = subprocess.Popen(one_node(tmp_path, out, "logs"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(proc, lambda: (out / "step_4").is_dir(), "checkpoint step_4", poll=0.05)
        pids = [pid for pid, rank in training_pids(out).items() if rank == 1]
        assert len(pids) == 1, pids
        pid = pids[0]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        code = proc.wait(timeout=DEAD_RANK_BOUND_S)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    launch_output = (tmp_path / "launch.out").read_text(errors="replace")
    assert code != 0 and took < DEAD_RANK_BOUND_S
    # Paddle's launcher watches its workers and names the dead one (then stops the others).
    assert re.search(r"Container rank 1 status failed .* code -9", launch_output), launch_output[-3000:]
    assert not (out / f"step_{STEPS}").exists()
    latest = (out / "latest").read_text().strip()

    proc = run(one_node(tmp_path, out, "logs_rerun"))
    assert_launch_ok(proc, tmp_path / "logs_rerun")
    assert f"resumed from {out / latest}:" in (out / "train.log").read_text()
    assert_same_weights(reference / f"step_{STEPS}", out / f"step_{STEPS}")


def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path, reference):
    out = tmp_path / "run"
    master = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(
        launch_cmd(tmp_path / f"node{rank}", "--nnodes", "2", "--master", master, "--rank", str(rank),
                   "--nproc_per_node", "1", TRAIN, *train_args(out, *COMMON)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, output, rank in zip(nodes, outputs, (0, 1)):
        assert node.returncode == 0, output[-3000:] + worker_logs(tmp_path / f"node{rank}")[-3000:]
    assert "2 process(es) x batch 32" in (out / "train.log").read_text()
    assert_same_weights(reference / f"step_{STEPS}", out / f"step_{STEPS}")
