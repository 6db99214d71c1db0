"""Shared by the fault-injection tests: tools/train.py command lines, launches, outcome checks.

Imported as a plain module (tests have no __init__.py): each test file puts this folder on sys.path.
"""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import paddle
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRAIN = os.path.join(ROOT, "tools", "train.py")
DIGITS_V2 = os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml")

# Tiny and quick (the shipped digits config may change its recipe; these pin what the tests need):
# 32 images per process and step, K = 4 global batches, no kNN monitor.
FAST = ["Data.Train.sampler.batch_size=32", "Model.model.K=128", "Engine.logging_freq=1",
        "Model.model.base_encoder.widths=[8,16,16,16]", "Model.model.projector.hidden_dim=32",
        "Model.model.dim=16", "Engine.eval_freq=-1", "Global.num_threads=1"]

# Datasets made by the tests: 2 classes x 8 images of 32 px, one batch of 8 per step.
SMALL_DATA = ["Data.Train.sampler.batch_size=8", "Model.model.K=16", "Data.Eval=null",
              "Data.Train.dataset.builtin=null"]

CHECKPOINT_FILES = ("model.pdparams", "optimizer.pdopt", "trainer_state.json", "meta.json")


def train_args(out_dir, *overrides, config=DIGITS_V2):
    """tools/train.py arguments (after the script) for a fast run writing to `out_dir`."""
    args = ["-c", str(config), "-o", f"Engine.save_load.output_dir={out_dir}"]
    for o in (*FAST, *overrides):
        args += ["-o", str(o)]
    return args


def train_cmd(out_dir, *overrides, config=DIGITS_V2):
    return [sys.executable, TRAIN, *train_args(out_dir, *overrides, config=config)]


def run(cmd, timeout=300, **kwargs):
    """Run `cmd` from the project root, capturing text output."""
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def run_train(out_dir, *overrides, config=DIGITS_V2, expect=0, timeout=300, **kwargs):
    proc = run(train_cmd(out_dir, *overrides, config=config), timeout=timeout, **kwargs)
    assert proc.returncode == expect, describe(proc)
    return proc


def describe(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def assert_user_error(proc, *needles):
    """Exit 2, no traceback, and exactly one `error:` line, last on stderr, containing `needles`."""
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], describe(proc)
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def checkpoints(out_dir):
    """Names of the folders under `out_dir` that look like checkpoints (not hidden)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir)
                  if os.path.isdir(os.path.join(out_dir, n)) and not n.startswith(".") and n != "vdl")


def assert_nothing_saved(out_dir):
    """No checkpoint, no `latest` and no stray temporary folder under `out_dir`."""
    assert checkpoints(out_dir) == [], os.listdir(out_dir)
    if os.path.isdir(out_dir):
        assert not {"latest"} & set(os.listdir(out_dir))
        assert not [n for n in os.listdir(out_dir) if n.startswith(".tmp-")]


def assert_untouched(out_dir):
    """A run rejected before training wrote nothing: not even its output folder exists."""
    assert not os.path.exists(out_dir), os.listdir(out_dir)


def load_weights(folder):
    """{name: numpy array} of a checkpoint folder's model.pdparams."""
    return {k: v.numpy() for k, v in paddle.load(os.path.join(str(folder), "model.pdparams")).items()}


def assert_same_weights(a, b):
    """Bit-equal model.pdparams (weights, BN statistics, queue and pointer) in two checkpoints."""
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys() and "queue" in wa and "queue_ptr" in wa
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=f"{key}: {a} vs {b}")


def wait_until(proc, condition, what, timeout=180, poll=0.001):
    """Poll `condition()` while process `proc` runs; fail if it ends or `timeout` passes first."""
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(poll)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_pids(out):
    """{pid: global rank} of the tools/train.py processes paddle.distributed.launch started writing to
    output folder `out`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(v.split("=", 1) for v in f.read().decode(errors="replace").split("\0") if "=" in v)
        except OSError:
            continue
        if "tools/train.py" in cmdline and f"output_dir={out}\0" in cmdline and "PADDLE_TRAINER_ID" in environ:
            found[int(pid)] = int(environ["PADDLE_TRAINER_ID"])
    return found


def launch_cmd(log_dir, *launch_args):
    return [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(log_dir), *launch_args]


def worker_logs(log_dir):
    return "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("workerlog.*")))


def save_rgb(path, size=32, seed=0, mode="RGB", fmt=None, **save_kwargs):
    """A random image of `size` px in `mode` at `path` (folders created)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(str(path), fmt, **save_kwargs)
    return path


def image_tree(root, classes=("a", "b"), per_class=8):
    """root/<class>/<i>.png: a valid folder dataset the tests then damage."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            save_rgb(root / name / f"{i}.png", seed=100 * c + i)
    return root
