"""One training run per output folder: `output_dir/.ppmoco.lock` names the run that holds it.

Two runs writing one folder interleave checkpoints, and `keep_last` rotation deletes the other
run's files. The lock file holds the holder's host, pid, process start time and command; it is
created whole or not at all (written aside, then hard-linked into place, which fails if it exists).
A lock whose process is gone from this host (or whose pid now belongs to a process started at
another time) is stale, e.g. after kill -9: the next run takes it over with a warning. A lock held
from another host cannot be checked from here and is always respected. Evaluation-only tools do not
take it: they write nothing a training run reads.

Taking over is atomic: of several runs taking one stale lock over at once, exactly one gets it and
the others find its lock live. Each run replaces the stale lock only while it holds the takeover
claim `.ppmoco.lock.takeover` (created like the lock, held for milliseconds), and only if the lock
still holds the very bytes it judged stale (a live lock never does: its pid, start and time differ).
A claim left by a run killed while holding it is stale in turn and is taken over the same way,
under `.ppmoco.lock.takeover.takeover`.

A run started by `paddle.distributed.launch` also records who launched it (restart.Launch: each node's
launcher, `launcher_job`, and PADDLE_JOB_ID): when the launchers restart the job in place, or a lost node
rejoins it (ppmoco/engine/restart.py), the new rank 0, on whichever node, finds the lock of the job's
previous attempt, whose processes the launchers have ended, and takes it over without a warning (the
run's log says which restart it is), also when it was held from another host. A holder on this host that
still runs is refused as above, and the lock of any other run is judged as above.
"""
import contextlib
import json
import logging
import os
import socket
import sys
import time

import paddle.distributed as dist

from ppmoco.engine.restart import Launch, RepeatedFailure, begin_attempt
from ppmoco.errors import PpmocoError

logger = logging.getLogger("ppmoco")
LOCK_NAME = ".ppmoco.lock"
TAKEOVER = ".takeover"  # the suffix of a file's takeover claim


class OutputDirInUse(PpmocoError):
    """Another live run holds the output folder's lock."""


def process_start(pid):
    """The start time of process `pid` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            # The command name (field 2) may hold spaces and parentheses: fields count from its end.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def launcher_job(environ=None):
    """'host/launcher pid/launcher start/POD_NAME' of the paddle.distributed.launch process that started
    this one: the same in each of its restarts, and another for every other launch (a recycled pid
    starts at another time); None for a process the launcher did not start."""
    environ = os.environ if environ is None else environ
    pod = environ.get("POD_NAME")
    if not pod or "PADDLE_TRAINER_ID" not in environ:
        return None
    parent = os.getppid()
    start = process_start(parent)
    return None if start is None else f"{socket.gethostname()}/{parent}/{start}/{pod}"


def launch_job_id(environ=None):
    """The PADDLE_JOB_ID a launched process runs under (the launcher reads it as --job_id; given as --job_id
    alone it does not reach the processes), None where it is unset or Paddle's placeholder 'default'."""
    environ = os.environ if environ is None else environ
    job_id = environ.get("PADDLE_JOB_ID")
    return job_id if job_id and job_id != "default" and "PADDLE_TRAINER_ID" in environ else None


def holder_alive(holder):
    """Whether the process a lock names still runs; True when this host cannot tell (another host),
    False for a lock that names no process (damaged)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # a damaged lock: nothing holds it
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    started = process_start(pid)
    return started is None or holder.get("start") is None or started == holder["start"]


def _describe(holder):
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} ({holder.get('command', '?')})"


def _encode(info):
    return json.dumps(info).encode("utf-8")


def _create(path, info):
    """Create `path` holding `info`, whole or not at all; False where it exists."""
    aside = f"{path}.{info['host']}.{info['pid']}"
    with open(aside, "wb") as f:
        f.write(_encode(info))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(aside)


def _read_bytes(path):
    """The bytes of `path`, None where it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return b""  # unreadable: damaged


def _parse(data):
    """A lock's holder from its bytes; {} where they are damaged (written whole by design, so unreadable
    means damaged: nothing holds it)."""
    try:
        holder = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        return {}
    return holder if isinstance(holder, dict) else {}


