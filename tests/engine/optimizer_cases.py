"""Shared by the optimizer tests: parameters with given values and gradients, runs of ppmoco's
optimizers over them at a changing learning rate, and each optimizer's update written out in NumPy
(float64) from its published formula.

Imported as a plain module (tests have no __init__.py; pytest puts this folder on sys.path).
"""
import numpy as np
import paddle

from ppmoco.modules.base import Module
from ppmoco.optimizers import build_optimizer

# A weight (2-D, decayed and, under LARS, scaled by the trust ratio), a bias (1-D: under LARS neither)
# and a 2-D parameter that starts at zero (LARS's ||p|| = 0 branch: trust ratio 1).
SHAPES = {"weight": [8, 6], "bias": [8], "zero": [3, 4]}
STEPS = 6


class Params(Module):
    """Module whose parameters are `start`'s arrays, under the same names."""

    def __init__(self, start):
        super().__init__()
        for name, value in start.items():
            setattr(self, name, self.create_parameter(list(value.shape),
                                                      default_initializer=paddle.nn.initializer.Assign(value)))


def case(seed, scale=1.0, steps=STEPS):
    """(start values, per-step gradients, per-step learning rates): the rate rises every step, as in a
    warmup, where an optimizer that keeps the rate inside its velocity computes other steps."""
    rng = np.random.default_rng(seed)
    start = {k: rng.standard_normal(s).astype("float32") for k, s in SHAPES.items()}
    start["zero"][:] = 0
    grads = [{k: (scale * rng.standard_normal(s)).astype("float32") for k, s in SHAPES.items()} for _ in range(steps)]
    return start, grads, [0.1 * (i + 1) / steps for i in range(steps)]


def backward(net, grads):
    """Give each parameter the gradient `grads[name]` (the gradient of sum(p * g))."""
    sum((getattr(net, k) * paddle.to_tensor(g)).sum() for k, g in grads.items()).backward()


def run(cfg, start, grads, lrs):
    """ppmoco's optimizer `cfg` (an Optimizer section) over `grads` at rates `lrs`: the final values."""
    net = Params(start)
    opt = build_optimizer(cfg, net, lrs[0])
    for g, lr in zip(grads, lrs):
        opt.set_lr(lr)
        backward(net, g)
        opt.step()
        opt.clear_grad()
    return {k: getattr(net, k).numpy() for k in SHAPES}


def numpy_adamw(start, grads, lrs, beta1, beta2, epsilon, weight_decay, mutation=None):
    """torch.optim.AdamW's documented update in float64: p <- p (1 - lr wd); m, v the moving averages
    of g and g^2; p <- p - lr m^ / (sqrt(v^) + eps) with m^ = m / (1 - beta1^t), v^ = v / (1 - beta2^t).
    `mutation` computes a plausible wrong variant instead (the tests check they are told apart)."""
    p = {k: v.astype("float64") for k, v in start.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        for k in p:
            grad = g[k].astype("float64")
            if mutation == "L2 decay (Adam)":
                grad = grad + weight_decay * p[k]
            elif mutation == "decay without lr":
                p[k] = p[k] * (1 - weight_decay)
            else:
                p[k] = p[k] * (1 - lr * weight_decay)
            m[k] = beta1 * m[k] + (1 - beta1) * grad
            v2[k] = beta2 * v2[k] + (1 - beta2) * grad * grad
            c1, c2 = (1.0, 1.0) if mutation == "no bias correction" else (1 - beta1 ** t, 1 - beta2 ** t)
            if mutation == "epsilon inside the correction":
                p[k] = p[k] - lr / c1 * m[k] / (np.sqrt(v2[k]) + epsilon) * np.sqrt(c2)
            else:
                p[k] = p[k] - lr * (m[k] / c1) / (np.sqrt(v2[k] / c2) + epsilon)
    return p


def numpy_lars(start, grads, lrs, momentum, weight_decay, trust_coefficient, mutation=None):
    """moco-v3's LARS in float64: for p.ndim > 1, d = g + wd p, d *= tc ||p|| / ||d|| (1 where a norm is
    0); for 1-D p, d = g; mu = momentum mu + d; p -= lr mu. `mutation` computes a wrong variant."""
    p = {k: v.astype("float64") for k, v in start.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    for g, lr in zip(grads, lrs):
        for k in p:
            d = g[k].astype("float64")
            if p[k].ndim > 1 or mutation == "1-D parameters scaled and decayed":
                grad_norm = np.linalg.norm(d)
                d = d + weight_decay * p[k]
                p_norm, d_norm = np.linalg.norm(p[k]), np.linalg.norm(d)
                if mutation == "Paddle's denominator ||g|| + wd ||p||":
                    d_norm = grad_norm + weight_decay * p_norm
                d = d * (trust_coefficient * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0)
            if mutation == "lr inside the velocity":
                mu[k] = momentum * mu[k] + lr * d
                p[k] = p[k] - mu[k]
            else:
                mu[k] = momentum * mu[k] + d
                p[k] = p[k] - lr * mu[k]
    return p


def largest_difference(a, b):
    """The largest absolute difference between two {name: array} over all names."""
    return max(float(np.abs(np.asarray(a[k], "float64") - np.asarray(b[k], "float64")).max()) for k in a)
