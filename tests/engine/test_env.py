"""Process environment knobs that change speed, not results."""
import platform

from ppmoco.engine.env import keep_freed_memory


def test_keep_freed_memory_tunes_glibc_and_is_a_no_op_elsewhere():
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
