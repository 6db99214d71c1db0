"""The bookkeeping of restarts in place (ppmoco/engine/restart.py), without processes: which launcher and job id
a process belongs to, the attempts and failures of a job (also across nodes that leave and rejoin), when its
failures repeat, which checkpoint a restart goes on from, the lock of a job's previous attempt (also from
another host), and the fatal-error hook that records a failure. The launcher itself restarting a job:
tests/faults/test_elastic_restart.py and test_elastic_nodes.py."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import paddle
import pytest

from ppmoco import cli
from ppmoco.engine.checkpoint import find_resume_checkpoint, newest_of_job, save_checkpoint
from ppmoco.engine.lock import LOCK_NAME, OutputDirInUse, OutputDirLock, launch_job_id, launcher_job, process_start
from ppmoco.engine.restart import (
    JOB_FILE,
    Attempt,
    Launch,
    begin_attempt,
    record_failure,
    repeated_failure,
    wait_for_launcher,
)
from ppmoco.errors import DataError

JOB, OTHER = "host/100/5000/abcdef", "host/100/7000/abcdef"  # the same launcher pid, started another time
ONE, ANOTHER = Launch((JOB,)), Launch((OTHER,))  # one node's launch, and a later launch on that node
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_launcher_job_is_the_parent_launcher_and_none_outside_it():
    # Catches an identity without the launcher's start time (a recycled launcher pid would read as the same
    # job) or one taken from a process the launcher did not start (a plain run would read as a restart).
    env = {"POD_NAME": "abcdef", "PADDLE_TRAINER_ID": "0"}
    parent = os.getppid()
    assert launcher_job(env) == f"{socket.gethostname()}/{parent}/{process_start(parent)}/abcdef"
    assert launcher_job({"PADDLE_TRAINER_ID": "0"}) is None
    assert launcher_job({"POD_NAME": "abcdef"}) is None


def _fail(folder, attempt, rank, step, resumed, cause="cannot decode image a/7.png: the file is empty (0 bytes)"):
    record_failure(str(folder), attempt, rank, step, resumed, cause)


def test_attempts_of_one_job_are_counted_and_a_new_job_starts_afresh(tmp_path):
    # Catches a restart counted as a first run (no resume of the job's own checkpoints), another job's
    # attempts or failure records taken as this job's, and failure records left behind.
    assert begin_attempt(str(tmp_path), None) is None and not os.listdir(tmp_path)  # not launched: nothing
    first = begin_attempt(str(tmp_path), ONE)
    assert (first.number, first.repeated) == (0, None)
    _fail(tmp_path, first, 1, 7, None)
    second = begin_attempt(str(tmp_path), ONE)
    assert (second.number, second.repeated) == (1, None)
    record = json.loads((tmp_path / JOB_FILE).read_text())
    assert [a["attempt"] for a in record["attempts"]] == [0, 1]
    (failure,) = record["attempts"][0]["failures"]
    assert failure.pop("time") > 0 and failure == {
        "rank": 1, "step": 7, "resumed": None, "cause": "cannot decode image a/7.png: the file is empty (0 bytes)"}
    assert sorted(os.listdir(tmp_path)) == [JOB_FILE]
    _fail(tmp_path, second, 1, 7, "step_4")
    other = begin_attempt(str(tmp_path), ANOTHER)
    assert other.number == 0 and json.loads((tmp_path / JOB_FILE).read_text())["attempts"][0]["failures"] == []
    assert sorted(os.listdir(tmp_path)) == [JOB_FILE]


def test_the_same_failure_twice_from_the_same_checkpoint_stops_every_further_attempt(tmp_path):
    # Catches a restart loop that retries a failure no restart can get past, one that names the rank that
    # waited for the failed one (its error repeats too, and sorts first), and one stopped by failures that
    # only look alike (test below).
    attempt = begin_attempt(str(tmp_path), ONE)
    _fail(tmp_path, attempt, 1, 7, None)  # the first run: from the start
    attempt = begin_attempt(str(tmp_path), ONE)
    _fail(tmp_path, attempt, 1, 7, "step_4")
    _fail(tmp_path, attempt, 0, 7, "step_4", "RuntimeError: connection reset by peer")  # waited for rank 1
    attempt = begin_attempt(str(tmp_path), ONE)
    assert attempt.repeated is None  # once from the start, once from step_4: not yet the same
    _fail(tmp_path, attempt, 1, 7, "step_4")
    _fail(tmp_path, attempt, 0, 7, "step_4", "RuntimeError: connection reset by peer")  # waited for rank 1
    killed = begin_attempt(str(tmp_path), ONE)  # killed without a word: no record, no evidence either way
    stopped = begin_attempt(str(tmp_path), ONE)
    assert stopped.number == killed.number + 1 == 4
    assert stopped.repeated == (
        "attempts 1 and 2 of this job both went on from step_4 and failed on rank 1 in step 7: cannot decode image "
        "a/7.png: the file is empty (0 bytes); restarting cannot get past that, so this attempt stops before "
        "training: fix the cause, then run the command again (Engine.save_load.auto_resume=true continues from "
        "step_4)")
    assert begin_attempt(str(tmp_path), ONE).repeated == stopped.repeated  # and so does every later one


@pytest.mark.parametrize("change", ["resumed", "rank", "cause"])
def test_failures_that_differ_do_not_repeat(change):
    base = {"rank": 1, "step": 7, "resumed": "step_4", "cause": "cannot decode image a/7.png"}
    other = dict(base, **{change: {"resumed": "step_8", "rank": 0, "cause": "cannot decode image a/9.png"}[change]})
    attempts = [{"attempt": 0, "failures": [base]}, {"attempt": 1, "failures": [other]}]
    assert repeated_failure(attempts) is None
    assert repeated_failure([attempts[0], {"attempt": 1, "failures": [base]}]) is not None


def _save(folder, name, step, job):
    layer = paddle.nn.Linear(2, 2)
    optimizer = paddle.optimizer.Momentum(parameters=layer.parameters())
    state = {"epoch": 0, "next_batch": step, "global_step": step}
    if job is not None:
        state["job"] = job
    save_checkpoint(str(folder), name, layer, optimizer, state)


def test_a_restart_goes_on_from_its_jobs_newest_intact_checkpoint_whatever_the_config_says(tmp_path, caplog):
    # Catches a restart that starts afresh when auto_resume is off (it would overwrite the job's own
    # checkpoints), one that goes on from another job's checkpoint, and a damaged newest one trusted.
    save_load = {"ckpt_dir": None, "auto_resume": False, "output_dir": str(tmp_path)}
    _save(tmp_path, "step_2", 2, OTHER)  # an earlier job's, in the same folder
    assert find_resume_checkpoint(save_load, JOB) is None  # this job wrote none yet: as the config says
    _save(tmp_path, "step_4", 4, JOB)
    _save(tmp_path, "step_8", 8, JOB)
    _save(tmp_path, "step_9", 9, OTHER)
    _save(tmp_path, "step_10", 10, None)
    assert find_resume_checkpoint(save_load) is None  # not a restart: the config rules
    assert find_resume_checkpoint(save_load, JOB) == str(tmp_path / "step_8")
    assert find_resume_checkpoint(dict(save_load, ckpt_dir=str(tmp_path / "step_2")), JOB) == str(tmp_path / "step_8")
    with open(tmp_path / "step_8" / "model.pdparams", "r+b") as f:
        f.write(b"\0")
    assert newest_of_job(str(tmp_path), JOB) == str(tmp_path / "step_4")
    assert "not resuming from" in caplog.text and "step_8" in caplog.text


def test_the_lock_of_the_jobs_previous_attempt_is_taken_over_without_a_warning(tmp_path, caplog):
    # Catches a restart warned about as a crashed foreign run, a live holder of the same job given the folder
    # (two writers), and a dead foreign run's lock taken over silently.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    holder = {"host": socket.gethostname(), "pid": gone.pid, "start": 1, "time": 0.0, "command": "x",
              "launchers": [JOB], "job_id": None}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with OutputDirLock(str(tmp_path), launch=ONE) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock.info and lock.info["launchers"] == [JOB]
    assert "took over" not in caplog.text
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(holder, launchers=[OTHER])))
    with OutputDirLock(str(tmp_path), launch=ONE):
        pass
    assert "took over the lock" in caplog.text
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = dict(holder, pid=sleeper.pid, start=process_start(sleeper.pid))
        (tmp_path / LOCK_NAME).write_text(json.dumps(live))
        with pytest.raises(OutputDirInUse, match=f"pid {sleeper.pid}"):
            OutputDirLock(str(tmp_path), launch=ONE).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


# Two nodes: A's launcher and B's; A is lost and its scheduler starts A2 (a new launcher) on some node.
A, B, A2 = "node-a/10/500/qwerty", "node-b/20/600/asdfgh", "node-a2/30/700/zxcvbn"


def test_a_node_that_rejoins_continues_the_job_wherever_rank_0_now_runs(tmp_path):
    # Catches a job told apart by rank 0's launcher alone (after the lost node rejoins, rank 0 may run under
    # the new launcher or the survivor's: either way the job would start afresh, overwriting its checkpoints),
    # and a new launch on the folder (all launchers new) or another PADDLE_JOB_ID taken as this job.
    first = begin_attempt(str(tmp_path), Launch((A, B)))
    assert (first.job, first.number) == (A, 0)
    _fail(tmp_path, first, 1, 7, None, "RuntimeError: gloo: connection closed by peer")  # B's rank saw A go
    for rank0_moved in (Launch((B, A2)), Launch((A2, B))):
        again = begin_attempt(str(tmp_path), rank0_moved)
        assert again.job == A and again.repeated is None  # the job keeps the name its checkpoints carry
    assert again.number == 2
    record = json.loads((tmp_path / JOB_FILE).read_text())
    assert [a["launchers"] for a in record["attempts"]] == [[A, B], [B, A2], [A2, B]]
    assert [len(a["failures"]) for a in record["attempts"]] == [1, 0, 0]
    assert begin_attempt(str(tmp_path), Launch((B,))).number == 3  # A2 lost for good: B goes on alone
    anew = begin_attempt(str(tmp_path), Launch(("node-c/1/1/aaaaaa", "node-d/1/1/bbbbbb")))
    assert (anew.job, anew.number) == ("node-c/1/1/aaaaaa", 0)


def test_a_job_started_again_on_every_node_under_its_job_id_continues(tmp_path):
    # A requeued Slurm job: every launcher is new, PADDLE_JOB_ID (SLURM_JOB_ID) is the same. Catches a
    # requeued job taken for a new one (it would not go on from its own checkpoints), another job id taken
    # for this job, and a repeated failure whose advice (run the command again) a requeue under the same job
    # id could never follow.
    first = begin_attempt(str(tmp_path), Launch((A, B), "4242"))
    _fail(tmp_path, first, 0, 5, "step_4")
    second = begin_attempt(str(tmp_path), Launch((A2, "node-b2/1/1/bbbbbb"), "4242"))
    assert (second.job, second.number) == (A, 1)
    _fail(tmp_path, second, 0, 5, "step_4")
    third = begin_attempt(str(tmp_path), Launch((A, B), "4242"))
    assert third.number == 2 and third.repeated.endswith(
        "fix the cause, then run the command again under another PADDLE_JOB_ID than 4242 "
        "(Engine.save_load.auto_resume=true continues from step_4)")
    assert begin_attempt(str(tmp_path), Launch((A2,), "4243")).number == 0


def test_the_lock_of_an_earlier_attempt_on_another_host_is_taken_over_and_a_foreign_one_is_not(tmp_path, caplog):
    # This host cannot see a process on another one: only the job's launchers (one of them went on) or its
    # job id tell that the holder belongs to an earlier attempt, which the launchers ended. Catches such a
    # lock refused (the job cannot go on after its rank 0 node was lost) and another run's lock from another
    # host taken (two runs would write one folder).
    holder = {"host": "node-a", "pid": 4321, "start": 99, "time": 0.0, "command": "x", "launchers": [A, B],
              "job_id": "4242"}
    for launch in (Launch((A2, B)), Launch((B,)), Launch((A2,), "4242")):
        (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
        with OutputDirLock(str(tmp_path), launch=launch) as lock:
            assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock.info
    assert "took over" not in caplog.text
    for launch in (Launch((A2,)), Launch((A2,), "4243"), None):
        (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
        with pytest.raises(OutputDirInUse, match="in use by the run of pid 4321 on node-a"):
            OutputDirLock(str(tmp_path), launch=launch).acquire()


def test_the_job_id_is_paddles_environment_variable_of_a_launched_process():
    # Catches Paddle's placeholder 'default' (every job without an id) taken as one job, and an id read in a
    # process the launcher did not start.
    launched = {"PADDLE_TRAINER_ID": "0"}
    assert launch_job_id(dict(launched, PADDLE_JOB_ID="4242")) == "4242"
    assert launch_job_id(dict(launched, PADDLE_JOB_ID="default")) is None
    assert launch_job_id(launched) is None and launch_job_id({"PADDLE_JOB_ID": "4242"}) is None


@pytest.fixture
def fresh_thread_errors():
    """ppmoco.cli keeps a helper thread's error process-wide: clear it after the test."""
    yield
    cli._THREAD_ERRORS.clear()
    cli._THREAD_FAILED.clear()
    cli._MAIN_REPORTS.clear()


