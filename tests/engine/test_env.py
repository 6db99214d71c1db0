"""Process environment knobs that change speed, not results."""
import platform

import numpy as np
import paddle
import pytest

from ppmoco.engine.env import keep_freed_memory


def test_keep_freed_memory_tunes_glibc_and_is_a_no_op_elsewhere():
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def _resident_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap only")
def test_keep_freed_memory_keeps_a_freed_block_resident():
    # After keep_freed_memory a freed 400 MB array stays resident in the heap (the next step reuses
    # it without page faults). Catches: keep_freed_memory no longer reaching glibc.
    assert keep_freed_memory()
    before = _resident_mb()
    block = np.ones(100 * 2 ** 20, "float32")
    del block
    assert _resident_mb() - before > 300


class _BackendChosen(Exception):
    """Raised by a stand-in for Paddle's _set_default_backend: init_parallel_env stops there, before any
    store or process group, with the backend and default place it picked."""


@pytest.fixture
def cuda_build_two_ranks(monkeypatch):
    """Rank 0 of 2 as paddle.distributed.launch starts it on a GPU machine, in a CUDA build of Paddle
    (simulated: this one has no CUDA). Returns what init_parallel_env picked: {"backend", "place"}."""
    from paddle.base import core
    from paddle.distributed import parallel

    from ppmoco.engine import env

    picked = {}

    def set_default_backend(backend):
        picked["backend"] = backend
        raise _BackendChosen

    monkeypatch.setattr(core, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(core, "CUDAPlace", lambda device_id: f"gpu:{device_id}")  # a CPU build refuses CUDAPlace
    monkeypatch.setattr(parallel, "_set_expected_place", lambda place: picked.update(place=str(place)))
    monkeypatch.setattr(parallel, "_set_default_backend", set_default_backend)
    monkeypatch.setattr(env, "pick_device", lambda requested: requested)  # "a GPU is visible"
    monkeypatch.setattr(paddle, "set_device", lambda device: None)  # leave this test process as it is
    monkeypatch.setattr(env, "set_cpu_threads", lambda n: None)
    for name, value in {"PADDLE_TRAINERS_NUM": "2", "PADDLE_TRAINER_ID": "0", "FLAGS_selected_gpus": "0",
                        "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:6170",
                        "PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:6170,127.0.0.1:6171",
                        "PADDLE_DISTRI_BACKEND": "auto"}.items():  # 'auto' = unset, as the launcher leaves it with GPUs
        monkeypatch.setenv(name, value)
    return picked


def _setup(device):
    from ppmoco.engine.env import setup_environment

    setup_environment({"device": device, "flags": {}, "num_threads": 1, "seed": 0}, {})


def test_a_cpu_run_of_several_processes_on_a_cuda_build_uses_gloo_and_the_cpu(cuda_build_two_ranks):
    # Paddle's own choice (init_parallel_env) under a simulated CUDA build. Catches setup_environment
    # leaving PADDLE_DISTRI_BACKEND alone: Paddle then picks nccl and makes this rank's GPU the default
    # place, so Global.device=cpu trained on the GPU.
    with pytest.raises(_BackendChosen):
        _setup("cpu")
    assert cuda_build_two_ranks == {"backend": "gloo", "place": "Place(cpu)"}


def test_the_simulated_cuda_build_picks_nccl_for_a_gpu_run(cuda_build_two_ranks):
    # The simulation above is a CUDA build indeed (else the test above proves nothing), and a GPU run
    # keeps NCCL. Catches forcing gloo whatever the device.
    with pytest.raises(_BackendChosen):
        _setup("gpu")
    assert cuda_build_two_ranks == {"backend": "nccl", "place": "gpu:0"}


@pytest.mark.parametrize("device, backend", [("cpu", "nccl"), ("gpu", "gloo")])
def test_a_backend_that_contradicts_the_device_is_refused(cuda_build_two_ranks, monkeypatch, device, backend):
    # Catches a CPU run sent to NCCL (it would train on the GPU) and a GPU run sent to gloo (Paddle then
    # makes the CPU the default place: it would train on the CPU), both silently.
    from ppmoco.errors import ConfigError

    monkeypatch.setenv("PADDLE_DISTRI_BACKEND", backend)
    with pytest.raises(ConfigError, match=f"Global.device: {device}, but PADDLE_DISTRI_BACKEND={backend}"):
        _setup(device)
    assert cuda_build_two_ranks == {}
