"""ppmoco's LARS (ppmoco/engine/lars.py) computes MoCo v3's update (facebookresearch/moco-v3,
moco/optimizer.py), which Paddle's own LarsMomentumOptimizer does not.

Bounds: over 200 random cases (optimizer_cases.case: a weight, a bias, a zero-started weight; 6 steps
at a rising rate; momentum 0.9, weight decay 0.1, trust coefficient 0.01) ppmoco's parameters are at
most 5.6e-7 from the float64 formula, float32 PyTorch running the same formula 5.6e-7, and the two
at most 2.4e-7 apart. TOL, 2e-6, is 3.5x the largest. The closest wrong update tried (Paddle's
trust-ratio denominator) is at least 6e-4 away in every case, 300x TOL.
"""
import numpy as np
import paddle
import pytest

from ppmoco import paddle_internals as internals
from ppmoco.engine.lars import LARS

from optimizer_cases import SHAPES, Params, backward, case, largest_difference, numpy_lars, run
from optional_deps import torch_or_skip

SETTINGS = {"momentum": 0.9, "weight_decay": 0.1, "trust_coefficient": 0.01}
TOL = 2e-6
SEEDS = range(5)


def torch_lars(start, grads, lrs, momentum, weight_decay, trust_coefficient):
    """moco-v3's LARS step, written in PyTorch from its formula (float32), at the rates `lrs`."""
    torch = torch_or_skip()
    params = {k: torch.tensor(v) for k, v in start.items()}
    mu = {k: torch.zeros_like(v) for k, v in params.items()}
    for g, lr in zip(grads, lrs):
        for k, p in params.items():
            dp = torch.tensor(g[k])
            if p.ndim > 1:
                dp = dp.add(p, alpha=weight_decay)
                param_norm, update_norm = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(param_norm)
                dp = dp.mul(torch.where(param_norm > 0, torch.where(update_norm > 0, trust_coefficient * param_norm
                                                                    / update_norm, one), one))
            mu[k].mul_(momentum).add_(dp)
            p.add_(mu[k], alpha=-lr)
    return {k: p.numpy() for k, p in params.items()}


# Catches: the rate kept inside the velocity (v = m v + lr d; p -= v: other steps once the rate
# changes), Paddle's trust ratio (||g|| + wd ||p|| below), biases and norms scaled and decayed, and
# any slip in the formula: each of these is computed in NumPy and must be far outside TOL.
@pytest.mark.parametrize("seed", SEEDS)
def test_lars_is_moco_v3s_formula_at_a_changing_rate(seed):
    start, grads, lrs = case(seed)
    expected = numpy_lars(start, grads, lrs, **SETTINGS)
    assert largest_difference(run(dict(name="LARS", **SETTINGS), start, grads, lrs), expected) < TOL
    for mutation in ("lr inside the velocity", "Paddle's denominator ||g|| + wd ||p||",
                     "1-D parameters scaled and decayed"):
        assert largest_difference(numpy_lars(start, grads, lrs, mutation=mutation, **SETTINGS), expected) > 100 * TOL


# Catches the same as above, against an independent float32 implementation of moco-v3's step.
@pytest.mark.parametrize("seed", SEEDS)
def test_lars_equals_moco_v3s_optimizer_written_in_pytorch(seed):
    start, grads, lrs = case(seed)
    reference = torch_lars(start, grads, lrs, **SETTINGS)
    assert largest_difference(run(dict(name="LARS", **SETTINGS), start, grads, lrs), reference) < TOL


