"""tools/benchmark.py runs on a tiny configuration and writes valid JSON (no speed assertions)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


PHASES = {"eager": {"momentum_update", "enqueue", "optimizer", "key_fwd", "query_fwd_bwd"},
          "static": {"momentum_update", "enqueue", "program"}}


@pytest.mark.slow
@pytest.mark.parametrize("execution", ["eager", "static"])
def test_benchmark_writes_json_with_measured_fields(tmp_path, execution):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "-c",
           os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml"),
           "-o", "Model.model.base_encoder.widths=[4,8,8,8]",
           "-o", "Data.Train.sampler.batch_size=16", "-o", "Model.model.K=64", "-o", f"Engine.execution={execution}",
           "--steps", "2", "--warmup", "1", "--data-samples", "4", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    step = result["step"]
    assert result["images_per_sec"] == step["images_per_sec"] > 0
    assert step["batch_size"] == 16 and step["image_size"] == [16, 16] and step["steps"] == 2
    phases = step["phases_ms"]
    assert set(phases) == PHASES[execution] and step["execution"].startswith(execution)
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(step["ms_per_step"], rel=1e-6)
    assert result["data"]["images_per_sec_per_worker"] > 0 and result["data"]["samples"] == 4
    assert result["peak_memory_mb"] > 0 and result["device"] == "cpu"
    assert step["first_step_s"] > 0
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    assert result["cpu"]["model"] and result["cpu"]["model"] in cpuinfo
    assert all(f" {flag}" in cpuinfo for flag in result["cpu"]["flags"])
    assert "step images/s" in proc.stdout


def test_benchmark_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr


# Catches: the grad-sync benchmark not running both ways under launch, or recording the wrong setting.
@pytest.mark.slow
@pytest.mark.parametrize("sync", ["fused", "dataparallel"])
def test_grad_sync_benchmark_runs_on_two_processes(tmp_path, sync):
    out = tmp_path / "sync.json"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "logs"), os.path.join(ROOT, "tools", "benchmark_grad_sync.py"), "--sync", sync,
           "--arch", "resnet18", "--px", "16", "--batch", "2", "--steps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["sync"], result["processes"], result["batch"]) == (sync, 2, 2)
    assert result["median_step_s"] > 0 and result["cpu"]["model"]
