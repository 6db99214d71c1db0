"""Process environment knobs that change speed, not results."""
import platform

import numpy as np
import pytest

from ppmoco.engine.env import keep_freed_memory, release_freed_memory


def test_keep_freed_memory_tunes_glibc_and_is_a_no_op_elsewhere():
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def _resident_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap only")
def test_release_freed_memory_hands_the_kept_heap_back():
    # After keep_freed_memory a freed 400 MB array stays resident in the heap until released.
    # Catches: a release that does not reach glibc, or keep_freed_memory no longer keeping.
    keep_freed_memory()
    block = np.ones(100 * 2 ** 20, "float32")
    del block
    kept = _resident_mb()
    assert release_freed_memory()
    assert kept - _resident_mb() > 300
