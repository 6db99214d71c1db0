import numpy as np
import paddle
import pytest

from ppmoco.engine.step import build_optimizer


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
