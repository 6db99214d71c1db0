"""The optimizers Optimizer.name chooses (ppmoco/optimizers.py): Momentum as torch SGD, AdamW as
torch.optim.AdamW, weight-decay exclusion and learning-rate multipliers for all three, and the loss scaler's
skipped steps. LARS's
update: tests/engine/test_lars.py; their state in checkpoints: tests/engine/test_optimizer_state.py."""
import numpy as np
import paddle
import pytest

from ppmoco.engine.step import build_optimizer
from ppmoco.errors import ConfigError
from ppmoco.modules.base import Module
from ppmoco.optimizers import excluded_from_weight_decay, lr_multipliers

from optimizer_cases import case, largest_difference, numpy_adamw, run
from optional_deps import torch_or_skip


class Weights(paddle.nn.Layer):
    def __init__(self, value):
        super().__init__()
        self.w = self.create_parameter([len(value)], default_initializer=paddle.nn.initializer.Assign(value))

    def trainable_parameters(self):  # what build_optimizer asks a Module for
        return [self.w]


def torch_sgd(p, grads, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD's documented update, in numpy: d = g + wd p; v = d (first step) else m v + d;
    nesterov: d = d + m v, else d = v; p -= lr d."""
    v = None
    for g in grads:
        d = g + weight_decay * p
        v = d if v is None else momentum * v + d
        p = p - lr * (d + momentum * v if nesterov else v)
    return p


# Catches: Optimizer.use_nesterov not reaching paddle's Momentum (plain momentum instead), or a
# Nesterov step of another form than torch SGD's (mmselfsup's multi-head recipe uses nesterov=True).
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_torch_sgd_with_and_without_nesterov(nesterov):
    rng = np.random.default_rng(0)
    start = rng.standard_normal(5).astype("float32")
    grads = [rng.standard_normal(5).astype("float32") for _ in range(3)]
    layer = Weights(start)
    opt = build_optimizer({"momentum": 0.9, "weight_decay": 1e-2, "use_nesterov": nesterov}, layer, 0.1)
    for g in grads:
        (layer.w * paddle.to_tensor(g)).sum().backward()  # gradient g
        opt.step()
        opt.clear_grad()
    expected = torch_sgd(start.astype("float64"), grads, 0.1, 0.9, 1e-2, nesterov)
    np.testing.assert_allclose(layer.w.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, torch_sgd(start.astype("float64"), grads, 0.1, 0.9, 1e-2, not nesterov))


# AdamW bounds: over 200 cases (optimizer_cases.case, 6 steps at a rising rate) ppmoco's parameters are
# at most 1.35e-6 from the float64 formula (epsilon 1e-8; 6.5e-7 with epsilon 1e-2 and gradients of
# 1e-2, where epsilon weighs), float32 torch.optim.AdamW 1.2e-6 (6.7e-7), the two at most 1.43e-6
# apart. ADAMW_TOL is 3.5x the largest; the closest wrong update tried is 0.013 away.
ADAMW_TOL = 5e-6
ADAMW_CASES = {  # (settings, gradient scale)
    "default_epsilon": ({"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "weight_decay": 0.05}, 1.0),
    "epsilon_weighs": ({"beta1": 0.9, "beta2": 0.99, "epsilon": 1e-2, "weight_decay": 0.05}, 1e-2),
}


# Catches: weight decay added to the gradient (Adam's L2, not AdamW's), decay not scaled by the rate,
# no bias correction, and (where epsilon weighs) epsilon added before the bias correction: each is
# computed in NumPy and must be far outside the bound.
@pytest.mark.parametrize("name", sorted(ADAMW_CASES))
def test_adamw_is_the_decoupled_update_with_bias_correction(name):
    settings, scale = ADAMW_CASES[name]
    for seed in range(3):
        start, grads, lrs = case(seed, scale)
        expected = numpy_adamw(start, grads, lrs, **settings)
        assert largest_difference(run(dict(name="AdamW", **settings), start, grads, lrs), expected) < ADAMW_TOL
        wrong = ["L2 decay (Adam)", "decay without lr", "no bias correction"]
        for mutation in wrong + (["epsilon inside the correction"] if settings["epsilon"] > 1e-4 else []):
            assert largest_difference(numpy_adamw(start, grads, lrs, mutation=mutation, **settings), expected) \
                > 100 * ADAMW_TOL, mutation


# Catches the same against torch.optim.AdamW itself (its betas, eps and weight_decay mapped from ours).
@pytest.mark.parametrize("name", sorted(ADAMW_CASES))
def test_adamw_equals_torch_adamw(name):
    torch = torch_or_skip()
    settings, scale = ADAMW_CASES[name]
    start, grads, lrs = case(0, scale)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=lrs[0], betas=(settings["beta1"], settings["beta2"]),
                            eps=settings["epsilon"], weight_decay=settings["weight_decay"])
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        opt.step()
    reference = {k: p.detach().numpy() for k, p in params.items()}
    assert largest_difference(run(dict(name="AdamW", **settings), start, grads, lrs), reference) < ADAMW_TOL


class Net(Module):
    """Norm layers under names that say nothing of normalisation, a bias-free convolution, a parameter
    whose name holds "bias" without being one, and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.stem = paddle.nn.Conv2D(3, 4, 3, bias_attr=False)
        self.gate = paddle.nn.BatchNorm2D(4)
        self.mix = paddle.nn.LayerNorm(4)
        self.groups = paddle.nn.GroupNorm(2, 4)
        self.head = paddle.nn.Linear(4, 3)
        self.bias_table = self.create_parameter([3, 3])
        self.frozen = paddle.nn.Linear(3, 3)
        for p in self.frozen.parameters():
            p.stop_gradient = True

    def forward(self, x):
        y = self.groups(self.gate(self.stem(x))).mean(axis=[2, 3])
        return (self.head(self.mix(y)) @ self.bias_table).sum()


NORMS = {"gate.weight", "gate.bias", "mix.weight", "mix.bias", "groups.weight", "groups.bias"}


@pytest.mark.parametrize("rules, expected", [
    (["bias"], {"gate.bias", "mix.bias", "groups.bias", "head.bias"}),
    (["norm"], NORMS),
    (["bias", "norm"], NORMS | {"head.bias"}),
    (["head"], {"head.weight", "head.bias"}),
    (["bias_table"], {"bias_table"}),
])
def test_exclusion_rules_select_parameters_by_kind_or_by_name(rules, expected):
    # Catches: norm matched by a name containing "norm" (none does here), bias by a substring
    # (bias_table is a weight), frozen parameters listed, or BatchNorm's running statistics taken.
    assert excluded_from_weight_decay(Net(), rules) == expected


def test_a_name_rule_that_matches_nothing_is_a_config_error():
    # Catches: a misspelt rule silently decaying everything.
    with pytest.raises(ConfigError, match=r"^Optimizer.exclude_from_weight_decay: 'haed' is in no trainable "
                                          r"parameter's name of Net \(e\.g\. bias_table\); correct it, or use "
                                          r"bias or norm$"):
        excluded_from_weight_decay(Net(), ["bias", "haed"])


def train_net(cfg, seed=0, steps=3, lr=0.1):
    paddle.seed(seed)
    net = Net()
    opt = build_optimizer(cfg, net, lr)
    x = paddle.randn([2, 3, 6, 6])
    for i in range(steps):
        opt.set_lr(lr * (i + 1))
        net(x).backward()
        opt.step()
        opt.clear_grad()
    return {k: v.numpy() for k, v in net.state_dict().items()}, opt


@pytest.mark.parametrize("name, decay", [("Momentum", 0.01), ("AdamW", 0.05), ("LARS", 0.05)])
def test_excluded_parameters_train_as_without_weight_decay(name, decay):
    """From the same weights and gradients each parameter's update is its own: after one step an
    excluded parameter must be exactly where a step without weight decay puts it, every other one
    where the step with it does."""
    rules = ["norm", "head"]  # for LARS a 2-D weight (head.weight), which its own rule would decay
    excluded = excluded_from_weight_decay(Net(), rules)
    with_rules, opt = train_net({"name": name, "weight_decay": decay, "exclude_from_weight_decay": rules}, steps=1)
    decayed, _ = train_net({"name": name, "weight_decay": decay}, steps=1)
    undecayed, _ = train_net({"name": name, "weight_decay": 0.0}, steps=1)
    # Catches: the exclusion ignored (Paddle's Momentum and AdamW read a group's weight_decay; LARS reads it
    # from the group too), or applied to the wrong group.
    for key in decayed:
        np.testing.assert_array_equal(with_rules[key], (undecayed if key in excluded else decayed)[key], err_msg=key)
    assert not np.array_equal(decayed["head.weight"], undecayed["head.weight"])  # the decay shows
    assert [len(g["params"]) for g in opt._param_groups] == [len(Net().trainable_parameters()) - len(excluded),
                                                               len(excluded)]


@pytest.mark.parametrize("name", ["Momentum", "AdamW", "LARS"])
def test_a_parameter_with_a_multiplier_trains_as_at_that_multiple_of_the_learning_rate(name):
    """From the same weights and gradients each parameter's step is its own: after one step a parameter
    that lr_mult names must be where a step at m times the learning rate puts it (its weight decay
    scaled with it: torch's group lr), every other one where the plain step does."""
    rules = {"head": 10.0, "gate": 0.5}
    scaled = lr_multipliers(Net(), rules)
    assert scaled == {"head.weight": 10.0, "head.bias": 10.0, "gate.weight": 0.5, "gate.bias": 0.5}
    with_mult, opt = train_net({"name": name, "weight_decay": 0.05, "lr_mult": rules}, steps=1)
    runs = {m: train_net({"name": name, "weight_decay": 0.05}, steps=1, lr=0.1 * m)[0] for m in (1.0, 10.0, 0.5)}
    # Catches: the multiplier ignored (Paddle's optimizers and LARS read a group's learning_rate), applied to
    # every group, or applied to the gradient only (the decay at the plain rate, visible under AdamW and LARS).
    for key in runs[1.0]:
        np.testing.assert_allclose(with_mult[key], runs[scaled.get(key, 1.0)][key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)
    assert not np.allclose(runs[10.0]["head.weight"], runs[1.0]["head.weight"])
    assert sorted(g["learning_rate"] for g in opt._param_groups) == [0.5, 1.0, 10.0]


def test_lr_mult_rules_that_match_nothing_or_overlap_are_config_errors():
    # Catches: a misspelt rule leaving the head at the backbone's rate, and two rules fighting over one
    # parameter (which one wins would depend on the order of the YAML mapping).
    with pytest.raises(ConfigError, match=r"^Optimizer.lr_mult: 'haed' is in no trainable parameter's name of Net "
                                          r"\(e\.g\. bias_table\); correct it$"):
        lr_multipliers(Net(), {"haed": 10.0})
    with pytest.raises(ConfigError, match=r"^Optimizer.lr_mult: head.bias holds both 'head' and 'bias'; give each "
                                          r"parameter one rule"):
        lr_multipliers(Net(), {"head": 10.0, "bias": 2.0})


def test_momentum_in_a_parameter_group_is_bit_identical_to_the_plain_parameter_list():
    # The Momentum every config trained with before parameter groups. Catches: the group changing the
    # update (its weight decay, learning rate or Nesterov setting not the optimizer's).
    for nesterov in (False, True):
        cfg = {"name": "Momentum", "momentum": 0.9, "weight_decay": 0.01, "use_nesterov": nesterov}
        grouped, opt = train_net(cfg)
        assert len(opt._param_groups) == 1 and isinstance(opt._param_groups[0], dict)
        paddle.seed(0)
        net = Net()
        plain = paddle.optimizer.Momentum(0.1, momentum=0.9, parameters=net.trainable_parameters(),
                                          use_nesterov=nesterov, weight_decay=0.01)
        x = paddle.randn([2, 3, 6, 6])
        for i in range(3):
            plain.set_lr(0.1 * (i + 1))
            net(x).backward()
            plain.step()
            plain.clear_grad()
        for key, value in net.state_dict().items():
            np.testing.assert_array_equal(grouped[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("name", ["Momentum", "AdamW", "LARS"])
def test_a_step_the_loss_scaler_found_overflowing_changes_no_parameter(name):
    # GradScaler (float16, GPU) hands the optimizer its found_inf flag and calls step(); the optimizer
    # must skip the update. Catches: an optimizer (ppmoco's LARS) that ignores the flag.
    paddle.seed(0)
    net = Net()
    opt = build_optimizer({"name": name}, net, 0.1)
    net(paddle.randn([2, 3, 6, 6])).backward()
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(True))
    opt.step()
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[key], err_msg=key)
    opt._set_auxiliary_var("found_inf", paddle.to_tensor(False))
    opt.step()
    assert not np.array_equal(net.head.weight.numpy(), before["head.weight"])
