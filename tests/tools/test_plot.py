"""tools/plot.py draws the curves a run logged, at the requested size."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ppmoco.plots import plot_curves, read_scalars

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def fake_run(run_dir):
    """VisualDL logs shaped like a pretraining run with an online kNN monitor."""
    from visualdl import LogWriter
    with LogWriter(logdir=str(run_dir / "vdl")) as writer:
        for step in range(1, 6):
            writer.add_scalar(tag="train/loss", value=5.0 - step, step=step)
            writer.add_scalar(tag="train/lr", value=0.03, step=step)
            writer.add_scalar(tag="train/ips", value=100.0 + step, step=step)
        for k in (200, 10, 20):
            writer.add_scalar(tag=f"eval/knn_k{k}_top1", value=50.0 + k / 10, step=5)


def plot(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_png_of_the_requested_size_with_a_panel_per_logged_curve(tmp_path):
    fake_run(tmp_path)
    proc = plot(str(tmp_path), "--size", "900x600")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(tmp_path / "curves.png") as png:
        assert png.format == "PNG" and png.size == (900, 600)
        assert len(np.unique(np.asarray(png.convert("L")))) > 10  # something is drawn
    # No acc1 or linear logged: no such panels; kNN curves ordered by k (catches a lexical sort).
    assert ("loss: train/loss; learning rate: train/lr; images/s: train/ips; "
            "kNN top-1 (%): eval/knn_k10_top1, eval/knn_k20_top1, eval/knn_k200_top1") in proc.stdout


def test_series_are_read_back_as_written(tmp_path):
    fake_run(tmp_path)
    series = read_scalars(str(tmp_path))
    assert series["train/loss"] == ([1, 2, 3, 4, 5], [4.0, 3.0, 2.0, 1.0, 0.0])
    assert series["eval/knn_k20_top1"] == ([5], [52.0])
    _, panels = plot_curves(series)
    assert panels["images/s"] == ["train/ips"]


def test_a_folder_without_logs_is_a_one_line_error(tmp_path):
    proc = plot(str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}: no VisualDL logs (vdl/vdlrecords.*); "
                                                "give the output_dir of a run"]


@pytest.mark.slow
def test_tsne_of_a_trained_runs_evaluation_images(tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c",
             os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml"), "-o", f"Engine.save_load.output_dir={run}",
             "-o", "Engine.max_steps=2", "-o", "Data.Train.sampler.batch_size=32", "-o", "Model.model.K=64",
             "-o", "Model.model.base_encoder.widths=[4,8,8,8]"]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = plot(str(run), "--tsne", "--size", "600x500")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(run / "tsne.png") as png:
        assert png.format == "PNG" and png.size == (600, 500)
    # The 360 held-out digits of the evaluation split (the training split has 1437: catches the wrong split).
    assert "t-SNE of 360 images in 10 classes, backbone of " in proc.stdout and "step_2" in proc.stdout
    proc = plot(str(run))  # and the curves of the same run
    assert proc.returncode == 0 and "loss: train/loss" in proc.stdout and (run / "curves.png").is_file()
