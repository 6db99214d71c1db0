"""Promise: loading never executes code from a file. A `.pdparams`/`.pdopt`/trainer state built as a
pickle whose objects run a command when unpickled (`__reduce__` returning os.system, eval, exec,
subprocess.Popen, or hidden in an array of Python objects), given to each tool that reads one, is
refused with one line naming the file (exit 2) and the command never runs.

One tree of files for all; one tool run per loading path (pretrained, resume, evaluation,
conversion), two at a time (each is mostly imports), and the other files of a checkpoint in-process.
The unpickler's own cases (every admitted form, every payload, both pickle protocols) are in
tests/test_safe_pickle.py.
"""
import hashlib
import json
import os
import pickle
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.config import load_config  # noqa: E402
from ppmoco.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ppmoco.engine.step import build_optimizer  # noqa: E402
from ppmoco.errors import CheckpointError  # noqa: E402
from ppmoco.modules import build_module  # noqa: E402

from fault_helpers import DIGITS_V2, FAST, ROOT, assert_user_error, describe, run, train_cmd  # noqa: E402
from moco_equivalence import velocities  # noqa: E402
from pickle_payloads import Eval, Exec, Popen, System  # noqa: E402

LINCLS = os.path.join(ROOT, "configs", "moco_lincls_digits_1n2c.yaml")
NARROW = "Model.model.base_encoder.widths=[8,16,16,16]"


def _eval_cmd(config, out, *overrides):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-c", config,
           "-o", f"Engine.save_load.output_dir={out}", "-o", NARROW]
    for o in overrides:
        cmd += ["-o", o]
    return cmd


def _legit_checkpoint(root):
    """A real checkpoint of the model tools/train.py builds for DIGITS_V2 + FAST, with velocities."""
    cfg = load_config(DIGITS_V2, FAST)
    module = build_module(cfg["Model"])
    optimizer = build_optimizer(cfg["Optimizer"], module, 0.1)
    velocities(optimizer)  # made now, as the first step would
    state = {"epoch": 0, "next_batch": 1, "global_step": 1, "best": None, "skipped_steps": 0,
             "rng_state": paddle.get_rng_state()}
    return save_checkpoint(str(root), "step_1", module, optimizer, state), module, optimizer


