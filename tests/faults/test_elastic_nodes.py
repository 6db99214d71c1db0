"""Several nodes through a real etcd server on loopback: each "node" is its own paddle.distributed.launch
(`--nnodes 2` or `1:2`, one process each, its own log folder) and the output folder is shared, as on a
shared file system. A node whose launcher and worker are killed with SIGKILL (a lost machine) or stopped
with SIGTERM (a drained one) leaves the other waiting; started again, as a cluster's scheduler would, it
rejoins and the job goes on from its newest checkpoint, whichever node rank 0 now runs on, and ends with
the weights of a run stopped there and resumed by hand. With `--nnodes 1:2` a node that does not return
leaves the job to the other after the elastic timeout: it goes on alone where the global batch can be
kept, else every attempt stops with one line. A job whose every node is started again under its
PADDLE_JOB_ID (a requeued job) goes on too. An etcd server that dies ends the launchers, not the training."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.engine.restart import FAILURE_PREFIX  # noqa: E402

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
    TRAIN,
    assert_same_weights,
    describe,
    launch_cmd,
    run,
    run_train,
    train_args,
    training_pids,
    wait_until,
    worker_logs,
)

pytestmark = pytest.mark.slow

# The kill comes after step SAVE + 2. A SIGTERM stops the ranks at their next agreement, about 0.5 s of steps
# later (10 steps of this model on an idle machine): the run must still be going then.
STEPS, SAVE = 40, 4
# auto_resume stays off: a restart goes on from its job's checkpoints by itself.
COMMON = (f"Engine.max_steps={STEPS}", f"Engine.save_load.save_steps={SAVE}", "Engine.save_load.keep_last=0")
# Each process takes half of the global batch of 16 on two nodes, all of it alone.
DIVIDED = ("Data.Train.sampler.batch_size=null", "Global.global_batch_size=16")
FIXED = ("Data.Train.sampler.batch_size=8",)
ELASTIC_TIMEOUT = 10  # s the launchers of a `1:2` job wait for a lost node (Paddle's default: 30)
LAUNCH_BOUND_S = 150  # a launch after the fault, restarts included


@pytest.fixture(autouse=True)
def _etcd_present():
    etcd_or_skip()


class Nodes:
    """The launchers of one job, by node name; every process they started is ended on leaving."""

    def __init__(self, tmp_path, master, out, overrides, nnodes="2", max_restart=3, job_id=None):
        self.tmp_path, self.master, self.out, self.overrides = tmp_path, master, out, overrides
        self.nnodes, self.max_restart = nnodes, max_restart
        # Each launcher clears its job's keys in etcd when it starts: one id per test. Given as --job_id, it
        # reaches the launchers only; given as PADDLE_JOB_ID (job_id), the training processes too.
        self.job_id = job_id
        self.launch_args = ("--job_id", f"ppmoco-{uuid.uuid4().hex[:8]}") if job_id is None else ()
        self.procs = {}

    def start(self, name):
        log = open(self.tmp_path / f"{name}.out", "w")
        cmd = elastic_launch_cmd(self.tmp_path / name, self.master, TRAIN,
                                 *train_args(self.out, *COMMON, *self.overrides), max_restart=self.max_restart,
                                 nproc=1, nnodes=self.nnodes,
                                 launch_args=(*self.launch_args, "--elastic_timeout", str(ELASTIC_TIMEOUT)))
        env = launcher_env() if self.job_id is None else {**launcher_env(), "PADDLE_JOB_ID": self.job_id}
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()
        return self.procs[name]

    def output(self, name):
        return (self.tmp_path / f"{name}.out").read_text(errors="replace")

    def rank_of(self, name):
        """The global rank of node `name`'s training process, None while it has none."""
        launcher = self.procs[name].pid
        return next((rank for pid, rank in training_pids(self.out).items() if parent(pid) == launcher), None)

    def node_of_rank(self, rank):
        launchers = {proc.pid: name for name, proc in self.procs.items()}
        return next(launchers[parent(pid)] for pid, found in training_pids(self.out).items()
                    if found == rank and parent(pid) in launchers)

    def kill(self, name, signum=signal.SIGKILL):
        """SIGKILL: the node is lost, its launcher and worker at once; SIGTERM: to its launcher, as a
        drained node's."""
        proc = self.procs[name]
        pids = [proc.pid] + ([pid for pid in training_pids(self.out) if parent(pid) == proc.pid]
                             if signum == signal.SIGKILL else [])
        for pid in pids:
            os.kill(pid, signum)
        return proc

    def waiting(self, name):
        """Whether node `name`'s launcher, its worker gone, waits for its peers again."""
        return self.rank_of(name) is None and self.output(name).count("Waiting peer ready") >= 2

    def logs(self):
        return "".join(f"--- {name}\n{self.output(name)[-2000:]}\n{worker_logs(self.tmp_path / name)[-2000:]}"
                       for name in self.procs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.procs.values():
            stop_launch(proc, self.out)


def parent(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def train_steps(nodes, steps):
    """Start nodes a and b and wait until the job logged `steps` steps."""
    for name in ("a", "b"):
        nodes.start(name)
    wait_until(nodes.procs["a"], lambda: steps_logged(nodes.out) >= steps, f"{steps} steps", timeout=180, poll=0.005)


def by_hand_two_processes(tmp_path, source, checkpoint, *overrides):
    """A run stopped at `source`'s `checkpoint` and resumed by hand: 2 processes on one node (the same
    weights as 2 nodes x 1 process: test_ranks_and_nodes.py)."""
    out = stopped_at(source, checkpoint, tmp_path / "by_hand")
    proc = run(launch_cmd(tmp_path / "by_hand_logs", "--nproc_per_node", "2", TRAIN,
                          *train_args(out, *COMMON, *overrides, "Engine.save_load.auto_resume=true")))
    assert proc.returncode == 0, describe(proc) + worker_logs(tmp_path / "by_hand_logs")[-3000:]
    assert f"resumed from {out / checkpoint}:" in (out / "train.log").read_text()
    return out


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["lost", "drained"])
def test_a_node_that_rejoins_after_it_was_lost_or_drained_goes_on_with_the_job(tmp_path, signum):
    # The node of rank 0 (it holds the output folder's lock and writes the checkpoints) goes; after it
    # rejoins, rank 0 runs under its new launcher or under the survivor's (POD_NAME decides). Catches a job
    # told apart by rank 0's launcher alone (the restart would start afresh, overwriting the job's checkpoints,
    # or be refused by the lost rank 0's lock), a restart from anything but the newest checkpoint, a survivor
    # that gives up instead of waiting, and a drained node's preemption checkpoint not gone on from.
    out = tmp_path / "run"
    with etcd_server(tmp_path / "etcd") as master, Nodes(tmp_path, master, out, FIXED) as nodes:
        train_steps(nodes, SAVE + 2)
        gone = nodes.node_of_rank(0)
        survivor = "b" if gone == "a" else "a"
        nodes.kill(gone, signum)
        stopped = time.monotonic()
        wait_until(nodes.procs[survivor], lambda: nodes.waiting(survivor), "the survivor waiting for its peer",
                   timeout=90, poll=0.05)
        noticed = time.monotonic() - stopped
        code = nodes.procs[gone].wait(timeout=60)
        assert nodes.procs[survivor].poll() is None  # it waits for the node (up to 10 x --elastic_timeout)
        restarted = time.monotonic()
        nodes.start(gone + "2")
        wait_until(nodes.procs[survivor], lambda: stepped_after_restart(out), "a step after the restart",
                   timeout=120, poll=0.01)
        recovery, rejoin = time.monotonic() - stopped, time.monotonic() - restarted
        rank0 = "the rejoined node" if nodes.rank_of(gone + "2") == 0 else "the survivor"
        codes = [nodes.procs[name].wait(timeout=LAUNCH_BOUND_S) for name in (survivor, gone + "2")]
        logs = nodes.logs()
    assert codes == [0, 0], logs
    assert code == (-signal.SIGKILL if signum == signal.SIGKILL else signal.SIGTERM), logs
    # Its launcher, not its own exit, ended the survivor's process (ppmoco/engine/restart.py, wait_for_launcher).
    assert "waiting up to 30 s for this node's launcher to restart the job" in worker_logs(tmp_path / survivor)
    newest, done = before_restart(out)
    assert restart_line(out, 1) == newest and restart_line(out, 2) is None, logs
    lost = done - int(newest.rsplit("_", 1)[1])
    text = (out / "train.log").read_text()
    assert "took over the lock" not in text
    history = attempts(out)
    assert len(history) == 2 and len(set(history[0]["launchers"]) & set(history[1]["launchers"])) == 1, history
    if signum == signal.SIGKILL:
        assert 0 <= lost <= SAVE  # none when the kill follows a save
    else:  # every rank stopped at one step and rank 0 saved it: nothing is done again
        assert lost == 0 and history[0]["failures"] == [], history
        assert f"error: stopped by SIGTERM after step {done}" in worker_logs(tmp_path / gone)
    print(f"\n{signal.Signals(signum).name} of the node of rank 0 after step {done}: its peer waited after "
          f"{noticed:.1f} s; the first step of the restart {recovery:.1f} s after the {signal.Signals(signum).name} "
          f"and {rejoin:.1f} s after the node was started again; {lost} step(s) done again; rank 0 now on {rank0}")
    by_hand = by_hand_two_processes(tmp_path, out, os.path.basename(newest), *FIXED)
    assert_same_weights(by_hand / f"step_{STEPS}", out / f"step_{STEPS}")


def test_a_job_whose_every_node_is_started_again_under_its_job_id_goes_on(tmp_path):
    # A requeued job: every launcher is new, PADDLE_JOB_ID the same. Catches a job id left out of what tells
    # a job from another run (the job would start afresh, auto_resume being off, and overwrite its checkpoints).
    out = tmp_path / "run"
    job_id = f"ppmoco-{uuid.uuid4().hex[:8]}"
    with etcd_server(tmp_path / "etcd") as master, Nodes(tmp_path, master, out, FIXED, job_id=job_id) as nodes:
        train_steps(nodes, SAVE + 2)
        for name in ("a", "b"):
            nodes.kill(name).wait(timeout=30)
        for name in ("a2", "b2"):
            nodes.start(name)
        codes = [nodes.procs[name].wait(timeout=LAUNCH_BOUND_S) for name in ("a2", "b2")]
        logs = nodes.logs()
    assert codes == [0, 0], logs
    newest, _ = before_restart(out)
    assert restart_line(out, 1) == newest, logs
    history = attempts(out)
    assert [len(a["launchers"]) for a in history] == [2, 2] and not set(history[0]["launchers"]) & set(
        history[1]["launchers"])
    by_hand = by_hand_two_processes(tmp_path, out, os.path.basename(newest), *FIXED)
    assert_same_weights(by_hand / f"step_{STEPS}", out / f"step_{STEPS}")


def test_a_lost_node_that_does_not_return_leaves_the_job_to_the_other_at_the_same_global_batch(tmp_path):
    # --nnodes 1:2 and the per-process batch divided from the global one: the survivor goes on alone as 1 x 16
    # after the elastic timeout. Catches a survivor that waits for ever or stops, a resume at another global
    # batch or image, and a restart from anything but the newest checkpoint.
    out = tmp_path / "run"
    with etcd_server(tmp_path / "etcd") as master, Nodes(tmp_path, master, out, DIVIDED, nnodes="1:2") as nodes:
        train_steps(nodes, SAVE + 2)
        gone = nodes.node_of_rank(0)
        survivor = "b" if gone == "a" else "a"
        nodes.kill(gone)
        killed = time.monotonic()
        wait_until(nodes.procs[survivor], lambda: stepped_after_restart(out), "a step after the restart",
                   timeout=120, poll=0.01)
        recovery = time.monotonic() - killed
        code = nodes.procs[survivor].wait(timeout=LAUNCH_BOUND_S)
        logs = nodes.logs()
    assert code == 0, logs
    newest, done = before_restart(out)
    assert restart_line(out, 1) == newest, logs
    text = (out / "train.log").read_text()
    assert f"resuming {newest} of 2 process(es) x batch 8 with 1 x 16: the same global batch 16" in text
    lost = done - int(newest.rsplit("_", 1)[1])
    print(f"\nnode lost for good after step {done} (--elastic_timeout {ELASTIC_TIMEOUT}): the survivor's first "
          f"step alone {recovery:.1f} s after the kill; {lost} step(s) done again")
    by_hand = stopped_at(out, os.path.basename(newest), tmp_path / "by_hand")
    run_train(by_hand, *COMMON, *DIVIDED, "Engine.save_load.auto_resume=true")
    assert_same_weights(by_hand / f"step_{STEPS}", out / f"step_{STEPS}")


def test_a_lost_node_that_does_not_return_stops_a_job_whose_global_batch_cannot_be_kept(tmp_path):
    # --nnodes 1:2 and a fixed per-process batch of 8: alone, the survivor would train on 8 images a step instead
    # of 16. Catches an attempt that goes on at another global batch (other images from then on) or starts
    # afresh, and a launch that ends without the reason as its last line.
    out = tmp_path / "run"
    with etcd_server(tmp_path / "etcd") as master, \
            Nodes(tmp_path, master, out, FIXED, nnodes="1:2", max_restart=1) as nodes:
        train_steps(nodes, SAVE + 2)
        gone = nodes.node_of_rank(0)
        survivor = "b" if gone == "a" else "a"
        nodes.kill(gone)
        killed = time.monotonic()
        code = nodes.procs[survivor].wait(timeout=LAUNCH_BOUND_S)
        took = time.monotonic() - killed
        output = nodes.output(survivor)
    assert code != 0, output[-3000:]
    newest, done = before_restart(out)
    resumed = int(newest.rsplit("_", 1)[1])
    history = attempts(out)
    # --max_restart 1: Paddle 3.3.1 starts the job up to max_restart + 2 times, fewer where its launcher, its own
    # process failed, checks for its peers before its watch of etcd resets its state (a loaded machine).
    assert 2 <= len(history) <= 3, history
    assert [restart_line(out, n) for n in range(1, len(history))] == [newest] * (len(history) - 1)
    assert restart_line(out, len(history)) is None and not stepped_after_restart(out)
    line = (f"error: {newest} was written by 2 process(es) x batch 8 (global batch 16); this run is 1 x 8 (8): "
            "resuming at the same image needs the same global batch: set Data.Train.sampler.batch_size=16, or run "
            "2 x 8 as before (Data.Train.sampler.batch_size=null with Global.global_batch_size=16 keeps that global "
            "batch for any number of processes that divides it)")
    errors = [text for text in output.splitlines() if text.startswith("error: ")]
    assert errors and errors[-1] == line, errors[-3:]
    # Each attempt alone failed on rank 0 before its first step; the next attempt files the last one's record.
    last = json.loads((out / f"{FAILURE_PREFIX}0").read_text())
    assert [(f["rank"], f["step"], f["resumed"]) for attempt in history[1:-1] for f in attempt["failures"]] + [
        (last["rank"], last["step"], last["resumed"])] == [(0, resumed + 1, os.path.basename(newest))] * (
        len(history) - 1)
    print(f"\nnode lost for good after step {done}, global batch not kept: the launcher gave up {took:.0f} s after "
          f"the kill, after {len(history) - 1} attempts alone")


def process_with(fragment):
    """The pid of the process whose command line holds `fragment`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if fragment in f.read().decode(errors="replace"):
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process runs with {fragment} in its command line")


def test_an_etcd_server_killed_mid_run_ends_the_launchers_and_the_training_goes_on(tmp_path):
    # Paddle 3.3.1's launcher watches etcd while it watches its processes, and an error ends it with a traceback;
    # its processes, in sessions of their own, train on without it, and nothing would restart them any more.
    # Catches a change of either (docs/cluster.md says what happens).
    out, steps = tmp_path / "run", 200  # outlasting the launchers by far
    longer = (*FIXED, f"Engine.max_steps={steps}", "Engine.save_load.save_steps=50")
    with etcd_server(tmp_path / "etcd") as master, Nodes(tmp_path, master, out, longer) as nodes:
        train_steps(nodes, 2)
        os.kill(process_with(str(tmp_path / "etcd" / "data")), signal.SIGKILL)
        killed = time.monotonic()
        codes = [nodes.procs[name].wait(timeout=60) for name in ("a", "b")]
        ended = time.monotonic() - killed
        orphans = training_pids(out)
        end = time.monotonic() + 120
        while training_pids(out):
            assert time.monotonic() < end, "the training processes did not end"
            time.sleep(0.1)
        output = nodes.output("a")
    assert codes == [1, 1] and "etcd3.exceptions.ConnectionFailedError" in output, (codes, output[-3000:])
    assert len(orphans) == 2
    assert f"saved checkpoint {out / f'step_{steps}'}" in (out / "train.log").read_text()
    print(f"\netcd killed: both launchers ended {ended:.1f} s later (exit 1); their processes trained on to "
          f"step {steps}")
