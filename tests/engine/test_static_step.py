"""The static/oneDNN fast path computes the same training as the eager path.

Tolerance: the fast path runs other kernels (oneDNN convolutions) in float32, so results agree to
rounding, not bit for bit; over three steps the measured worst difference is below 1e-6, and the
tests allow 1e-5 (losses: relative 1e-5).
"""
import numpy as np
import paddle
import pytest

from ppmoco.engine.env import RunEnv
from ppmoco.engine.static_step import (
    PLAIN_CPU_OPS,
    StaticTrainStep,
    _disagreement,
    _Snapshot,
    _update_norms,
    place_on_onednn,
)
from ppmoco.engine.step import TrainStep, build_optimizer, build_train_step
from ppmoco.errors import ConfigError
from ppmoco.fast_path import cpu_info, has_bfloat16_units
from ppmoco.inference import cpu_predictor
from ppmoco.modules.linear_eval import LinearEval
from ppmoco.modules.moco import MoCo
from ppmoco.paddle_internals import velocities

from moco_equivalence import Setup, numpy_state

TINY = {"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True}
OPT = {"momentum": 0.9, "weight_decay": 1e-4}
NO_AMP = {"enable": False}


def make_moco():
    paddle.seed(0)
    moco = MoCo(base_encoder=TINY, projector={"hidden_dim": 16}, dim=8, K=32, m=0.9, T=0.2, bn_splits=2)
    moco.train()
    return moco


def train(static, steps=3):
    moco = make_moco()
    opt = build_optimizer(OPT, moco, 0.05)
    if static:
        step = StaticTrainStep(moco, opt, lambda module: build_optimizer(OPT, module, 0.05),
                               TrainStep(moco, opt, NO_AMP), strict=True)
    else:
        step = TrainStep(moco, opt, NO_AMP)
    rng = np.random.default_rng(0)
    paddle.seed(123)  # the shuffle-BN permutations: both paths draw them from the same generator
    losses, accs = [], []
    for _ in range(steps):
        views = [paddle.to_tensor(rng.standard_normal((8, 3, 16, 16)).astype("float32")) for _ in range(2)]
        out = step(views)
        losses.append(float(out["loss"]))
        accs.append(float(out["acc1"]))
    state = {k: v.numpy().copy() for k, v in moco.state_dict().items()}
    velocity = [v.numpy().copy() for v in velocities(opt).values()]
    return losses, accs, state, velocity


@pytest.fixture(scope="module")
def both_paths():
    return train(static=False), train(static=True)


def test_fast_path_gives_the_eager_losses_weights_queue_and_velocities(both_paths):
    (le, ae, se, ve), (ls, as_, ss, vs) = both_paths
    np.testing.assert_allclose(ls, le, rtol=1e-5)
    np.testing.assert_allclose(as_, ae, atol=1e-4)
    assert se.keys() == ss.keys()
    for key in se:
        np.testing.assert_allclose(ss[key], se[key], atol=1e-5, rtol=0, err_msg=key)
    assert len(ve) == len(vs) > 0
    for a, b in zip(ve, vs):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert int(ss["queue_ptr"][0]) == 24  # three batches of 8 keys


def test_fast_path_updates_batchnorm_running_statistics(both_paths):
    """oneDNN's training batch_norm leaves running mean/var untouched; the fast path must not."""
    initial = make_moco().state_dict()
    (_, _, eager, _), (_, _, static, _) = both_paths
    for key in ("encoder_q.backbone.bn1._mean", "encoder_q.backbone.layer4.1.bn2._variance",
                "encoder_k.backbone.bn1._mean"):
        moved = np.abs(static[key] - initial[key].numpy()).max()
        assert moved > 1e-3, f"{key} did not move: {moved}"
        np.testing.assert_allclose(static[key], eager[key], atol=1e-5, rtol=0)


def test_placement_keeps_convolutions_on_onednn_and_the_listed_ops_on_paddle():
    paddle.enable_static()
    try:
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("x", [2, 3, 8, 8], "float32")
            y = paddle.nn.functional.relu(paddle.nn.BatchNorm2D(4)(paddle.nn.Conv2D(3, 4, 3)(x)))
            loss = paddle.nn.functional.normalize(y.mean(axis=[2, 3]), axis=1).sum()
            paddle.optimizer.SGD(0.1).minimize(loss)
        place_on_onednn(main)
        ops = {op.name(): op for op in main.global_block().ops}
    finally:
        paddle.disable_static()
    assert {"onednn_op.conv2d", "onednn_op.conv2d_grad"} <= set(ops)
    assert {"pd_op.batch_norm_", "pd_op.batch_norm_grad"} <= set(ops)
    assert not {f"onednn_op.{name}" for name in PLAIN_CPU_OPS} & set(ops)
    assert all(not op.attrs().get("is_test", False) for name, op in ops.items() if name.startswith("onednn_op."))


def env(world_size=1, device="cpu"):
    return RunEnv(device=device, world_size=world_size, rank=0, local_size=world_size, num_threads=1)


@pytest.mark.parametrize("kwargs, amp, message", [
    ({"world_size": 2}, False, "one process"),
    ({"device": "gpu"}, False, "CPU fast path"),
    ({}, True, "float32"),
])
def test_static_refuses_what_it_cannot_run(kwargs, amp, message):
    engine_cfg = {"execution": "static", "conv": "auto",
                  "mix_precision": {"enable": amp, "level": "O1", "dtype": "float16", "scale_loss": 1.0}}
    with pytest.raises(ConfigError, match=f"Engine.execution: .*{message}"):
        build_train_step(engine_cfg, OPT, make_moco(), 0.05, env(**kwargs))


@pytest.mark.parametrize("execution, world_size, amp, expected", [
    ("auto", 1, False, "static (oneDNN)"), ("auto", 2, False, "eager"), ("auto", 1, True, "eager"),
    ("eager", 1, False, "eager"), ("static", 1, False, "static (oneDNN)"),
])
def test_auto_picks_the_fast_path_only_where_it_runs(execution, world_size, amp, expected):
    engine_cfg = {"execution": execution, "conv": "auto",
                  "mix_precision": {"enable": amp, "level": "O1", "dtype": "float16", "scale_loss": 1.0}}
    step = build_train_step(engine_cfg, OPT, make_moco(), 0.05, env(world_size))
    assert step.execution == expected


def test_linear_eval_fast_path_trains_the_classifier_as_eager_and_keeps_the_backbone():
    """The frozen backbone keeps eval-mode BatchNorm (is_test) on the fast path too."""
    def run(static):
        paddle.seed(0)
        module = LinearEval(base_encoder=TINY, num_classes=3)
        module.train()
        opt = build_optimizer(OPT, module, 0.5)
        step = TrainStep(module, opt, NO_AMP)
        if static:
            step = StaticTrainStep(module, opt, lambda m: build_optimizer(OPT, m, 0.5), step, strict=True)
        rng = np.random.default_rng(1)
        for _ in range(2):
            images = paddle.to_tensor(rng.standard_normal((6, 3, 16, 16)).astype("float32"))
            step([images, paddle.to_tensor(rng.integers(0, 3, 6))])
        return {k: v.numpy().copy() for k, v in module.state_dict().items()}, module

    eager, _ = run(False)
    static, module = run(True)
    module.check_backbone_unchanged()  # raises if a weight or BN statistic moved
    paddle.seed(0)
    initial = LinearEval(base_encoder=TINY, num_classes=3).state_dict()["classifier.fc.weight"].numpy()
    assert np.abs(static["classifier.fc.weight"] - initial).max() > 1e-4  # the classifier trained
    for key in eager:
        np.testing.assert_allclose(static[key], eager[key], atol=1e-5, rtol=0, err_msg=key)


# The check of a new program against the eager step, at the real shapes of the urgent issue.
def _standard_run(static, batch=8, steps=2, strict=False, conv="paddle", conv_dtype="float32"):
    setup = Setup(batch=batch, steps=steps)
    moco = setup.moco()
    opt = build_optimizer(OPT, moco, setup.lr)
    step = TrainStep(moco, opt, NO_AMP, conv=conv, conv_dtype=conv_dtype)
    if static:
        step = StaticTrainStep(moco, opt, lambda m: build_optimizer(OPT, m, setup.lr), step, strict=strict)
    paddle.seed(123)
    losses = [float(step([paddle.to_tensor(v) for v in views])["loss"]) for views in setup.views()]
    return losses, numpy_state(moco), step


@pytest.fixture(scope="module")
def eager_standard():
    return _standard_run(static=False)


def test_a_program_that_fails_its_check_is_dropped_and_the_run_continues_eagerly(
        monkeypatch, caplog, eager_standard):
    monkeypatch.delitem(PLAIN_CPU_OPS, "add")  # the oneDNN in-place add fault, back on purpose
    losses, state, step = _standard_run(static=True)
    assert "static fast path not used for batch 8x3x64x64" in caplog.text
    assert "off eager's" in caplog.text
    assert list(step.programs.values()) == [None] and step.execution.startswith("eager where")
    eager_losses, eager_state, _ = eager_standard
    assert losses == eager_losses  # bit-identical: the check's eager result is the step's result
    for key in eager_state:
        np.testing.assert_array_equal(state[key], eager_state[key], err_msg=key)


def test_strict_static_execution_refuses_a_program_that_fails_its_check(monkeypatch):
    monkeypatch.delitem(PLAIN_CPU_OPS, "add")
    with pytest.raises(ConfigError, match=r"^Engine.execution: static: for batch 8x3x64x64 the update of .* "
                                          r"off eager's; set Engine.execution=auto"):
        _standard_run(static=True, steps=1, strict=True)


def test_a_native_failure_names_the_op_and_falls_back(monkeypatch, caplog, tmp_path):
    # An evaluation's predictor first, as a kNN monitor builds one between epochs. Catches: a
    # predictor setting (disable_glog_info) that silences Paddle's warnings for the whole process,
    # the line naming the failing op among them.
    paddle.jit.save(paddle.nn.Linear(2, 2), str(tmp_path / "m"), input_spec=[paddle.static.InputSpec([None, 2])])
    cpu_predictor(str(tmp_path / "m"), 1)
    monkeypatch.delitem(PLAIN_CPU_OPS, "add_grad")  # oneDNN's add_grad raises dnnl::error at batch 1
    losses, _, step = _standard_run(static=True, batch=1, steps=1)
    assert "static fast path not used for batch 1x3x64x64: the program failed in onednn_op.add_grad" in caplog.text
    assert list(step.programs.values()) == [None] and np.isfinite(losses[0])


def test_batch_of_one_trains_on_the_fast_path():
    _, _, step = _standard_run(static=True, batch=1, steps=2, strict=True)
    assert all(program is not None for program in step.programs.values())


def test_paddle_batchnorm_updates_the_running_variance_with_the_biased_batch_variance():
    """The one convention in which ppmoco's BN differs from PyTorch's (docs/differences.md)."""
    bn = paddle.nn.BatchNorm2D(3, momentum=0.9)
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype("float32")
    bn(paddle.to_tensor(x))
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 + 0.1 * x.var(axis=(0, 2, 3)), rtol=1e-5)


