"""Test-wide setup: the project root on sys.path and quiet, deterministic Paddle on CPU."""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
os.environ.setdefault("FLAGS_call_stack_level", "0")
