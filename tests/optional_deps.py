"""Optional test dependencies: a test that needs one skips where it is missing, and fails instead
where CI forbids the skip through its switch (the README's test command installs all of them)."""
import importlib
import os

import pytest

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
