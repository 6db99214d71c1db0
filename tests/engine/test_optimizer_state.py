"""Every optimizer's state in checkpoints and in the non-finite step guard: Momentum's velocity,
AdamW's moments and beta powers, LARS's mu, each under structured parameter names, so a resumed run
equals the straight one bit for bit whatever order Paddle named the parameters in; a checkpoint of
another optimizer is refused in one line; a skipped first step leaves each optimizer as fresh."""
import functools
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ppmoco import paddle_internals as internals
from ppmoco.config import load_config
from ppmoco.engine import Engine, setup_environment, setup_logger
from ppmoco.engine.checkpoint import _rename_optimizer_state, load_checkpoint, save_checkpoint
from ppmoco.engine.engine import _FiniteGuard
from ppmoco.errors import CheckpointError
from ppmoco.modules import build_module
from ppmoco.modules.base import Module
from ppmoco.optimizers import OPTIMIZERS, accumulator, build_optimizer, check_state, initial_value
from ppmoco.safe_pickle import load_paddle

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# Each optimizer with settings that make every part of its state move, and weight-decay groups.
CONFIGS = {
    "Momentum": {"name": "Momentum", "momentum": 0.9, "weight_decay": 1e-3, "use_nesterov": True,
                 "exclude_from_weight_decay": ["bias"]},
    "AdamW": {"name": "AdamW", "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6, "weight_decay": 0.05,
              "exclude_from_weight_decay": ["bias", "norm"]},
    "LARS": {"name": "LARS", "momentum": 0.9, "weight_decay": 0.01, "trust_coefficient": 0.02,
             "exclude_from_weight_decay": ["head"]},
}
STATE = {"epoch": 0, "next_batch": 0, "global_step": 0}


class Net(Module):
    def __init__(self):
        super().__init__()
        self.stem = paddle.nn.Linear(6, 8)
        self.norm = paddle.nn.BatchNorm1D(8)
        self.head = paddle.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(paddle.nn.functional.relu(self.norm(self.stem(x))))


def build(name, shift=0):
    """The net with the same initial weights whatever `shift`, the layers built before it, which move
    Paddle's parameter names (linear_7.w_0, ...)."""
    for _ in range(shift):
        paddle.nn.Linear(2, 2)
    paddle.seed(0)
    net = Net()
    return net, build_optimizer(CONFIGS[name], net, 0.1)


def train(net, opt, steps):
    """Steps `steps` (a range: the step numbers) with each step's own batch and rate."""
    for step in steps:
        rng = np.random.default_rng(step)
        opt.set_lr(0.05 * (step + 1))
        x, target = (paddle.to_tensor(rng.standard_normal(s).astype("float32")) for s in ((5, 6), (5, 4)))
        ((net(x) - target) ** 2).mean().backward()
        opt.step()
        opt.clear_grad()