class OutputDirLock:
    """`with OutputDirLock(output_dir):` holds the folder's lock for the block (training's run)."""

    TAKEOVER_WAIT = 10.0  # seconds to wait for another run's takeover claim (held for milliseconds)

    def __init__(self, output_dir, command=None, launch=None):
        """`launch`: the restart.Launch of this run, None when paddle.distributed.launch did not start it."""
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.created = False
        self.launch = launch
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                     "time": time.time(), "command": command or " ".join(sys.argv),
                     "launchers": None if launch is None else list(launch.launchers),
                     "job_id": None if launch is None else launch.job_id}

    def _earlier_attempt(self, holder):
        """Whether the lock's holder ran an earlier attempt of this run's job (restart.Launch.continues)."""
        return self.launch is not None and self.launch.continues(holder)

    def _read(self):
        data = _read_bytes(self.path)
        return None if data is None else _parse(data)

    def acquire(self):
        folder = os.path.dirname(self.path)
        self.created = not os.path.isdir(folder)  # a run stopped before writing leaves no folder behind
        os.makedirs(folder, exist_ok=True)
        while not _create(self.path, self.info):
            data = _read_bytes(self.path)
            if data is None:  # released meanwhile
                continue
            holder = _parse(data)
            earlier = self._earlier_attempt(holder)
            # The launchers ended an earlier attempt's processes; on this host that is checked all the same.
            if holder_alive(holder) and not (earlier and holder.get("host") != socket.gethostname()):
                raise OutputDirInUse(
                    f"{os.path.dirname(self.path)} is in use by the run of {_describe(holder)}; wait for it, set "
                    f"Engine.save_load.output_dir to another folder, or delete {self.path} if that run is gone")
            if self._replace_stale(self.path, data):
                if not earlier:  # a restart says so in the log later
                    logger.warning(f"took over the lock of {os.path.dirname(self.path)} from the run of "
                                   f"{_describe(holder)}, which is gone")
                break
            # Another run replaced (or removed) the stale lock first: look again at what is there now.
        return self

    def _replace_stale(self, path, stale):
        """Replace the file `path`, judged stale when it held the bytes `stale`, by one holding our info;
        whether ours is there now. Runs doing this at once exclude each other through `path`'s claim,
        under which the file is replaced only if it still holds `stale`: of several runs that judged it
        stale, the first replaces it and the others find another file (or none) there."""
        claim = path + TAKEOVER
        self._claim(claim)
        try:
            if _read_bytes(path) != stale:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return _create(path, self.info)
        finally:
            if _read_bytes(claim) == _encode(self.info):
                os.remove(claim)

    def _claim(self, claim):
        """Hold the takeover claim `claim`: wait while a live run holds it (for milliseconds), take it over
        where its run is gone (killed while taking over), refuse after TAKEOVER_WAIT seconds."""
        deadline = time.monotonic() + self.TAKEOVER_WAIT
        while not _create(claim, self.info):
            data = _read_bytes(claim)
            if data is None:  # released meanwhile
                continue
            holder = _parse(data)
            if not holder_alive(holder):
                if self._replace_stale(claim, data):
                    return
                continue
            if time.monotonic() > deadline:
                raise OutputDirInUse(
                    f"{os.path.dirname(self.path)} is being taken over by the run of {_describe(holder)}; "
                    f"delete {claim} if that run is gone")
            time.sleep(0.002)

    def release(self):
        if self._read() == self.info:  # never another run's lock (ours may have been taken as stale)
            os.remove(self.path)
            if self.created and not os.listdir(os.path.dirname(self.path)):
                os.rmdir(os.path.dirname(self.path))

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def current_launch(env):
    """The restart.Launch of this training run's processes (every rank calls it: a collective), None when
    paddle.distributed.launch did not start them: each node's launcher once, rank 0's first."""
    own = launcher_job()
    launchers = [own]
    if env.world_size > 1:
        launchers = []
        dist.all_gather_object(launchers, own)
    launchers = tuple(dict.fromkeys(job for job in launchers if job is not None))
    return Launch(launchers, launch_job_id()) if launchers else None


@contextlib.contextmanager
def training_lock(output_dir, env):
    """The output folder's lock for a training run of `env`'s processes, yielding its restart.Attempt
    (None when paddle.distributed.launch did not start it). Rank 0 holds the lock and records the
    attempt, and every rank learns rank 0's outcome through a collective, so none is left waiting in
    the next one: the attempt, or why the run cannot go on (the folder is another run's, the job's
    failures repeat, the folder cannot be written), which every rank then raises."""
    lock, refusal, attempt = OutputDirLock(output_dir, launch=current_launch(env)), None, None
    if env.is_main:
        try:
            lock.acquire()
            try:
                attempt = begin_attempt(output_dir, lock.launch)
                if attempt is not None and attempt.repeated:
                    raise RepeatedFailure(attempt.repeated)
            except BaseException:
                lock.release()
                raise
        except (OutputDirInUse, RepeatedFailure, OSError) as err:
            refusal = err
    if env.world_size > 1:
        decision = [refusal, attempt]
        dist.broadcast_object_list(decision, src=0)
        refusal, attempt = decision
    if refusal is not None:
        raise refusal
    try:
        yield attempt
    finally:
        if env.is_main:
            lock.release()
