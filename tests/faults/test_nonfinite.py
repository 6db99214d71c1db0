"""Promise 4: a NaN/Inf loss (or update) stops the run with the step and no poisoned checkpoint, or,
with Engine.skip_nonfinite_steps, is skipped without a trace in weights, queue or optimizer."""
import dataclasses
import json
import os
import sys

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.config import load_config  # noqa: E402
from ppmoco.engine import Engine, setup_environment, setup_logger  # noqa: E402
from ppmoco.engine.engine import NonFiniteError  # noqa: E402
from ppmoco.modules import build_module  # noqa: E402

from fault_helpers import (  # noqa: E402
    DIGITS_V2,
    FAST,
    ROOT,
    TRAIN,
    assert_user_error,
    checkpoints,
    launch_cmd,
    load_weights,
    run,
    run_train,
    train_args,
    worker_logs,
)

# Divergence from the config alone: at 5% of the first epoch (step 4 of 44) the learning rate is
# multiplied by `gamma`. 1e30 gives finite but huge weights and a NaN loss one step later; 1e300
# overflows float32 to Inf, so the weights break during step 4 while its loss is still finite.
JUMP_LR = ("Optimizer.lr.name=MultiStepDecay", "Optimizer.lr.milestones=[0.05]", "Optimizer.lr.update_unit=step")


@pytest.fixture(autouse=True)
def _restore_logger(restore_ppmoco_logger):
    """Every test here builds Engines in this process (conftest's restore_ppmoco_logger)."""


def _engine(out, *overrides):
    cfg = load_config(DIGITS_V2, [f"Engine.save_load.output_dir={out}", *FAST, *overrides])
    env = setup_environment(cfg["Global"], cfg["Distributed"])
    setup_logger(str(out), env.is_main)
    return Engine(cfg, build_module(cfg["Model"]), env)


def _inject_nan(engine, at_step):
    """Make step `at_step` return a NaN loss after poisoning the queue, as diverged keys would.

    Returns the module state (weights, buffers, queue) recorded just before that step.
    """
    module, calls, before = engine.module, [0], {}
    real_before, real_step = module.before_step, module.training_step

    def before_step(progress):  # the step starts here (MoCo's momentum update)
        calls[0] += 1
        if calls[0] == at_step:
            before.update({k: v.numpy().copy() for k, v in module.state_dict().items()})
        real_before(progress)

    def training_step(batch):
        out = real_step(batch)
        if calls[0] != at_step:
            return out
        module.queue.set_value(paddle.full_like(module.queue, float("nan")))
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    module.before_step = before_step
    module.training_step = training_step
    return before


def _optimizer_state(folder):
    return {k: v.numpy() for k, v in paddle.load(str(folder / "optimizer.pdopt")).items()}


@pytest.mark.parametrize("bad_step", [1, 3])
def test_skipped_step_leaves_no_trace(tmp_path, monkeypatch, bad_step):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    engine = _engine(out, "Engine.execution=eager", f"Engine.max_steps={bad_step + 1}",
                     "Engine.save_load.save_steps=1", "Engine.save_load.keep_last=0",
                     "Engine.skip_nonfinite_steps=true")
    before = _inject_nan(engine, bad_step)
    assert engine.fit() == bad_step + 1

    weights = load_weights(out / f"step_{bad_step}")
    assert weights.keys() == before.keys()
    for key, value in before.items():  # weights, BN statistics, queue and pointer
        np.testing.assert_array_equal(weights[key], value, err_msg=key)
    velocities = _optimizer_state(out / f"step_{bad_step}")
    assert velocities
    if bad_step == 1:  # the skipped step created the velocities: they start from zero
        assert not any(v.any() for v in velocities.values())
    else:  # exactly as the previous step left them
        previous = _optimizer_state(out / f"step_{bad_step - 1}")
        assert velocities.keys() == previous.keys()
        for key, value in velocities.items():
            np.testing.assert_array_equal(value, previous[key], err_msg=key)
    after = load_weights(out / f"step_{bad_step + 1}")
    assert all(np.isfinite(v).all() for v in after.values())
    assert not np.array_equal(after["queue"], weights["queue"])  # training went on
    assert json.loads((out / f"step_{bad_step + 1}" / "trainer_state.json").read_text())["skipped_steps"] == 1
    log = (out / "train.log").read_text()
    assert f"step {bad_step}: loss or update not finite; skipped it" in log
    assert "every step skipped" in log and log.count(", skipped: 1") == 2


