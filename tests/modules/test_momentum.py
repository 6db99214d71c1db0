"""momentum_update against NumPy: target <- m * target + (1 - m) * online, in place, no gradient."""
import numpy as np
import paddle

from ppmoco.modules.momentum import momentum_update


def test_moves_each_target_towards_its_online_tensor():
    # Catches swapped roles (target <- m * online + (1 - m) * target): m = 0.75 is not symmetric.
    rng = np.random.default_rng(0)
    online = [rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (5,))]
    target = [rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (5,))]
    pairs = [(paddle.to_tensor(o), paddle.to_tensor(t)) for o, t in zip(online, target)]
    momentum_update(pairs, 0.75)
    for (o_tensor, t_tensor), o, t in zip(pairs, online, target):
        np.testing.assert_allclose(t_tensor.numpy(), 0.75 * t + 0.25 * o, rtol=1e-6)
        np.testing.assert_array_equal(o_tensor.numpy(), o)  # the online side is only read


def test_writes_into_the_targets_own_storage():
    # Catches an update that rebinds or returns new tensors: the optimizer and the state dict hold
    # the original tensor objects, so only an in-place write reaches them.
    layer = paddle.nn.Linear(2, 2)
    target = layer.weight
    before = target.numpy().copy()
    momentum_update([(paddle.zeros([2, 2]), target)], 0.5)
    np.testing.assert_allclose(layer.state_dict()["weight"].numpy(), 0.5 * before, rtol=1e-6)


def test_records_no_gradient():
    # Catches a missing no_grad: the target would join the online tensor's autograd graph.
    online = paddle.to_tensor(np.ones((2, 2), np.float32), stop_gradient=False)
    target = paddle.to_tensor(np.zeros((2, 2), np.float32))
    momentum_update([(online, target)], 0.9)
    assert target.stop_gradient
    np.testing.assert_allclose(target.numpy(), np.full((2, 2), 0.1), rtol=1e-6)


def test_extreme_momenta():
    # Catches m and 1 - m swapped at the ends: m = 1 freezes the target, m = 0 copies online.
    online, frozen, copied = paddle.full([3], 2.0), paddle.full([3], 5.0), paddle.full([3], 5.0)
    momentum_update([(online, frozen)], 1.0)
    momentum_update([(online, copied)], 0.0)
    assert frozen.numpy().tolist() == [5.0] * 3 and copied.numpy().tolist() == [2.0] * 3
