"""Test-wide setup: the project root on sys.path and quiet, deterministic Paddle on CPU."""
import logging
import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
os.environ.setdefault("FLAGS_call_stack_level", "0")


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
