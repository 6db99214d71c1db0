"""The digits demo's report (tools/summarize_digits.py): the results table from the evaluation runs,
the pretraining curves and the demo's pictures, each named when missing."""
import json
import os
import subprocess
import sys

from PIL import Image
from test_plot import fake_run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def write_results(out, run, results):
    os.makedirs(out / run, exist_ok=True)
    (out / run / "eval_results.json").write_text(json.dumps({"results": results}))


def demo_output(out):
    """The four evaluation runs of the demo, with values that tell every cell apart."""
    for init, base in (("pretrained", 90.0), ("random", 70.0)):
        # ks written out of order: the table must sort them as numbers (10 < 20 < 200)
        write_results(out, f"knn_digits_{init}", {"knn": {str(k): {"top1": base + k / 100, "top5": 99.0}
                                                          for k in (200, 10, 20)}})
        write_results(out, f"lincls_digits_{init}", {"linear": {"top1": base + 5.5, "top5": base + 9.25}})
    fake_run(out / "mocov2_pt_digits")


def summarize(out):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "summarize_digits.py"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


# Catches: rows swapped between the pretrained and random runs, kNN columns in lexical k order,
# top-1 and top-5 of the linear probe swapped, and pictures linked that do not exist.
def test_report_has_the_table_curves_and_pictures(tmp_path):
    demo_output(tmp_path)
    report_dir = tmp_path / "digits_demo"
    report_dir.mkdir()
    Image.new("RGB", (64, 32)).save(report_dir / "views.png")
    Image.new("RGB", (70, 70)).save(report_dir / "tsne_pretrained.png")
    proc = summarize(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (report_dir / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table == [
        "| backbone | kNN k=10 top-1 | kNN k=20 top-1 | kNN k=200 top-1 | linear top-1 | linear top-5 |",
        "| MoCo v2 pretrained | 90.10 | 90.20 | 92.00 | 95.50 | 99.25 |",
        "| random init | 70.10 | 70.20 | 72.00 | 75.50 | 79.25 |"]
    assert "\n".join(table[1:]) in proc.stdout.replace("|---|---|---|---|---|---|\n", "")
    assert "![views](views.png)" in report and "![t-SNE, MoCo v2 pretrained](tsne_pretrained.png)" in report
    assert "(tsne_random.png is missing" in report and "](tsne_random.png)" not in report
    assert "![curves](curves.png)" in report
    with Image.open(report_dir / "curves.png") as png:
        assert png.format == "PNG" and png.size == (1200, 800)


# Catches: a missing evaluation run turned into a traceback or an empty table.
def test_missing_run_is_a_one_line_error(tmp_path):
    demo_output(tmp_path)
    os.remove(tmp_path / "lincls_digits_random" / "eval_results.json")
    proc = summarize(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'lincls_digits_random' / 'eval_results.json'} is missing; run tools/digits_demo.sh "
        "(or tools/supcon_digits.sh) first")


# Catches: --table ignoring the runs it names (the supervised-contrastive benchmark's rows).
def test_table_of_named_runs(tmp_path):
    for run, base in (("mocov2", 90.0), ("supcon_in", 80.0)):
        write_results(tmp_path, f"knn_digits_{run}", {"knn": {"10": {"top1": base, "top5": 99.0}}})
        write_results(tmp_path, f"lincls_digits_{run}", {"linear": {"top1": base + 1, "top5": base + 2}})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "summarize_digits.py"), str(tmp_path),
                           "--table", "supcon_in", "mocov2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "| backbone | kNN k=10 top-1 | linear top-1 | linear top-5 |", "|---|---|---|---|",
        "| supcon_in | 80.00 | 81.00 | 82.00 |", "| mocov2 | 90.00 | 91.00 | 92.00 |"]
    assert not (tmp_path / "digits_demo").exists()
