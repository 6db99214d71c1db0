"""Two real processes under paddle.distributed.launch (gloo on CPU, loopback only)."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

import ppmoco
from ppmoco.host_allocator import find_jemalloc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
pytestmark = pytest.mark.slow


def launch(tmp_path, *args):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "launch_logs"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text(errors="replace") for p in sorted((tmp_path / "launch_logs").glob("workerlog.*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-5000:]
    return logs


def test_two_ranks_share_one_queue_of_rank_ordered_keys(tmp_path):
    launch(tmp_path, os.path.join(ROOT, "tests", "engine", "dist_moco_worker.py"), str(tmp_path))
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    np.testing.assert_array_equal(r0["queue_before"], r1["queue_before"])  # same seed, same start
    np.testing.assert_array_equal(r0["queue"], r1["queue"])
    expected = np.concatenate([r0["keys"], r1["keys"]]).T
    np.testing.assert_allclose(r0["queue"][:, :8], expected, atol=1e-6)
    np.testing.assert_array_equal(r0["queue"][:, 8:], r0["queue_before"][:, 8:])
    assert int(r0["ptr"][0]) == int(r1["ptr"][0]) == 8
    assert not np.allclose(r0["keys"], r1["keys"])
    for r in (r0, r1):  # shuffle then unshuffle returns every sample to its rank and position
        np.testing.assert_array_equal(r["restored"], r["x"])
    shuffled = np.concatenate([r0["shuffled"], r1["shuffled"]])
    assert sorted(shuffled.tolist()) == sorted(np.concatenate([r0["x"], r1["x"]]).tolist())
    np.testing.assert_allclose(r0["mean_grad"], (r0["local_grad"] + r1["local_grad"]) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(r0["mean_grad"], r1["mean_grad"])
    assert np.isfinite(r0["loss"]) and np.isfinite(r1["loss"])
    # One fused all-reduce per dtype; catches concatenating float32 with bfloat16 (an error) or
    # averaging in the wrong dtype.
    for r in (r0, r1):
        np.testing.assert_array_equal(r["mixed_f32"], [1.5, 3.0])
        np.testing.assert_array_equal(r["mixed_bf16"], [1.0, 8.0])
        np.testing.assert_array_equal(r["mixed_f64"], [[2.0]])
        assert [str(d) for d in r["mixed_dtypes"]] == ["paddle.float32", "paddle.bfloat16", "paddle.float64"]


def test_train_tool_under_launch_logs_finite_loss(tmp_path):
    out = tmp_path / "run"
    logs = launch(tmp_path, "tools/train.py", "-c", "configs/mocov2_pt_digits_1n2c.yaml",
                  "-o", f"Engine.save_load.output_dir={out}", "-o", "Engine.max_steps=3",
                  "-o", "Engine.logging_freq=1", "-o", "Data.Train.sampler.batch_size=32",
                  "-o", "Model.model.K=128", "-o", "Model.model.base_encoder.widths=[8,16,16,16]")
    lines = [line for line in (out / "train.log").read_text().splitlines() if "[train]" in line]
    assert len(lines) == 3
    losses = [float(line.split("loss: ")[1].split(",")[0]) for line in lines]
    assert all(np.isfinite(losses)) and "2 process(es) x batch 32" in logs
    assert "ips: " in lines[-1] and (out / "step_3" / "model.pdparams").is_file()
    # A worker the launcher started restarts itself on jemalloc where installed and trains on.
    malloc = find_jemalloc() or "the C library's"
    assert f"host memory allocator (malloc): {malloc}" in logs
    # The run names ppmoco's version and the Paddle it ran on.
    assert f"ppmoco {ppmoco.__version__} on PaddlePaddle {paddle.__version__} (paddlepaddle, CPU build" in logs
    # Paddle's table of non-default flags (printed by init_parallel_env on every rank) is held back.
    assert "Modified FLAGS detected" not in logs


def test_a_cpu_run_on_a_cuda_build_trains_over_gloo(tmp_path):
    # Two real processes; the worker simulates a CUDA build launched on a GPU machine (PADDLE_DISTRI_BACKEND
    # unset) and asks for Global.device=cpu. Catches setup_environment leaving the backend to Paddle's
    # 'auto': it picks nccl and the GPU (here the CUDA-less build then fails to make a CUDAPlace).
    launch(tmp_path, os.path.join(ROOT, "tests", "engine", "cuda_build_cpu_worker.py"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert (r["backend"].lower(), r["device"], r["env_device"], r["place"]) == ("gloo", "cpu", "cpu", "Place(cpu)")
    assert ranks[0]["weight"] == ranks[1]["weight"]  # different data, averaged gradients: the same steps
    assert len({str(w) for w in ranks[0]["weight"]}) > 1