def test_paddles_own_lars_computes_another_update():
    # Why ppmoco has its own: Paddle's LarsMomentumOptimizer on the same case is far from moco-v3's
    # (rate inside its velocity, another trust ratio, biases scaled). Catches: ppmoco's LARS replaced
    # by Paddle's.
    from paddle.incubate.optimizer import LarsMomentumOptimizer

    start, grads, lrs = case(0)
    net = Params(start)
    opt = LarsMomentumOptimizer(learning_rate=lrs[0], momentum=0.9, lars_coeff=SETTINGS["trust_coefficient"],
                                lars_weight_decay=SETTINGS["weight_decay"], parameter_list=net.parameters())
    for g, lr in zip(grads, lrs):
        opt.set_lr(lr)
        backward(net, g)
        opt.step()
        opt.clear_grad()
    paddles = {k: getattr(net, k).numpy() for k in SHAPES}
    assert largest_difference(paddles, numpy_lars(start, grads, lrs, **SETTINGS)) > 1e-3


def test_a_zero_update_norm_takes_trust_ratio_one_and_no_nan():
    # ||p|| > 0 but ||g + wd p|| = 0 (no gradient, no decay): the step must be the plain momentum step
    # of a zero update, not 0/0. Catches: the ratio computed without its guard (NaN weights).
    start, _, _ = case(1)
    grads = [{k: np.zeros(s, "float32") for k, s in SHAPES.items()}]
    out = run(dict(name="LARS", momentum=0.9, weight_decay=0.0, trust_coefficient=0.01), start, grads, [0.1])
    for k in SHAPES:
        np.testing.assert_array_equal(out[k], start[k], err_msg=k)


def test_lars_under_o2_updates_the_float32_master_weights():
    # What paddle.amp.decorate(level="O2") sets up on a GPU (it returns early on the CPU): bfloat16
    # parameters and multi_precision, so the update runs on float32 master weights. Catches: the
    # update run on the bfloat16 parameter (bfloat16's rounding would show in the masters) or the
    # parameter not given the master's new value.
    start, grads, lrs = case(2)
    net = Params(start)
    internals.o2_cast([net], "bfloat16")
    assert net.weight.dtype == paddle.bfloat16
    opt = LARS(lrs[0], net.trainable_parameters(), multi_precision=True, **SETTINGS)
    rounded = {k: getattr(net, k).astype("float32").numpy() for k in SHAPES}
    for g, lr in zip(grads, lrs):
        opt.set_lr(lr)
        sum((getattr(net, k).astype("float32") * paddle.to_tensor(v)).sum() for k, v in g.items()).backward()
        opt.step()
        opt.clear_grad()
    bf16_grads = [{k: paddle.to_tensor(v).astype("bfloat16").astype("float32").numpy() for k, v in g.items()}
                  for g in grads]
    masters = {n: opt.state_dict()["master_weights"][getattr(net, n).name].numpy() for n in SHAPES}
    assert largest_difference(masters, numpy_lars(rounded, bf16_grads, lrs, **SETTINGS)) < TOL
    for k in SHAPES:
        assert getattr(net, k).dtype == paddle.bfloat16
        np.testing.assert_array_equal(getattr(net, k).numpy(), paddle.to_tensor(masters[k]).astype("bfloat16").numpy())


# Catches: the trust ratio's norms taken with paddle.linalg.norm, whose float32 CPU sum drifts by 2e-3 at
# this size (ResNet-50's 2048x4096 projector weight): the ratio must match float64 to float32's rounding.
def test_the_trust_ratio_is_exact_at_resnet50s_projector_size():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2048, 4096)).astype("float32")
    g = (rng.standard_normal((2048, 4096)) * 1e-3).astype("float32")
    param = paddle.create_parameter(w.shape, "float32", default_initializer=paddle.nn.initializer.Assign(w))
    param.grad = paddle.to_tensor(g)
    opt = LARS(learning_rate=1.0, parameters=[param], momentum=0.0, weight_decay=0.0, trust_coefficient=1.0)
    opt.step()
    w64, g64 = w.astype("float64"), g.astype("float64")
    expected = w64 - np.linalg.norm(w64) / np.linalg.norm(g64) * g64
    step = (w64 - param.numpy()) / (w64 - expected)  # the applied over the exact trust ratio, per entry
    assert abs(float(np.median(step)) - 1.0) < 1e-5
