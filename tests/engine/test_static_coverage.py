"""The static fast path at the shapes users run, beyond MoCo's first batch: a smaller last batch (a
second program, drop_last: false) and the linear-evaluation module on a standard ResNet-18.

Compared with the eager step by the relative error of every tensor's update (moco_equivalence's
measure): oneDNN's float32 kernels round differently, so bit equality is not expected; a wrong
gradient or a stale buffer gives errors of order 1 (docs/performance.md).
"""
import numpy as np
import paddle
import pytest

from ppmoco.engine.static_step import StaticTrainStep
from ppmoco.engine.step import TrainStep, build_optimizer
from ppmoco.modules.linear_eval import LinearEval
from ppmoco.paddle_internals import velocities

from moco_equivalence import OPT, PpmocoRunner, Setup, numpy_state, update_errors

NO_AMP = {"enable": False}
STANDARD = {"name": "resnet18"}  # ImageNet stem, widths 64-512


def fast_and_eager(module_factory, lr, batches):
    """Final state and metrics of the same steps, eager and on the fast path (strict: no fallback)."""
    results = []
    for static in (False, True):
        module = module_factory()
        start = numpy_state(module)
        optimizer = build_optimizer(OPT, module, lr)
        step = TrainStep(module, optimizer, NO_AMP)
        if static:
            step = StaticTrainStep(module, optimizer, lambda m: build_optimizer(OPT, m, lr), step, strict=True)
        paddle.seed(123)  # MoCo's shuffle permutations: both paths draw the same ones
        outs = [{k: float(v) for k, v in step([paddle.to_tensor(t) for t in batch]).items()} for batch in batches]
        results.append((start, numpy_state(module), outs, step))
    return results


def assert_same_training(eager, fast, median=2e-3, worst=0.05):
    """Same losses and updates over the whole run (for a run that does not drift: a linear probe)."""
    (start, eager_state, eager_outs, _), (_, fast_state, fast_outs, _) = eager, fast
    for e, f in zip(eager_outs, fast_outs):
        assert f["loss"] == pytest.approx(e["loss"], rel=1e-4)
    errors = update_errors(start, fast_state, eager_state)
    moved = {k: v for k, v in errors.items() if np.abs(eager_state[k] - start[k]).max() > 0}
    assert moved, "nothing trained: the comparison would be empty"
    assert np.median(list(moved.values())) <= median, sorted(moved.items(), key=lambda kv: -kv[1])[:3]
    assert max(moved.values()) <= worst, max(moved, key=moved.get)
    frozen = [k for k in errors if k not in moved]
    for key in frozen:  # what eager left alone (a frozen backbone, the step's unused buffers) stays put
        np.testing.assert_array_equal(fast_state[key], start[key], err_msg=key)


def velocity_of(runner):
    """{structured parameter name: numpy velocity} of a PpmocoRunner's optimizer."""
    live = velocities(runner.optimizer)
    return {name: live[p.name].numpy().copy() for name, p in runner.params.items() if p.name in live}


def assert_same_update(start, fast_state, eager_state, median=2e-3, worst=0.05):
    errors = update_errors(start, fast_state, eager_state)
    assert np.median(list(errors.values())) <= median, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert max(errors.values()) <= worst, max(errors, key=errors.get)
    np.testing.assert_allclose(fast_state["queue"], eager_state["queue"], atol=1e-4)
    np.testing.assert_array_equal(fast_state["queue_ptr"], eager_state["queue_ptr"])


# Catches: a second program (the last, smaller batch) built from stale state or never checked, and
# a queue pointer advanced by the first program's batch size. Each step starts both paths from the
# eager state (three free-running float32 steps of this network drift apart by chaos alone).
def test_a_smaller_last_batch_runs_its_own_program_equal_to_eager():
    setup = Setup(batch=8, K=64)
    eager, fast = PpmocoRunner(setup, "eager"), PpmocoRunner(setup, "static")
    rng = np.random.default_rng(5)
    for n in (8, 3):
        views = [rng.standard_normal((n, 3, 64, 64)).astype("float32") for _ in range(2)]
        start, velocity = eager.state(), velocity_of(eager)
        fast.load(start, velocity)
        paddle.seed(n)
        eager_loss = eager.step(views)
        paddle.seed(n)
        assert fast.step(views) == pytest.approx(eager_loss, rel=1e-4)
        assert_same_update(start, fast.state(), eager.state())
    assert int(fast.state()["queue_ptr"][0]) == 11  # 8 + 3 keys enqueued
    programs = fast.step_fn.programs
    assert len(programs) == 2 and all(program is not None for program in programs.values())


# Catches: the frozen backbone's BatchNorm switched to batch statistics on the fast path, a moved
# backbone weight, or a classifier that does not train the way eager trains it.
def test_linear_evaluation_on_a_standard_resnet18_equals_eager():
    def module():
        paddle.seed(0)
        probe = LinearEval(base_encoder=STANDARD, num_classes=10)
        probe.train()
        return probe

    rng = np.random.default_rng(6)
    batches = [[rng.standard_normal((8, 3, 64, 64)).astype("float32"), rng.integers(0, 10, 8)] for _ in range(3)]
    eager, fast = fast_and_eager(module, 0.5, batches)
    assert_same_training(eager, fast)
    assert set(k for k in fast[1] if not np.array_equal(fast[1][k], fast[0][k])) == {
        "classifier.fc.weight", "classifier.fc.bias"}
