"""Process environment: device, CPU threads, process group and seeds."""
import contextlib
import dataclasses
import io
import logging
import os
import random
import re
import sys

import numpy as np
import paddle
import paddle.distributed as dist

from ppmoco.errors import ConfigError
from ppmoco.fast_path import cpu_info, mkl_code_path
from ppmoco.paddle_internals import set_cpu_threads

logger = logging.getLogger("ppmoco")


@dataclasses.dataclass
class RunEnv:
    device: str
    world_size: int
    rank: int
    local_size: int
    num_threads: int

    @property
    def is_main(self):
        return self.rank == 0


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_device(requested):
    """'auto' means GPU when Paddle was built with CUDA and one is visible, else CPU."""
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "gpu" and not has_gpu:
        raise ConfigError("Global.device: gpu requested but this Paddle has no usable CUDA GPU; "
                          "set Global.device=auto or cpu, or install paddlepaddle-gpu")
    return "gpu" if requested == "gpu" or (requested == "auto" and has_gpu) else "cpu"


def _glibc():
    """glibc's library, or None where libc is another (macOS, musl: nothing to tune)."""
    import ctypes  # here, not at import: importing ppmoco needs no C library handle

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory():
    """Stop glibc from handing large freed blocks back to the kernel.

    Activations of tens of MB are allocated and freed every step; by default glibc serves them with
    mmap and unmaps them on free, so each step page-faults all of them in again. Keeping them in
    the heap avoids that (docs/performance.md); the process keeps its peak memory instead of
    returning it between steps.
    """
    libc = _glibc()
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def apply_flags(flags):
    """Set `Global.flags` ({FLAGS_name: value}) with paddle.set_flags; return the names skipped.

    FleetX's vision base config sets CUDA flags (FLAGS_enable_cublas_tensor_op_math, ...) that a
    CPU build of Paddle does not have. A Paddle without CUDA skips flags it does not know, with a
    warning naming them, so such configs run on CPU; a CUDA build refuses them (a misspelt flag).
    """
    skipped = []
    for name, value in flags.items():
        if not (isinstance(name, str) and name.startswith("FLAGS_")):
            raise ConfigError(f"Global.flags.{name}: Paddle flag names start with FLAGS_")
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"Global.flags.{name}: expected a bool, number or string, got {value!r}")
        try:
            paddle.get_flags([name])
        except ValueError:
            if paddle.device.is_compiled_with_cuda():
                raise ConfigError(f"Global.flags.{name}: not a flag of this Paddle ({paddle.__version__}); "
                                  "check the name or remove it") from None
            skipped.append(name)
            continue
        try:
            paddle.set_flags({name: value})
        except (ValueError, TypeError) as err:
            raise ConfigError(f"Global.flags.{name}: Paddle refuses {value!r} ({err})") from None
    if skipped:
        logger.warning(f"Global.flags: skipped {', '.join(skipped)}: not flags of this Paddle build "
                       "(without CUDA); they only tune GPU kernels")
    return skipped


def choose_collective_backend(device):
    """Make dist.init_parallel_env use gloo for a CPU run (through PADDLE_DISTRI_BACKEND, which it reads).

    Unset, that variable means 'auto': on a CUDA build NCCL, and this rank's GPU as the default place
    whatever paddle.set_device said, so a CPU run would train on the GPU (paddle.distributed.launch
    sets gloo only where it finds no GPU). A backend that contradicts the device is refused.
    """
    backend = os.environ.get("PADDLE_DISTRI_BACKEND", "auto")
    if device == "cpu":
        if backend not in ("auto", "gloo"):
            raise ConfigError(f"Global.device: cpu, but PADDLE_DISTRI_BACKEND={backend} runs the collectives on "
                              "accelerators; unset it or set it to gloo")
        os.environ["PADDLE_DISTRI_BACKEND"] = "gloo"
    elif backend == "gloo":
        raise ConfigError(f"Global.device: {device}, but PADDLE_DISTRI_BACKEND=gloo would train on the CPU; "
                          "unset it, or set Global.device=cpu")


def _init_parallel_env_quietly():
    """dist.init_parallel_env without the table of flags that differ from their defaults, which it
    prints on every rank (Paddle's own FLAGS_enable_pir_in_executor among them); other output passes."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        dist.init_parallel_env()
    text = re.sub(r"=+ Modified FLAGS detected =+\n(?:FLAGS\(.*\)\n)*=+\n", "", captured.getvalue())
    sys.stderr.write(text)


def setup_environment(global_cfg, distributed_cfg):
    """Select the device, set CPU threads, join the process group (when launched) and seed."""
    world_size = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    local_size = int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))
    dp = distributed_cfg.get("dp_degree")
    if dp is not None and dp != world_size:
        raise ConfigError(f"Distributed.dp_degree: {dp} but {world_size} process(es) were launched; "
                          "remove the key or launch that many processes")
    device = pick_device(global_cfg["device"])
    paddle.set_device(device)
    apply_flags(global_cfg["flags"])
    threads = global_cfg["num_threads"] or max(1, _cpu_count() // local_size)
    if device == "cpu":
        for name, value in mkl_code_path(cpu_info()).items():  # before MKL's first call; the user's value wins
            os.environ.setdefault(name, value)
        # Paddle's CPU wheel runs one thread unless told otherwise; OMP_NUM_THREADS is ignored.
        set_cpu_threads(threads)
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        choose_collective_backend(device)
        _init_parallel_env_quietly()
    seed_everything(global_cfg["seed"])
    return RunEnv(device, world_size, dist.get_rank() if world_size > 1 else 0, local_size, threads)
