"""Optional test dependencies: a test that needs one skips where it is missing, and fails instead
where CI forbids the skip through its switch (the README's test command installs all of them; CI
sets PPMOCO_REQUIRE_BF16 where /proc/cpuinfo lists bfloat16 units)."""
import importlib
import os
import sys

import pytest

from ppmoco.fast_path import cpu_info, has_bfloat16_units
from ppmoco.host_allocator import find_jemalloc

INSTALL = "bash tools/install.sh --test"


def import_or_skip(name, switch):
    """Module `name`; a skip when it cannot be imported, a failure when environment variable `switch` is 1."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if os.environ.get(switch) == "1":
            pytest.fail(f"{switch}=1 but {name} cannot be imported ({err}): {INSTALL}", pytrace=False)
        pytest.skip(f"{name} is not installed ({INSTALL} installs it)", allow_module_level=True)


def torch_or_skip():
    """PyTorch, the reference of the equivalence tests (PPMOCO_REQUIRE_TORCH=1 forbids the skip)."""
    return import_or_skip("torch", "PPMOCO_REQUIRE_TORCH")


def torchvision_or_skip():
    """torchvision beside the CPU torch, through tools/torch_reference.py's import_torchvision (PyPI's
    wheel is CUDA-only; see there)."""
    torch_or_skip()
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    from torch_reference import import_torchvision

    try:
        return import_torchvision()
    except ImportError:
        return import_or_skip("torchvision", "PPMOCO_REQUIRE_TORCH")


def timm_vision_transformer():
    """timm's VisionTransformer (timm imports torchvision: torchvision_or_skip first)."""
    torchvision_or_skip()
    return import_or_skip("timm.models.vision_transformer", "PPMOCO_REQUIRE_TORCH").VisionTransformer


def jemalloc_or_skip():
    """The path of jemalloc's library (apt install libjemalloc2); PPMOCO_REQUIRE_JEMALLOC=1 forbids the skip."""
    path = find_jemalloc()
    if path is None:
        if os.environ.get("PPMOCO_REQUIRE_JEMALLOC") == "1":
            pytest.fail("PPMOCO_REQUIRE_JEMALLOC=1 but no jemalloc library is installed: apt install libjemalloc2",
                        pytrace=False)
        pytest.skip("jemalloc is not installed")
    return path


BF16_SWITCH = "PPMOCO_REQUIRE_BF16"


def bfloat16_units_or_skip():
    """Return where the CPU has bfloat16 units (as ppmoco.fast_path sees them); else skip the calling
    test, or fail it where PPMOCO_REQUIRE_BF16 is 1, so a ppmoco.fast_path that stops seeing the units
    cannot skip every bfloat16 test unnoticed."""
    info = cpu_info()
    if has_bfloat16_units(info):
        return
    if os.environ.get(BF16_SWITCH) == "1":
        pytest.fail(f"{BF16_SWITCH}=1 (the CPU has bfloat16 units) but ppmoco.fast_path.cpu_info() finds none: "
                    f"model {info['model']!r}, flags {info['flags']}", pytrace=False)
    pytest.skip("the CPU has no bfloat16 units (AVX512-BF16, AMX-BF16)")
