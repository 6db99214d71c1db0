"""Test-wide setup: the project root on sys.path and quiet, deterministic Paddle on CPU."""
import ctypes
import logging
import os
import platform
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
from ppmoco.fast_path import cpu_info, mkl_code_path  # noqa: E402

os.environ.setdefault("FLAGS_call_stack_level", "0")
# MKL's kernels as every ppmoco tool runs them (setup_environment), whichever test calls MKL first.
for name, value in mkl_code_path(cpu_info()).items():
    os.environ.setdefault(name, value)


@pytest.fixture
def restore_ppmoco_logger():
    """setup_logger reconfigures the process-wide "ppmoco" logger (no propagation, a file handler);
    put it back so later tests that read logs through caplog still see the records."""
    log = logging.getLogger("ppmoco")
    saved = log.handlers[:], log.propagate, log.level
    yield
    for handler in log.handlers:
        if handler not in saved[0]:
            handler.close()
    log.handlers[:], log.propagate, log.level = saved


@pytest.fixture(autouse=True)
def return_freed_memory():
    """After each test, glibc's malloc back at its defaults and the heap's free memory returned to the
    kernel. setup_environment's keep_freed_memory (right for a training process) would otherwise keep
    every test's peak in this one process: the suite's resident set climbed to the largest sum of them
    (13 GiB on a 24 GiB machine), where each test alone needs a few GiB."""
    yield
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 65536)  # glibc's defaults (mallopt(3))
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
