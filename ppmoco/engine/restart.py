"""Restarts in place: the attempts of one `paddle.distributed.launch` job, and failures that repeat.

With `--elastic_level 1` and an etcd master (`--master etcd://HOST:PORT`, also for one node) the
launcher of each node restarts every process of the job when one fails, up to `--max_restart` times,
with the same command, and tells the processes nothing about it (no restart count; the job id only where
it was given as the environment variable PADDLE_JOB_ID). A node lost with its launcher is started again by
the cluster's scheduler, whose new launcher joins the others. What tells an attempt of the same job from
another run is therefore its launchers (`Launch`): each node's launcher process and POD_NAME
(ppmoco.engine.lock.launcher_job), unchanged across its restarts and another for every other launch. An
attempt that shares a launcher with the previous one continues its job (one node's restart, or a lost node
that rejoined the others); so does one under the previous attempt's PADDLE_JOB_ID (a job its scheduler
started again on every node: a requeued Slurm job). A job started anew by hand on the same output folder
has other launchers and, unless it reuses the job id, is a new job.

Rank 0 keeps the job's attempts in `output_dir/.ppmoco.job`: the job (the launcher of its first attempt's
rank 0, which names it in its checkpoints), its PADDLE_JOB_ID, and per attempt its number, its launchers
and the failures its ranks recorded. A rank that fails (or hangs: the watchdog) writes one failure record,
`.ppmoco.failure.<rank>`: the attempt, the checkpoint the attempt resumed from, the step it was in, the
one-line cause and the time; the next attempt's rank 0, wherever it runs (output_dir is shared), moves the
records into `.ppmoco.job`. A restart goes on from the newest intact checkpoint its job wrote, whatever
Engine.save_load says (the first attempt followed it). When the last two attempts with recorded failures
resumed from the same checkpoint and failed on the same rank with the same cause (a corrupt input, a bug
reached at one step), no restart can get past it: every further attempt stops before training with one
line that says so, the line the launcher shows when it gives up after --max_restart.

A job of several nodes restarts when a launcher sees another node go (its heartbeat in etcd, a lease of
10 s, lapses or is cleared): it stops its own processes and waits for its peers. A launcher whose process
ends first, failed because another node's did (a collective that lost its peer, a stop signal received
elsewhere), takes that failure for its own node's, and Paddle 3.3.1's launcher then checks for its peers
before its watch of etcd has reset its state, finds none and gives up when that watch is late (a loaded
machine). Such a process therefore waits for its launcher to stop it (wait_for_launcher).
"""
import dataclasses
import json
import logging
import os
import signal
import threading
import time

from ppmoco.errors import PpmocoError
from ppmoco.fileio import write_text_atomic

JOB_FILE = ".ppmoco.job"
FAILURE_PREFIX = ".ppmoco.failure."
# The launcher sees a lost node when its heartbeat lease (10 s) lapses and polls its processes every 2 s.
LAUNCHER_GRACE_S = 30
logger = logging.getLogger("ppmoco")


class RepeatedFailure(PpmocoError):
    """The job's last two attempts failed alike: restarting again cannot get past the failure."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """Who runs an attempt: `launchers`, the launcher of each node (ppmoco.engine.lock.launcher_job), rank
    0's first, and `job_id`, the PADDLE_JOB_ID they were started under (None where it is unset)."""
    launchers: tuple
    job_id: str = None

    def continues(self, earlier):
        """Whether `earlier`, a lock's holder or the record of a job's last attempt (a dict with its
        `launchers` and `job_id`), was an attempt of the job this one continues: they share a launcher, or
        a job id. A launcher ends the processes of an attempt before it starts the next one, so such a
        holder is gone, on whichever host it ran."""
        launchers = earlier.get("launchers")
        shared = isinstance(launchers, list) and any(launcher in self.launchers for launcher in launchers)
        return shared or (self.job_id is not None and earlier.get("job_id") == self.job_id)


@dataclasses.dataclass
class Attempt:
    """Attempt `number` (0: the first run; then each restart) of the job named `job`; `repeated`: the
    one-line reason to stop at once, when the failures of the last attempts repeat."""
    job: str
    number: int
    repeated: str = None


