"""Preemption: SIGTERM, SIGINT or SIGUSR1 stop training at the next step boundary with a checkpoint.

Slurm and Kubernetes send SIGTERM (Slurm's `--signal` can send SIGUSR1 earlier) and kill a grace
period later. The handler only records the signal; the training loop asks `requested()` after each
step, which every rank answers alike (a max over ranks: a signal seen by one rank stops all of them
at the same step, and none waits in a collective for a rank that left). The Engine then writes a
`step_S` checkpoint and raises Preempted: exit code EXIT_PREEMPTED, and `auto_resume` continues
bit-identically. A second signal restores the default action and delivers itself again (a second
Ctrl-C ends the run at once; a checkpoint being written stays whole, as every write is atomic).
Data-loader workers ignore these signals (ppmoco/data/loader.py): their process stops them.
"""
import logging
import os
import signal
import threading

import paddle
import paddle.distributed as dist

from ppmoco.distributed import world_size
from ppmoco.errors import PpmocoError

logger = logging.getLogger("ppmoco")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, run again (to resume)


class Preempted(PpmocoError):
    """Training stopped on a signal after saving a checkpoint to resume from."""

    exit_code = EXIT_PREEMPTED


class StopSignals:
    """`with StopSignals() as stop:` records the stop signals for the block; `stop.requested()` after
    each step says, the same on every rank, whether to stop there."""

    def __init__(self):
        self.received = None  # the first signal's name
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        logger.warning(f"received {self.received}: stopping after this step with a checkpoint (again: stop at once)")

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()

    def requested(self):
        """Whether any rank received a stop signal; a collective when there are several ranks."""
        if world_size() == 1:
            return self.received is not None
        flag = paddle.to_tensor([int(self.received is not None)], dtype="int32")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and self.received is None:
            self.received = "a stop signal on another rank"
        return bool(int(flag.item()))