def _evil_checkpoint(legit, folder, file, payload):
    """A copy of checkpoint folder `legit` with `file` replaced by a pickle of `payload`, and meta.json's
    sizes and checksums made to match, as whoever crafted a downloadable checkpoint would."""
    shutil.copytree(legit, folder)
    meta_file = os.path.join(folder, "meta.json")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    if file == "trainer_state.pkl":  # an old-format checkpoint: its trainer state is a pickle
        os.remove(os.path.join(folder, "trainer_state.json"))
        del meta["files"]  # which old checkpoints did not list
    with open(os.path.join(folder, file), "wb") as f:
        pickle.dump(payload, f, protocol=4)
    if "files" in meta:
        data = open(os.path.join(folder, file), "rb").read()
        meta["files"][file] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(meta_file, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The files: a real checkpoint, and copies of it and other files carrying payloads."""
    root = tmp_path_factory.mktemp("malicious")
    markers = root / "markers"
    markers.mkdir()
    legit, module, optimizer = _legit_checkpoint(root / "legit")
    weights = {k: v.numpy() for k, v in module.state_dict().items()}
    velocities = {k: v.numpy() for k, v in optimizer.state_dict().items() if isinstance(v, paddle.Tensor)}
    assert weights and velocities
    files = {}

    files["pretrained"] = root / "evil.pdparams"  # a downloaded "pretrained model"
    with open(files["pretrained"], "wb") as f:
        pickle.dump(System(markers / "pretrained"), f)
    files["convert"] = root / "objects.pdparams"  # the payload inside an array of Python objects
    with open(files["convert"], "wb") as f:
        pickle.dump({"conv1.weight": np.array([System(markers / "convert"), 0], dtype=object)}, f)
    # resume: optimizer.pdopt (the real model.pdparams before it loads), the checkpoint found via `latest`
    _evil_checkpoint(legit, root / "resume" / "step_1", "optimizer.pdopt",
                     {**velocities, "LR_Scheduler": Eval(markers / "resume")})
    (root / "resume" / "latest").write_text("step_1\n")
    files["resume"] = root / "resume" / "step_1" / "optimizer.pdopt"
    # evaluation of a linear classifier checkpoint: exec among real arrays
    _evil_checkpoint(legit, root / "eval", "model.pdparams",
                     {"fc.weight": np.zeros((16, 10), "float32"), "fc.bias": Exec(markers / "eval")})
    files["eval"] = root / "eval" / "model.pdparams"
    # the other files of a checkpoint (loaded in-process): model.pdparams with os.system next to the
    # real arrays, an old-format trainer_state.pkl with subprocess.Popen as the random state
    _evil_checkpoint(legit, root / "resume_model", "model.pdparams",
                     {**weights, "queue_ptr": System(markers / "resume_model")})
    files["resume_model"] = root / "resume_model" / "model.pdparams"
    _evil_checkpoint(legit, root / "resume_state", "trainer_state.pkl",
                     {"epoch": 0, "next_batch": 1, "global_step": 1, "rng_state": [Popen(markers / "resume_state")]})
    files["resume_state"] = root / "resume_state" / "trainer_state.pkl"
    return root, markers, files, module, optimizer


@pytest.fixture(scope="module")
def runs(tree):
    """{path: completed tool run} for the four loading paths."""
    root, _, files, _, _ = tree
    commands = {
        "pretrained": _eval_cmd(LINCLS, root / "out_pretrained", "Eval.protocol=knn",
                                f"Model.model.base_encoder.pretrained={files['pretrained']}"),
        "resume": train_cmd(root / "resume", "Engine.save_load.auto_resume=true", "Engine.max_steps=2"),
        "eval": _eval_cmd(LINCLS, root / "out_eval", "Model.model.base_encoder.pretrained=null",
                          f"Engine.save_load.ckpt_dir={root / 'eval'}"),
        "convert": [sys.executable, os.path.join(ROOT, "tools", "convert.py"), str(files["convert"]),
                    str(root / "converted.pdparams"), "--to", "paddle-vision"],
    }
    with ThreadPoolExecutor(2) as pool:
        done = {name: pool.submit(run, cmd, timeout=240) for name, cmd in commands.items()}
    return {name: future.result() for name, future in done.items()}


def _assert_refused(message, file):
    assert f"{file}: refusing to load: it asks " in message, message
    assert "(a pickle can execute code)" in message or "Python objects" in message, message
    assert "only arrays, numbers, strings and containers are loaded" in message, message


# Catches, per loading path, the read going around safe_pickle (paddle.load, pickle.load) or
# safe_pickle admitting the payload's global:
#   pretrained  eval.py -o Model.model.base_encoder.pretrained=evil.pdparams (plain os.system)
#   resume      train.py with auto_resume (`latest`): builtins.eval code in optimizer.pdopt
#   eval        eval.py linear protocol with Engine.save_load.ckpt_dir: builtins.exec in the weights
#   convert     convert.py: os.system inside a numpy array of Python objects
@pytest.mark.slow
@pytest.mark.parametrize("case", ["pretrained", "resume", "eval", "convert"])
def test_no_tool_runs_code_from_a_file(tree, runs, case):
    _, markers, files, _, _ = tree
    proc = runs[case]
    _assert_refused(assert_user_error(proc), files[case])
    assert not (markers / case).exists(), f"the payload ran: {describe(proc)}"


# Catches: load_checkpoint reading model.pdparams or an old trainer_state.pkl around safe_pickle
# (os.system among the real arrays; subprocess.Popen where the random state belongs).
@pytest.mark.parametrize("case", ["resume_model", "resume_state"])
def test_no_checkpoint_file_runs_code(tree, case):
    _, markers, files, module, optimizer = tree
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(os.path.dirname(files[case]), module, optimizer)
    _assert_refused(str(err.value), files[case])
    assert not (markers / case).exists()


# Catches: a payload running anywhere (a marker under any name), and a refused resume writing a
# checkpoint or moving `latest`.
@pytest.mark.slow
def test_nothing_ran_and_nothing_was_saved(tree, runs):
    root, markers, _, _, _ = tree
    assert os.listdir(markers) == []
    assert (root / "resume" / "latest").read_text() == "step_1\n"
    assert [n for n in os.listdir(root / "resume") if n.startswith(("step_", "epoch_", ".tmp-"))] == ["step_1"]
