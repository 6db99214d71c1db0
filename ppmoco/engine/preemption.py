"""Preemption: SIGTERM, SIGINT or SIGUSR1 stop training at a step boundary with a checkpoint.

Slurm and Kubernetes send SIGTERM (Slurm's `--signal` can send SIGUSR1 earlier) and kill a grace
period later. The handler only records the signal; the training loop asks `requested()` after each
step, which every rank answers alike: a signal seen by one rank stops all of them at the same step,
and none waits in a collective for a rank that left. One process stops after the step it was
signalled in. Several processes agree on the answer with a collective, and that costs nothing on
the steps between two agreements: they happen about every CHECK_SECONDS (each agreement also fixes
how many steps away the next one is, the same for every rank), and go through a gloo (CPU) process
group, so no GPU tensor is read and the GPU's queue of work never drains for them. The Engine then
writes a `step_S` checkpoint and raises Preempted: exit code EXIT_PREEMPTED, and `auto_resume`
continues bit-identically. A SIGINT after the first signal restores the default action and delivers
itself again (a second Ctrl-C ends the run at once; a checkpoint being written stays whole, as every
write is atomic). A repeated SIGTERM or SIGUSR1 changes nothing: those come from schedulers and
launchers, which repeat them (paddle.distributed.launch sends its processes SIGTERM up to three times
0.2 s apart; Slurm signals every process of a step, so a launched one gets Slurm's and the launcher's)
and end a process that outlasts their grace period with SIGKILL. Data-loader workers ignore these
signals (ppmoco/data/loader.py): their process stops them.
"""
import logging
import os
import signal
import threading
import time

import paddle
import paddle.distributed as dist

from ppmoco.distributed import world_size
from ppmoco.errors import PpmocoError

logger = logging.getLogger("ppmoco")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, run again (to resume)
# Seconds between two agreements of several ranks: well inside the grace periods (30 s by default
# for Slurm, Kubernetes and paddle.distributed.launch), and one tiny CPU collective per interval.
CHECK_SECONDS = 0.5
MAX_STEPS_BETWEEN_CHECKS = 10000
_cpu_groups = {}


ANOTHER_RANK = "a stop signal on another rank"  # what a rank that received none stopped on


class Preempted(PpmocoError):
    """Training stopped on a signal after saving a checkpoint to resume from; `signal_name`: the
    signal's, or ANOTHER_RANK."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, message, signal_name=None):
        super().__init__(message)
        self.signal_name = signal_name


def _cpu_group():
    """The process group for the stop flag: the default one where it is gloo (a CPU run), else a
    gloo group over the same ranks, made once per process and by every rank alike (a collective)."""
    if "stop" not in _cpu_groups:
        default_is_gloo = dist.get_backend().lower() == "gloo"
        _cpu_groups["stop"] = None if default_is_gloo else dist.new_group(backend="gloo")
    return _cpu_groups["stop"]


class StopSignals:
    """`with StopSignals() as stop:` records the stop signals for the block; `stop.requested()` after
    each step says, the same on every rank, whether to stop there. Every rank must call it once per
    step (as any collective); `check_seconds` is the time aimed at between two agreements."""

    def __init__(self, check_seconds=CHECK_SECONDS):
        self.received = None  # the first signal's name
        self.check_seconds = check_seconds
        self.checks = 0  # collectives done (several ranks)
        self._previous = {}
        self._group = None
        self._steps_to_check = 1  # the first agreement follows the first step
        self._steps_since_check = 0
        self._last_check = time.monotonic()

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C again
                self._restore()
                os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        when = "this step" if world_size() == 1 else f"the step the ranks agree on (about {self.check_seconds:g} s)"
        logger.warning(f"received {self.received}: stopping after {when} with a checkpoint (Ctrl-C: stop at once)")

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        if world_size() > 1:
            self._group = _cpu_group()
        self._last_check = time.monotonic()
        return self

    def __exit__(self, *exc):
        self._restore()

    def requested(self):
        """Whether to stop after this step: on one rank, whether it received a stop signal; on
        several, whether any had by the last agreement, which takes place on the same step of every
        rank (a collective there, nothing in between)."""
        if world_size() == 1:
            return self.received is not None
        self._steps_since_check += 1
        if self._steps_since_check < self._steps_to_check:
            return False
        now = time.monotonic()
        step_seconds = (now - self._last_check) / self._steps_since_check
        proposed = min(MAX_STEPS_BETWEEN_CHECKS, max(1, int(self.check_seconds / max(step_seconds, 1e-9))))
        # One all-reduce: the max of the flags, and (negated) the fewest steps any rank proposes until
        # the next agreement, so the ranks' next check falls on the same step wherever they measured.
        values = paddle.to_tensor([int(self.received is not None), -proposed], dtype="int64",
                                  place=paddle.CPUPlace())
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._group)
        stop, minus_steps = (int(v) for v in values.numpy())
        self.checks += 1
        self._steps_to_check, self._steps_since_check, self._last_check = -minus_steps, 0, time.monotonic()
        if stop and self.received is None:
            self.received = ANOTHER_RANK
        return bool(stop)