def _read_json(path):
    """The JSON object in `path`, {} where it is missing or damaged (written whole, so damaged means
    another writer's leftover: nothing to keep)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _failure_files(output_dir):
    return [os.path.join(output_dir, name) for name in sorted(os.listdir(output_dir))
            if name.startswith(FAILURE_PREFIX) and not name.endswith(".tmp")]


def begin_attempt(output_dir, launch):
    """Rank 0, holding the output folder's lock: record a new attempt of `launch` (a Launch; None: not
    launched, nothing to record) in `output_dir/.ppmoco.job` and return it, with the reason to stop when
    the job's failures repeat. The attempt continues the job recorded there when it continues its last
    attempt (Launch.continues); otherwise it starts a new job, whose first attempt's rank 0 launcher names
    it, and another job's record and failure records are replaced."""
    if launch is None:
        return None
    path = os.path.join(output_dir, JOB_FILE)
    record = _read_json(path)
    attempts = record.get("attempts")
    last = attempts[-1] if isinstance(attempts, list) and attempts and isinstance(attempts[-1], dict) else None
    job = record.get("job")
    if not (isinstance(job, str) and last is not None
            and launch.continues({"launchers": last.get("launchers"), "job_id": record.get("job_id")})):
        job, attempts = launch.launchers[0], []  # a new job
    for file in _failure_files(output_dir):
        failure = _read_json(file)
        number = failure.pop("attempt", None)
        if failure.pop("job", None) == job and isinstance(number, int) and 0 <= number < len(attempts):
            attempts[number]["failures"].append(failure)
        os.remove(file)
    attempt = Attempt(job, len(attempts), repeated_failure(attempts, launch.job_id))
    attempts.append({"attempt": attempt.number, "launchers": list(launch.launchers), "pid": os.getpid(),
                     "started": time.time(), "failures": []})
    write_text_atomic(path, json.dumps({"job": job, "job_id": launch.job_id, "attempts": attempts}, indent=1) + "\n")
    return attempt


def record_failure(output_dir, attempt, rank, step, resumed, cause):
    """Rank `rank` of `attempt` failed in step `step` (resumed from checkpoint `resumed`, None: from the
    start) with one-line `cause`: leave the record the next attempt's rank 0 reads."""
    failure = {"job": attempt.job, "attempt": attempt.number, "rank": rank, "step": step,
               "resumed": resumed, "cause": cause, "time": time.time()}
    write_text_atomic(os.path.join(output_dir, f"{FAILURE_PREFIX}{rank}"), json.dumps(failure) + "\n")


def _key(failure):
    return failure.get("resumed"), failure.get("rank"), failure.get("cause")


def repeated_failure(attempts, job_id=None):
    """The one-line reason to stop when the last two attempts with recorded failures share one: the same
    checkpoint resumed, the same rank, the same cause (an attempt killed without a word records none
    and changes nothing; one that got further wrote a newer checkpoint, which the next one resumed).
    `job_id`: the job's PADDLE_JOB_ID, under which a new run would continue the job (and stop again)."""
    failed = [a for a in attempts if a["failures"]]
    if len(failed) < 2:
        return None
    before, last = failed[-2:]
    keys = {_key(f) for f in before["failures"]}
    same = [f for f in last["failures"] if _key(f) in keys]
    if not same:
        return None
    # The first rank to fail is the cause; ranks waiting for it in a collective fail after it.
    failure = min(same, key=lambda f: f.get("time", 0))
    steps = sorted({f["step"] for f in before["failures"] + last["failures"] if _key(f) == _key(failure)})
    start = failure["resumed"] or "the start"
    again = "" if job_id is None else f" under another PADDLE_JOB_ID than {job_id}"
    return (f"attempts {before['attempt']} and {last['attempt']} of this job both went on from {start} and failed "
            f"on rank {failure['rank']} in step {' and '.join(map(str, steps))}: {failure['cause']}; restarting "
            "cannot get past that, so this attempt stops before training: fix the cause, then run the command "
            f"again{again} (Engine.save_load.auto_resume=true continues from {start})")


def _launcher_setting(pid, flag, variable):
    """The value of option `flag` of paddle.distributed.launch process `pid` (`flag VALUE`, `flag=VALUE`, or
    its environment variable `variable`), None where it is not set or cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(v.split("=", 1) for v in f.read().decode(errors="replace").split("\0") if "=" in v)
    except OSError:
        return None
    for arg, value in zip(args, args[1:] + [None]):
        if arg == flag:
            return value
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return environ.get(variable)


def restarts_across_nodes(environ=None):
    """Whether this process is one of a job of several nodes that its launcher restarts in place: an etcd
    master and an elastic level of 1 or more (module docstring)."""
    environ = os.environ if environ is None else environ
    nodes = environ.get("PADDLE_NNODES", "1")
    if "PADDLE_TRAINER_ID" not in environ or not nodes.isdigit() or int(nodes) < 2:
        return False
    launcher = os.getppid()
    master = _launcher_setting(launcher, "--master", "PADDLE_MASTER") or ""
    level = (_launcher_setting(launcher, "--elastic_level", "PADDLE_ELASTIC_LEVEL") or "").strip()
    return master.startswith("etcd://") and level.lstrip("-").isdigit() and int(level) > 0


def wait_for_launcher(cause, grace_s=LAUNCHER_GRACE_S):
    """Wait until this node's launcher ends this process (SIGTERM or SIGINT, which end the wait only) or
    `grace_s` seconds pass: the failure `cause` came from another node, which this node's launcher sees go
    and restarts the job for (module docstring). Only the main thread can receive the signals."""
    if threading.current_thread() is not threading.main_thread():
        return
    ended = []
    handlers = {signum: signal.signal(signum, lambda signum, frame: ended.append(signum))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    logger.warning(f"stopped by another node's process ({cause}): waiting up to {grace_s:g} s for this node's "
                   "launcher to restart the job")
    try:
        end = time.monotonic() + grace_s
        while not ended and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