def test_nan_loss_stops_before_the_next_save_with_its_step(tmp_path, monkeypatch):
    """No per-step sync: the NaN at step 3 is found at the step-4 save, which is not written."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    engine = _engine(out, "Engine.execution=eager", "Engine.max_steps=8", "Engine.save_load.save_steps=2",
                     "Engine.logging_freq=100", "Engine.save_load.keep_last=0")
    _inject_nan(engine, 3)
    with pytest.raises(NonFiniteError, match=r"the loss is NaN or Inf at step 3; stopped without saving "
                                             rf"\(the last checkpoint, {out / 'step_2'}, is intact\)"):
        engine.fit()
    assert checkpoints(out) == ["step_2"] and (out / "latest").read_text().strip() == "step_2"


@pytest.mark.slow
@pytest.mark.parametrize("gamma, message, last_good", [
    ("1e30", "the loss is NaN or Inf at step 5", 4),
    ("1e300", "the weights or buffers hold NaN or Inf after step 4 (the update overflowed)", 3)])
def test_divergence_through_the_cli(tmp_path, gamma, message, last_good):
    out = tmp_path / "run"
    proc = run_train(out, *JUMP_LR, f"Optimizer.lr.gamma={gamma}", "Engine.max_steps=8",
                     "Engine.save_load.save_steps=1", "Engine.save_load.keep_last=0",
                     "Engine.logging_freq=100", expect=2)
    assert_user_error(proc, f"training diverged: {message}; stopped without saving",
                      f"the last checkpoint, {out / f'step_{last_good}'}, is intact",
                      "Engine.skip_nonfinite_steps=true")
    assert checkpoints(out) == [f"step_{s}" for s in range(1, last_good + 1)]
    assert (out / "latest").read_text().strip() == f"step_{last_good}"
    for name in checkpoints(out):
        assert all(np.isfinite(v).all() for v in load_weights(out / name).values()), name


@pytest.mark.slow
def test_skipping_through_the_cli_counts_and_completes(tmp_path):
    """Every step after the Inf learning rate is skipped: the run ends with step 3's state, counted."""
    out = tmp_path / "run"
    run_train(out, *JUMP_LR, "Optimizer.lr.gamma=1e300", "Engine.max_steps=6", "Engine.save_load.save_steps=1",
              "Engine.save_load.keep_last=0", "Engine.skip_nonfinite_steps=true")
    reference = load_weights(out / "step_3")
    for step in (4, 5, 6):
        weights = load_weights(out / f"step_{step}")
        for key in reference:
            np.testing.assert_array_equal(weights[key], reference[key], err_msg=f"step_{step} {key}")
    log = (out / "train.log").read_text()
    assert log.count("loss or update not finite; skipped it") == 3 and ", skipped: 3" in log


@pytest.mark.slow
def test_all_ranks_stop_together_at_the_same_step(tmp_path):
    """The flags are combined over ranks: both processes report step 5 and neither hangs."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = run(launch_cmd(logs, "--nproc_per_node", "2", TRAIN,
                          *train_args(out, *JUMP_LR, "Optimizer.lr.milestones=[0.1]", "Optimizer.lr.gamma=1e30",
                                      "Engine.max_steps=8", "Engine.save_load.save_steps=1",
                                      "Engine.save_load.keep_last=0", "Engine.logging_freq=100")))
    assert proc.returncode != 0
    errors = [line for line in worker_logs(logs).splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], worker_logs(logs)[-3000:]
    assert "the loss is NaN or Inf at step 5" in errors[0] and "Traceback" not in worker_logs(logs)
    assert (out / "latest").read_text().strip() == "step_4"
