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


def test_brief_phase_is_silent_when_quick_and_reports_when_long(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        quick = Progress("listing a", total=3, unit="folders", interval=10.0, clock=clock, brief=True)
        for _ in range(3):
            clock.now += 1.0
            quick.advance(1)
        assert caplog.records == []  # catches a line for every small dataset listed
        slow = Progress("listing b", total=3, unit="folders", interval=10.0, clock=clock, brief=True)
        for _ in range(3):
            clock.now += 6.0
            slow.advance(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["[listing b] 2/3 folders, 0.2 folders/s, eta: 0:00:06",
                     "[listing b] 3 folders in 18.0 s (0.2 folders/s)"]


# Catches: listing a dataset (class folders, an unlabelled tree, a list file) without progress.
def test_dataset_listing_reports_progress(tmp_path, caplog, monkeypatch):
    import ppmoco.progress
    from ppmoco.data.datasets import list_file, list_folder, list_images

    monkeypatch.setattr(ppmoco.progress, "INTERVAL", 0.0)  # a line at every step
    for c in "abc":
        (tmp_path / "root" / c).mkdir(parents=True)
        (tmp_path / "root" / c / "x.png").write_bytes(b"")
    (tmp_path / "list.txt").write_text("".join(f"{c}/x.png 0\n" for c in "abc"))
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        list_folder(str(tmp_path / "root"))
        list_images(str(tmp_path / "root"))
        list_file(str(tmp_path / "root"), str(tmp_path / "list.txt"))
    lines = [r.getMessage() for r in caplog.records]
    listing = f"[listing {tmp_path / 'root'}]"
    assert [line.split(",")[0] for line in lines[:2]] == [f"{listing} 1/3 folders", f"{listing} 2/3 folders"]
    assert lines[2].startswith(f"{listing} 3 folders in ")
    assert len([line for line in lines if line.startswith(listing)]) == 6
    assert lines[-1].startswith(f"[reading {tmp_path / 'list.txt'}] 3 lines in ")


# Catches: the kNN classification pass (a [chunk, N_train] block at a time) running without progress.
def test_knn_classification_reports_progress(caplog, monkeypatch):
    import numpy as np

    import ppmoco.progress
    from ppmoco.eval.knn import knn_classify

    monkeypatch.setattr(ppmoco.progress, "INTERVAL", 0.0)
    features = np.eye(4, dtype="float32")
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        knn_classify(features, np.arange(4), features, np.arange(4), 4, ks=[1], chunk_size=2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("[eval knn: classifying] 2/4 images, ")
    assert lines[1].startswith("[eval knn: classifying] 4 images in ")
