"""tools/check_gpu.py, the GPU smoke check: its CPU run passes end to end, it refuses in one line where
there is no GPU, and its step comparison fails a step that is wrong. (The float16 checks need a GPU.)"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import check_gpu  # noqa: E402


def tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_gpu.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_cpu_run_trains_evaluates_saves_and_resumes(tmp_path):
    proc = tool("--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("PASS step (float32) on cpu vs CPU: loss ")
    assert lines[1] == ("PASS runs (float32) on cpu: trained, evaluated, saved, resumed, evaluated again; "
                        "tools/eval.py knn")
    assert lines[-1] == "2 passed, 0 failed"
    assert (tmp_path / "float32" / "epoch_2").is_dir() and (tmp_path / "float32_eval").is_dir()


def test_without_a_gpu_it_says_so_in_one_line():
    proc = tool()
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: no CUDA GPU is visible to this Paddle (a CPU build): install "
                                   "paddlepaddle-gpu as docs/getting_started.md says, or run --device cpu to check "
                                   "the CPU path")


@pytest.mark.parametrize("fault, passes", [
    (lambda loss, state: (loss, state), True),
    (lambda loss, state: (loss * 1.01, state), False),
    (lambda loss, state: (loss, {k: v * 1.05 for k, v in state.items()}), False),
])
def test_the_step_comparison_fails_a_wrong_step(monkeypatch, fault, passes):
    # The device's step stands in for a GPU step: the CPU's, then put off by 1% in the loss or 5% in
    # every tensor; both must fail the float32 bounds, the unchanged step must pass them.
    real = check_gpu.one_step
    calls = []

    def device_step(cfg, place, initial, batch, amp):
        loss, state = real(cfg, place, initial, batch, amp)
        calls.append(place)
        return fault(loss, state) if len(calls) == 2 else (loss, state)

    monkeypatch.setattr(check_gpu, "one_step", device_step)
    passed, line = check_gpu.check_step("cpu", "float32")
    assert passed == passes, line