def structured_state(net, opt):
    """The optimizer's state under structured names, as arrays (what a checkpoint holds)."""
    names = {p.name: n for n, p in net.named_parameters()}
    return {k: v.numpy() for k, v in _rename_optimizer_state(opt.state_dict(), names).items() if k != "master_weights"}


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_resumed_run_equals_the_straight_one_bit_for_bit(tmp_path, name):
    # Catches: a part of an optimizer's state not saved or not restored (AdamW's beta powers, LARS's
    # mu), or restored onto another parameter when Paddle numbered the parameters differently.
    net, opt = build(name)
    train(net, opt, range(3))
    save_checkpoint(str(tmp_path), "step_3", net, opt, STATE)
    train(net, opt, range(3, 6))

    resumed, resumed_opt = build(name, shift=3)
    assert {p.name for p in resumed.parameters()}.isdisjoint({p.name for p in net.parameters()})
    load_checkpoint(str(tmp_path / "step_3"), resumed, resumed_opt)
    train(resumed, resumed_opt, range(3, 6))
    for (key, value), other in zip(net.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(value.numpy(), other.numpy(), err_msg=key)
    assert_equal_states(structured_state(net, opt), structured_state(resumed, resumed_opt))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_checkpoints_key_every_accumulator_by_structured_name(tmp_path, name):
    # Catches: an accumulator the table does not list, or one re-keyed under Paddle's name (which the
    # next build changes) instead of the parameter's structured name.
    net, opt = build(name, shift=2)
    train(net, opt, range(1))
    save_checkpoint(str(tmp_path), "step_1", net, opt, STATE)
    saved = load_paddle(str(tmp_path / "step_1" / "optimizer.pdopt"))
    structured = [n for n, p in net.named_parameters() if not p.stop_gradient]
    expected = {f"{n}_{acc}_0" for n in structured for acc in OPTIMIZERS[name].accumulators}
    assert set(saved) == expected
    assert {accumulator(key) for key in saved} == set(OPTIMIZERS[name].accumulators)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_o2_master_weight_accumulators_are_rekeyed_too(name):
    # Under O2 Paddle keeps each low-precision parameter's state on its float32 master weight,
    # `<param>_fp32_master_0_<accumulator>_0`. Catches: those keys written under Paddle's names (not
    # the structured ones), or not recognised as the optimizer's accumulators (the check would refuse
    # an O2 checkpoint).
    net, _ = build(name)
    names = {p.name: n for n, p in net.named_parameters()}
    state = {f"{p.name}_fp32_master_0_{acc}_0": paddle.zeros([1]) for p in net.trainable_parameters()
             for acc in OPTIMIZERS[name].accumulators}
    state["master_weights"] = {p.name: paddle.zeros([1]) for p in net.trainable_parameters()}
    renamed = _rename_optimizer_state(state, names)
    assert set(renamed["master_weights"]) == {n for n, p in net.named_parameters() if not p.stop_gradient}
    assert all(key.split("_fp32_master_0_")[0] in names.values() for key in renamed if key != "master_weights")
    assert {accumulator(key) for key in renamed if key != "master_weights"} == set(OPTIMIZERS[name].accumulators)


def o2_lars(shift, o2=True):
    """LARS over Net with, under `o2`, bfloat16 linear layers and float32 master weights (what
    paddle.amp.decorate(level="O2") sets up on a GPU)."""
    net, _ = build("LARS", shift)
    if o2:
        internals.o2_cast([net.stem, net.head], "bfloat16")
    opt = build_optimizer(CONFIGS["LARS"], net, 0.1)
    opt._multi_precision = o2
    return net, opt


def train_o2(net, opt, steps):
    for step in steps:
        rng = np.random.default_rng(step)
        opt.set_lr(0.05 * (step + 1))
        x = paddle.to_tensor(rng.standard_normal((5, 6)).astype("float32"))
        # in float32 from the (bfloat16) weights: the CPU has no bfloat16 matmul; the gradients reach
        # the parameters through the casts
        stem, head = ([layer.weight.astype("float32"), layer.bias.astype("float32")] for layer in (net.stem, net.head))
        h = F.linear(F.relu(net.norm(F.linear(x, *stem))), *head)
        (h ** 2).mean().backward()
        opt.step()
        opt.clear_grad()


def test_lars_under_o2_resumes_bit_for_bit(tmp_path):
    # The O2 path the CPU can run (Paddle's own optimizers have no CPU kernel for bfloat16 parameters):
    # bfloat16 parameters, float32 master weights, LARS's mu on the masters. Catches: the masters or mu
    # not saved or not restored under structured names, or the restored masters keeping the names of the
    # run that saved them (Paddle names the state it keeps on a master after the master: the first step
    # then fails, "Optimizer set error, linear_9.w_0_fp32_master_0_mu_0 should in state dict").
    net, opt = o2_lars(0)
    train_o2(net, opt, range(2))
    save_checkpoint(str(tmp_path), "step_2", net, opt, STATE)
    train_o2(net, opt, range(2, 4))
    resumed, resumed_opt = o2_lars(4)
    load_checkpoint(str(tmp_path / "step_2"), resumed, resumed_opt)
    train_o2(resumed, resumed_opt, range(2, 4))
    assert net.stem.weight.dtype == paddle.bfloat16
    for (key, value), other in zip(net.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(value.astype("float32").numpy(), other.astype("float32").numpy(), err_msg=key)
    names, other_names = ({p.name: n for n, p in m.named_parameters()} for m in (net, resumed))
    masters = {names[k]: v.numpy() for k, v in opt.state_dict()["master_weights"].items()}
    assert masters and masters.keys() == {other_names[k] for k in resumed_opt.state_dict()["master_weights"]}
    for k, v in resumed_opt.state_dict()["master_weights"].items():
        np.testing.assert_array_equal(v.numpy(), masters[other_names[k]], err_msg=other_names[k])
    assert_equal_states(structured_state(net, opt), structured_state(resumed, resumed_opt))


@pytest.mark.parametrize("saved_o2", [True, False])
def test_a_checkpoint_resumes_with_o2_or_without_it_and_trains_on(tmp_path, saved_o2):
    # A GPU run's O2 checkpoint continued on a CPU in float32, and the other way: the state the optimizer
    # kept on a master weight (`<param>_fp32_master_0_mu_0`) moves to the parameter and back. Catches:
    # the keys loaded in the saving run's form (the first step fails: "Optimizer set error, ... should
    # in state dict"), or O2's master weights carried into a float32 run (saved again, and restored
    # over the weights by a later O2 resume).
    net, opt = o2_lars(0, o2=saved_o2)
    train_o2(net, opt, range(2))
    save_checkpoint(str(tmp_path), "step_2", net, opt, STATE)
    other, other_opt = o2_lars(2, o2=not saved_o2)
    load_checkpoint(str(tmp_path / "step_2"), other, other_opt)

    def plain(state):
        return {key.replace("_fp32_master_0", ""): value for key, value in state.items()}

    assert_equal_states(plain(structured_state(other, other_opt)), plain(structured_state(net, opt)))
    train_o2(other, other_opt, range(2, 3))
    mus = structured_state(other, other_opt)
    assert plain(mus).keys() == plain(structured_state(net, opt)).keys()
    assert ("master_weights" in other_opt.state_dict()) is (not saved_o2)
    assert all(("_fp32_master_0_" in key) is (not saved_o2) for key in mus if key.startswith(("stem.", "head.")))


@pytest.mark.parametrize("saved, resumed", [("Momentum", "AdamW"), ("AdamW", "LARS"), ("LARS", "Momentum")])
def test_a_checkpoint_of_another_optimizer_is_refused_in_one_line(tmp_path, saved, resumed):
    # Catches: Paddle's own failure instead, an assertion naming one tensor at the first step after
    # resuming (or, Momentum and LARS both keeping one tensor per parameter, a silent mix-up).
    net, opt = build(saved)
    train(net, opt, range(1))
    save_checkpoint(str(tmp_path), "step_1", net, opt, STATE)
    other, other_opt = build(resumed, shift=1)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/step_1/optimizer.pdopt holds the state of {saved} "
                                              rf"\(.*\), not of {resumed}: resume with the Optimizer.name that "
                                              r"wrote it, or start afresh in another Engine.save_load.output_dir$"):
        load_checkpoint(str(tmp_path / "step_1"), other, other_opt)
    check_state({}, other_opt, "anywhere")  # an optimizer that never stepped holds nothing: accepted


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_skipped_first_step_leaves_the_optimizer_as_a_fresh_one(name):
    """Engine.skip_nonfinite_steps: a NaN first step creates the optimizer's state and poisons it; the
    guard must put each part back to where the optimizer starts it. Then a good step must equal the
    same step of a run that never saw the bad one."""
    cfg = CONFIGS[name]
    net, opt = build(name)
    guard = _FiniteGuard(net, opt, skip=True, output_dir="unused", initial=functools.partial(initial_value, cfg))

    def step(nan):
        def run(batch):
            rng = np.random.default_rng(0)
            x = paddle.to_tensor(rng.standard_normal((5, 6)).astype("float32"))
            loss = (net(x) ** 2).mean() * (float("nan") if nan else 1.0)
            loss.backward()
            opt.step()
            opt.clear_grad()
            return {"loss": loss}
        return run

    assert guard.step(step(nan=True), None, 1) is None and guard.skipped == 1
    assert guard.step(step(nan=False), None, 2) is not None
    fresh, fresh_opt = build(name, shift=1)
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((5, 6)).astype("float32"))
    (fresh(x) ** 2).mean().backward()
    fresh_opt.step()
    # Catches: AdamW's beta powers zero-filled (Adam's bias correction then off for good), or any part
    # of the state left poisoned.
    for (key, value), other in zip(net.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(value.numpy(), other.numpy(), err_msg=key)
    assert_equal_states(structured_state(net, opt), structured_state(fresh, fresh_opt))


def test_each_accumulator_starts_where_its_optimizer_starts_it():
    # Catches: a beta power restarted at 0 (or at the other beta), or a master weight's state not
    # recognised by its accumulator's name.
    assert initial_value(CONFIGS["AdamW"], "linear_0.w_0_beta1_pow_acc_0") == 0.8
    assert initial_value(CONFIGS["AdamW"], "linear_0.w_0_fp32_master_0_beta2_pow_acc_0") == 0.99
    assert initial_value(CONFIGS["AdamW"], "linear_0.w_0_moment2_0") == 0.0
    assert initial_value({}, "linear_0.w_0_velocity_0") == 0.0  # Momentum, the default


def engine(out, name, *overrides):
    cfg = load_config(os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml"), [
        f"Engine.save_load.output_dir={out}", "Data.Train.sampler.batch_size=32", "Model.model.K=128",
        "Model.model.base_encoder.widths=[8,16,16,16]", "Model.model.projector.hidden_dim=32", "Model.model.dim=16",
        "Engine.eval_freq=-1", "Global.num_threads=1", "Engine.logging_freq=1", "Engine.max_steps=4",
        "Engine.save_load.save_steps=2", "Engine.save_load.keep_last=0", "Optimizer.momentum=null",
        "Optimizer.use_nesterov=null", f"Optimizer.name={name}", "Optimizer.exclude_from_weight_decay=[bias,norm]",
        *overrides])
    env = setup_environment(cfg["Global"], cfg["Distributed"])
    setup_logger(str(out), env.is_main)
    return Engine(cfg, build_module(cfg["Model"]), env)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_engine_resumes_every_optimizer_bit_for_bit(tmp_path, name, restore_ppmoco_logger):
    # MoCo v2 on the digits with the optimizer switched by -o alone (the config's Momentum keys set to
    # null), biases and norms excluded from weight decay. Catches: the Engine building or restoring
    # another optimizer than the config names, or losing part of its state.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = engine(straight, name)
    assert type(first.optimizer).__name__ == name
    # Catches: the Engine's guard not told where the optimizer's state starts (AdamW's beta powers
    # zero-filled after a skipped first step).
    for acc in OPTIMIZERS[name].accumulators:
        key = f"conv2d_0.w_0_{acc}_0"
        assert first.guard.initial(key) == initial_value(first.cfg["Optimizer"], key)
    assert first.fit() == 4
    assert engine(resumed, name, "Engine.max_steps=2").fit() == 2
    assert engine(resumed, name, f"Engine.save_load.ckpt_dir={resumed / 'step_2'}").fit() == 4
    assert f"resumed from {resumed / 'step_2'}" in (resumed / "train.log").read_text()
    for file in ("model.pdparams", "optimizer.pdopt"):
        a, b = (load_paddle(str(run / "step_4" / file)) for run in (straight, resumed))
        assert a.keys() == b.keys()
        if file == "optimizer.pdopt":
            assert {accumulator(k) for k in a} == set(OPTIMIZERS[name].accumulators)
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=f"{file} {key}")