def test_the_fatal_hook_gets_each_way_a_tool_fails_and_only_for_its_run(capsys, fresh_thread_errors):
    # Catches a failure left unrecorded: a user error, an unexpected exception (a bug reached at one step),
    # a user error raised in Paddle's loader thread (the main thread then fails with another error); and
    # hooks that outlive their run (a later run in the same process would record into the earlier run's folder).
    seen = []

    def record(err, line):
        seen.append((type(err).__name__, line))

    def failing(error):
        def main(argv):
            cli.on_fatal(record)
            raise error
        return main

    with pytest.raises(SystemExit):
        cli.run(failing(DataError("cannot decode image a/7.png: truncated")), argv=[])
    with pytest.raises(ZeroDivisionError):
        cli.run(failing(ZeroDivisionError("division by zero\nmore")), argv=[])

    def loader_thread_fails(argv):
        cli.on_fatal(record)

        def read():
            raise DataError("cannot decode image b/1.png: truncated")
        threading.Thread(target=read, daemon=True).start()
        assert cli._THREAD_FAILED.wait(10)
        raise SystemError("the loader's queue broke")  # what the main thread sees

    with pytest.raises(SystemExit):
        cli.run(loader_thread_fails, argv=[])
    assert seen == [("DataError", "cannot decode image a/7.png: truncated"),
                    ("ZeroDivisionError", "ZeroDivisionError: division by zero"),
                    ("DataError", "cannot decode image b/1.png: truncated")]

    def later(argv):  # registers no hook of its own
        raise DataError("a later run")

    with pytest.raises(SystemExit):
        cli.run(later, argv=[])
    assert len(seen) == 3 and "error: a later run" in capsys.readouterr().err


