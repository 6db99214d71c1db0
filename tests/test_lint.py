"""Lint and import order (pyproject.toml's [tool.ruff]) as part of the suite, so the README's test
command checks what CI checks."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:] + "\n(ruff comes with bash tools/install.sh --test)"
