"""Progress lines: throttled to the interval, with the rate and an ETA from it, and a final line."""
import logging

from ppmoco.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_carry_rate_and_eta_and_come_at_most_once_per_interval(caplog):
    clock = Clock()
    progress = Progress("eval knn: training features", total=1000, interval=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        for _ in range(10):  # 100 images a second, one chunk of 100 every second
            clock.now += 1.0
            progress.advance(100)
    lines = [r.getMessage() for r in caplog.records]
    # t=10 s is the end: only the final line (a line at every chunk would give 10; catches no throttle).
    assert lines == ["[eval knn: training features] 1000 images in 10.0 s (100.0 images/s)"]


def test_eta_is_the_remaining_work_at_the_measured_rate(caplog):
    clock = Clock()
    progress = Progress("extract", total=1000, interval=2.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        clock.now = 2.0
        progress.advance(200)  # 100 images/s, 800 left: 8 s
        clock.now = 3.0
        progress.advance(100)  # within the interval: no line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["[extract] 200/1000 images, 100.0 images/s, eta: 0:00:08"]
