"""The eager training step at a standard ResNet-18 MoCo v2 setup: bfloat16 convolutions on ppmoco's
operator stay within bfloat16's rounding of float32, and Paddle's BatchNorm convention that the
PyTorch reference follows (tests/torch_moco_reference.py). The step's equality with PyTorch is
tests/engine/test_moco_reference.py's."""
import numpy as np
import paddle
import pytest

from ppmoco.engine.step import TrainStep, build_optimizer
from ppmoco.fast_path import cpu_info, has_bfloat16_units

from moco_equivalence import Setup

OPT = {"momentum": 0.9, "weight_decay": 1e-4}
NO_AMP = {"enable": False}


def losses(conv, conv_dtype):
    setup = Setup(batch=8, steps=2)
    moco = setup.moco()
    step = TrainStep(moco, build_optimizer(OPT, moco, setup.lr), NO_AMP, conv=conv, conv_dtype=conv_dtype)
    paddle.seed(123)
    return [float(step([paddle.to_tensor(v) for v in views])["loss"]) for views in setup.views()]


@pytest.mark.skipif(not has_bfloat16_units(cpu_info()), reason="the CPU has no bfloat16 units")
def test_bfloat16_convolutions_train_close_to_float32():
    float32, bfloat16 = losses("onednn", "float32"), losses("onednn", "bfloat16")
    # bfloat16 moves the losses off float32's by its rounding (0.2-0.4% here), no more. Catches:
    # bfloat16 dropped on the way (equal losses); tests/ops checks the arithmetic itself.
    assert not np.array_equal(bfloat16, float32)
    np.testing.assert_allclose(bfloat16, float32, rtol=1e-2)


def test_paddle_batchnorm_updates_the_running_variance_with_the_biased_batch_variance():
    """The one convention in which ppmoco's BN differs from PyTorch's (docs/differences.md)."""
    bn = paddle.nn.BatchNorm2D(3, momentum=0.9)
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype("float32")
    bn(paddle.to_tensor(x))
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 + 0.1 * x.var(axis=(0, 2, 3)), rtol=1e-5)
