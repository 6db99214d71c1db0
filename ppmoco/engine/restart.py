"""Restarts in place: the attempts of one `paddle.distributed.launch` job, and failures that repeat.

With `--elastic_level 1` and an etcd master (`--master etcd://HOST:PORT`, also for one node) the
launcher restarts every process of the job when one fails, up to `--max_restart` times, with the same
command, and tells the processes nothing about it (no restart count, no job id). What it leaves
unchanged across its restarts, and what tells no other job, is the launcher process itself (their
parent) and its POD_NAME: ppmoco.engine.lock.launcher_job. A job started anew by hand, even on the same
output folder and from the same shell, has another launcher, so it is a new job.

Rank 0 keeps the job's attempts in `output_dir/.ppmoco.job`: the job, and per attempt its number and
the failures its ranks recorded. A rank that fails (or hangs: the watchdog) writes one failure record,
`.ppmoco.failure.<rank>`: the attempt, the checkpoint the attempt resumed from, the step it was in, the
one-line cause and the time; the next attempt's rank 0 moves the records into `.ppmoco.job`. A restart
goes on from the newest intact checkpoint its job wrote, whatever Engine.save_load says (the first
attempt followed it). When the last two attempts with recorded failures resumed from the same
checkpoint and failed on the same rank with the same cause (a corrupt input, a bug reached at one
step), no restart can get past it: every further attempt stops before training with one line that
says so, the line the launcher shows when it gives up after --max_restart.
"""
import dataclasses
import json
import os
import time

from ppmoco.errors import PpmocoError
from ppmoco.fileio import write_text_atomic

JOB_FILE = ".ppmoco.job"
FAILURE_PREFIX = ".ppmoco.failure."


class RepeatedFailure(PpmocoError):
    """The job's last two attempts failed alike: restarting again cannot get past the failure."""


@dataclasses.dataclass
class Attempt:
    """Attempt `number` (0: the first run; then each restart) of launcher job `job`; `repeated`: the
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


def begin_attempt(output_dir, job):
    """Rank 0, holding the output folder's lock: record a new attempt of launcher job `job` (None: not
    launched, nothing to record) in `output_dir/.ppmoco.job` and return it, with the reason to stop
    when the job's failures repeat. Another job's record and failure records are replaced."""
    if job is None:
        return None
    path = os.path.join(output_dir, JOB_FILE)
    record = _read_json(path)
    attempts = record.get("attempts") if record.get("job") == job else None
    if not isinstance(attempts, list):
        attempts = []
    for file in _failure_files(output_dir):
        failure = _read_json(file)
        number = failure.pop("attempt", None)
        if failure.pop("job", None) == job and isinstance(number, int) and 0 <= number < len(attempts):
            attempts[number]["failures"].append(failure)
        os.remove(file)
    attempt = Attempt(job, len(attempts), repeated_failure(attempts))
    attempts.append({"attempt": attempt.number, "pid": os.getpid(), "started": time.time(), "failures": []})
    write_text_atomic(path, json.dumps({"job": job, "attempts": attempts}, indent=1) + "\n")
    return attempt


def record_failure(output_dir, attempt, rank, step, resumed, cause):
    """Rank `rank` of `attempt` failed in step `step` (resumed from checkpoint `resumed`, None: from the
    start) with one-line `cause`: leave the record the next attempt's rank 0 reads."""
    failure = {"job": attempt.job, "attempt": attempt.number, "rank": rank, "step": step,
               "resumed": resumed, "cause": cause, "time": time.time()}
    write_text_atomic(os.path.join(output_dir, f"{FAILURE_PREFIX}{rank}"), json.dumps(failure) + "\n")


def _key(failure):
    return failure.get("resumed"), failure.get("rank"), failure.get("cause")


def repeated_failure(attempts):
    """The one-line reason to stop when the last two attempts with recorded failures share one: the same
    checkpoint resumed, the same rank, the same cause (an attempt killed without a word records none
    and changes nothing; one that got further wrote a newer checkpoint, which the next one resumed)."""
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
    return (f"attempts {before['attempt']} and {last['attempt']} of this job both went on from {start} and failed "
            f"on rank {failure['rank']} in step {' and '.join(map(str, steps))}: {failure['cause']}; restarting "
            "cannot get past that, so this attempt stops before training: fix the cause, then run the command "
            f"again (Engine.save_load.auto_resume=true continues from {start})")