def test_the_check_measures_each_update_against_eager_without_the_state_before_the_step():
    # The check keeps two norms per tensor instead of the copies of the state before the step.
    # Against the definition, ||d_static - d_eager|| / ||d_eager|| with d = after - before,
    # recomputed here in float64 from all three states. Catches: the program's result taken from
    # a snapshot instead of the live tensors, the norms of the wrong pair, the floor for a tensor
    # the eager step leaves unchanged (a frozen BN statistic) dropped.
    rng = np.random.default_rng(0)
    before = {"w": rng.standard_normal(50).astype("float32"), "frozen": np.full(4, 1000.0, "float32"),
              "count": np.arange(3, dtype="int64")}
    d_eager = (1e-2 * rng.standard_normal(50)).astype("float32")
    after_eager = dict(before, w=before["w"] + d_eager)
    state = {k: paddle.to_tensor(v) for k, v in before.items()}
    snapshot_before = _Snapshot(state)
    for key, value in after_eager.items():
        paddle.assign(value, output=state[key])
    eager = _Snapshot(state)
    norms = _update_norms(snapshot_before, eager)
    assert set(norms) == {"w", "frozen"}

    def verdict(static_values):
        for key, value in static_values.items():
            paddle.assign(value, output=state[key])
        return _disagreement(eager, norms, state, {"loss": 1.0}, {"loss": 1.0}, ["w"])

    def relative(static_w):
        start = before["w"].astype("float64")
        d_static, d_reference = static_w - start, after_eager["w"] - start
        return np.linalg.norm(d_static - d_reference) / np.linalg.norm(d_reference)

    close = after_eager["w"] + (0.01 * d_eager).astype("float32")
    assert relative(close) < 0.05 and verdict(dict(after_eager, w=close)) is None
    far = after_eager["w"] + (0.6 * d_eager).astype("float32")
    assert verdict(dict(after_eager, w=far)) == f"the update of w is {relative(far):.2g} off eager's"
    # A tensor eager leaves as it is is measured against 1e-6 of its own size (here 2e-3): float32
    # rounding passes, a real move does not.
    rounded = np.nextafter(before["frozen"], np.float32(2000.0))
    assert verdict(dict(after_eager, frozen=rounded)) is None
    moved = before["frozen"] + np.array([0, 0, 0, 1], "float32")
    assert verdict(dict(after_eager, frozen=moved)) == "the update of frozen is 5e+02 off eager's"
    assert verdict(dict(after_eager, count=np.array([0, 1, 3]))) == "count differs from eager"


