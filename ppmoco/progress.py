"""Progress lines with a rate and an ETA for long phases that are not training steps (listing and
building datasets, feature extraction, evaluation passes): one line at most every `interval` seconds,
and one at the end."""
import datetime
import logging
import time

logger = logging.getLogger("ppmoco")
INTERVAL = 10.0  # seconds between progress lines of one phase


def format_eta(seconds):
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


class Progress:
    """Counts `total` items (e.g. images) of a phase called `name`; `advance(n)` after each chunk.

    `brief` phases (listing a dataset, which is instant for small ones) print nothing when they end
    within `interval`. `clock` is injectable so that tests can step time.
    """

    def __init__(self, name, total, unit="images", interval=None, clock=time.perf_counter, brief=False):
        self.name, self.total, self.unit, self.clock = name, total, unit, clock
        self.interval = INTERVAL if interval is None else interval
        self.brief = brief
        self.done = 0
        self.start = self.last = clock()

    def advance(self, count):
        self.done += count
        now = self.clock()
        if self.done < self.total and now - self.last < self.interval:
            return
        if self.brief and self.done >= self.total and now - self.start < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.done >= self.total:
            logger.info(f"[{self.name}] {self.done} {self.unit} in {elapsed:.1f} s ({rate:.1f} {self.unit}/s)")
        else:
            eta = format_eta((self.total - self.done) / rate if rate > 0 else 0)
            logger.info(f"[{self.name}] {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, eta: {eta}")