def test_a_hang_is_recorded_before_the_watchdog_ends_the_process(tmp_path):
    # Catches a hang (a read that never returns, the same file in every attempt) left out of the job's
    # failures: the watchdog ends its process with os._exit, past every exception handler and fatal hook.
    record = tmp_path / "line.txt"
    code = ("import time\nfrom ppmoco.engine.watchdog import Watchdog\n"
            f"with Watchdog(0.5, rank=1, on_hang=lambda line: open({str(record)!r}, 'w').write(line)):\n"
            "    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 3, proc.stderr
    assert record.read_text().startswith("rank 1 made no progress for ") and record.read_text() in proc.stderr


def test_an_attempt_crosses_to_every_rank_as_plain_data():
    # training_lock sends it to every rank with broadcast_object_list, which pickles it: catches an Attempt
    # that cannot be sent (holding a lambda, a lock, an open file).
    import pickle

    attempt = Attempt(JOB, 3, "why")
    assert pickle.loads(pickle.dumps(attempt)) == attempt


@pytest.mark.parametrize("launcher_args, launcher_env, nodes, expected", [
    (["--master", "etcd://127.0.0.1:2379", "--elastic_level", "1"], {}, "2", True),
    (["--master=etcd://127.0.0.1:2379", "--elastic_level=2"], {}, "2", True),
    ([], {"PADDLE_MASTER": "etcd://127.0.0.1:2379", "PADDLE_ELASTIC_LEVEL": "1"}, "2", True),
    (["--master", "127.0.0.1:8090", "--elastic_level", "1"], {}, "2", False),  # no etcd: never restarts
    (["--master", "etcd://127.0.0.1:2379"], {}, "2", False),  # elastic level -1 by default: no restart
    (["--master", "etcd://127.0.0.1:2379", "--elastic_level", "0"], {}, "2", False),
    (["--master", "etcd://127.0.0.1:2379", "--elastic_level", "1"], {}, "1", False),  # one node
], ids=["args", "args=value", "environment", "no-etcd", "no-level", "level-0", "one-node"])
def test_a_process_tells_whether_its_launcher_restarts_a_job_of_several_nodes(launcher_args, launcher_env, nodes,
                                                                              expected):
    # The launcher's options are read off the parent process: here a Python process with the launcher's arguments
    # that starts the child asking. Catches options read from the wrong process, a form of them not understood,
    # and a process that would wait for a launcher that never restarts the job (and so never ends it).
    child = ("import os\nfrom ppmoco.engine.restart import restarts_across_nodes\n"
             f"print(restarts_across_nodes({{'PADDLE_TRAINER_ID': '1', 'PADDLE_NNODES': {nodes!r}}}))\n")
    parent = ("import subprocess, sys\n"
              f"sys.exit(subprocess.run([sys.executable, '-c', {child!r}]).returncode)\n")
    proc = subprocess.run([sys.executable, "-c", parent, *launcher_args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": ROOT, **launcher_env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(expected)


def test_a_process_stopped_by_another_waits_for_its_launcher_and_no_longer(caplog):
    # Catches a wait that a launcher's SIGTERM does not end (the launcher would kill the process after its own
    # 30 s), one that never ends without it, and handlers left in place after it.
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    wait_for_launcher("RuntimeError: gloo TIMEOUT", grace_s=20)
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) is previous
    assert "(RuntimeError: gloo TIMEOUT): waiting up to 20 s for this node's launcher" in caplog.text
    started = time.monotonic()
    wait_for_launcher("a stop signal on another rank", grace_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5


def test_only_a_stop_or_failure_that_came_from_another_process_is_left_to_the_launcher():
    # Catches this process's own failures taken for another's (it would keep its peers waiting for it) and a
    # collective that lost its peer, or a stop signal received elsewhere, taken for its own.
    from ppmoco.engine.engine import failed_elsewhere
    from ppmoco.engine.preemption import ANOTHER_RANK, Preempted

    gloo = RuntimeError("[/paddle/third_party/gloo/gloo/transport/tcp/pair.cc:584] TIMEOUT self_rank = 1\nmore")
    assert failed_elsewhere(gloo) == "RuntimeError: [/paddle/third_party/gloo/gloo/transport/tcp/pair.cc:584] " \
                                     "TIMEOUT self_rank = 1"
    assert failed_elsewhere(RuntimeError("NCCL error: unhandled system error")) is not None
    assert failed_elsewhere(Preempted("stopped by ...", ANOTHER_RANK)) == ANOTHER_RANK
    assert failed_elsewhere(Preempted("stopped by SIGTERM ...", "SIGTERM")) is None
    assert failed_elsewhere(DataError("cannot decode image gloo.png")) is None
    assert failed_elsewhere(ValueError("a bug")) is None