class _FullDisk:
    """A temporary file on a full disk: every write fails."""

    def __init__(self, **options):
        pass

    def write(self, data):
        raise OSError(28, "No space left on device")

    def close(self):
        pass


@pytest.mark.parametrize("failure", ["no temporary file", "disk full while writing"])
def test_the_checks_copies_stay_in_memory_where_the_temporary_directory_has_no_room(monkeypatch, failure):
    # Catches: a check that crashes the run (or restores garbage) on a full TMPDIR.
    def no_file(**options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tempfile.TemporaryFile", no_file if failure == "no temporary file" else _FullDisk)
    state = {"w": paddle.to_tensor(np.arange(6, dtype="float32")), "n": paddle.to_tensor(np.arange(3))}
    snapshot = _Snapshot(state)
    paddle.assign(np.zeros(6, "float32"), output=state["w"])
    snapshot.restore()
    np.testing.assert_array_equal(state["w"].numpy(), np.arange(6, dtype="float32"))
    assert [key for key, _ in snapshot.values()] == ["w", "n"]
    snapshot.close()


def _conv_run(static, conv_dtype):
    """Losses and step of two steps at the standard shapes (ResNet-18, 64 px, v2 head) on ppmoco's
    convolution; a program must pass its check."""
    losses, _, step = _standard_run(static, strict=True, conv="onednn", conv_dtype=conv_dtype)
    return losses, step


@pytest.mark.skipif(not has_bfloat16_units(cpu_info()), reason="the CPU has no bfloat16 units")
def test_bfloat16_convolutions_train_on_the_fast_path_close_to_float32():
    losses32 = _conv_run(static=False, conv_dtype="float32")[0]
    eager_losses = _conv_run(static=False, conv_dtype="bfloat16")[0]
    static_losses, step = _conv_run(static=True, conv_dtype="bfloat16")
    # The program computes its convolutions in bfloat16 (it passed its strict check against the
    # bfloat16 eager step). Catches: the program traced with float32 convolutions.
    compiled = next(iter(step.programs.values()))
    convs = [op for op in compiled.program.global_block().ops if op.name() == "custom_op.onednn_conv2d"]
    assert convs and all(op.attrs()["bf16"] for op in convs) and step.conv_dtype == "bfloat16"
    # From the same state the first step's losses agree as the check requires (they then drift
    # apart as bfloat16 roundings of slightly different activations differ: 3e-4 at the second).
    assert abs(static_losses[0] - eager_losses[0]) <= 1e-5 * eager_losses[0]
    # bfloat16 moves the losses off float32's by its rounding (0.2-0.4% here), no more. Catches:
    # bfloat16 dropped on the way (equal losses); tests/ops checks the arithmetic itself.
    assert not np.array_equal(eager_losses, losses32)
    np.testing.assert_allclose(eager_losses, losses32, rtol=1e-2)
    np.testing.assert_allclose(static_losses, losses32, rtol=1e-2)
