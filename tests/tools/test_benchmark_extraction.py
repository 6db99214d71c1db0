"""tools/benchmark_extraction.py runs on a tiny setting and writes valid JSON (no speed assertions)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.slow
def test_benchmark_extraction_writes_every_contender_and_the_errors(tmp_path):
    # Catches a contender or ratio missing from the JSON tools/benchmark.py reads, torchvision not
    # importable the documented way, and a fast path whose features were not compared with eager's.
    out = tmp_path / "extraction.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark_extraction.py"), "--arch", "resnet18",
           "--size", "32", "--batch", "2", "--batches", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    static = {name for name in result["images_per_sec"] if name.startswith("ppmoco_static")}
    assert {"ppmoco_static", "ppmoco_eager", "torchvision"} <= set(result["images_per_sec"])
    assert all(value > 0 for value in result["images_per_sec"].values())
    assert set(result["ratios"]) == {f"{name}_vs_ppmoco_eager" for name in static | {"torchvision"}} | {
        f"{name}_vs_torchvision" for name in static}
    assert result["max_relative_error_vs_eager"]["ppmoco_static"] < 1e-5
    assert result["threads"] == 1 and result["cpu"]["model"] and set(result["build_s"]) == static
