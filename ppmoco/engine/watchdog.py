"""Hang watchdog: a rank that makes no progress for Engine.hang_timeout seconds ends the run, saying where.

A rank that hangs instead of dying (a stuck file system read, a deadlock, a collective whose peer is
gone) leaves its peers waiting: gloo gives up after 30 s with an error that names no rank, NCCL only
after PADDLE_PG_TIMEOUT (30 minutes). Each training process runs this watchdog: the training loop
calls `beat()` after every step, and `paused()` covers the phases that may take long (evaluation,
checkpoint writes). When the beats stop, the watchdog logs where this rank's main thread is, which
tells the rank that hangs (somewhere else) from the ranks waiting for it (in a collective), and ends
the process with EXIT_HUNG; `paddle.distributed.launch` then stops the others.
"""
import contextlib
import logging
import os
import sys
import threading
import time
import traceback

logger = logging.getLogger("ppmoco")
EXIT_HUNG = 3
_COLLECTIVE = os.sep + os.path.join("paddle", "distributed") + os.sep  # frames inside Paddle's collectives


def where(frame):
    """(innermost ppmoco or user frame as 'file:line in function', whether Paddle's collectives are on the stack)."""
    stack = traceback.extract_stack(frame)
    in_collective = any(_COLLECTIVE in f.filename for f in stack)
    own = [f for f in stack if "site-packages" not in f.filename and "/lib/python" not in f.filename]
    top = (own or stack)[-1]
    return f"{top.filename}:{top.lineno} in {top.name}", in_collective


class Watchdog:
    """`with Watchdog(timeout, rank) as dog:` watches the block; `timeout` <= 0 watches nothing.
    `on_hang(line)` is called with the line that ends the run, before it ends."""

    def __init__(self, timeout, rank, clock=time.monotonic, on_hang=None):
        self.timeout, self.rank, self.clock, self.on_hang = timeout, rank, clock, on_hang
        self.last = clock()
        self.pauses = 0
        self._stop = threading.Event()
        self._main = threading.main_thread().ident

    def beat(self):
        self.last = self.clock()

    @contextlib.contextmanager
    def paused(self):
        self.pauses += 1
        try:
            yield
        finally:
            self.pauses -= 1
            self.beat()

    def overdue(self):
        """Seconds since the last beat when they exceed the timeout outside a pause, else None."""
        quiet = self.clock() - self.last
        return quiet if self.timeout > 0 and self.pauses == 0 and quiet > self.timeout else None

    def report(self, quiet, frame=None):
        """The line that ends the run: this rank, how long, and where its main thread (or `frame`) is."""
        spot, in_collective = where(frame or sys._current_frames()[self._main])
        state = ("waiting in a collective for another rank (the rank that hangs says so in its own log)"
                 if in_collective else "stuck outside any collective: this rank hangs")
        return (f"rank {self.rank} made no progress for {quiet:.0f} s (Engine.hang_timeout {self.timeout:g} s), "
                f"{state}, at {spot}; stopping")

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            quiet = self.overdue()
            if quiet is not None:
                line = self.report(quiet)
                logger.error(line)
                for handler in logger.handlers:
                    handler.flush()
                print(f"error: {line}", file=sys.stderr, flush=True)
                if self.on_hang is not None:
                    with contextlib.suppress(OSError):
                        self.on_hang(line)
                os._exit(EXIT_HUNG)

    def __enter__(self):
        self.beat()
        if self.timeout > 0:
            threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
