"""The frozen-backbone probes' sanity check (FrozenBackboneProbe.check_backbone_unchanged) under O2.

With `Engine.mix_precision: {enable: true, level: O2}` the Engine's step hands the probe to
`paddle.amp.decorate`, which on GPU casts the backbone's convolutions (and the classifier) to
float16/bfloat16 after the probe took its float32 snapshot. On CPU decorate casts nothing, so these
tests apply the same cast with paddle_internals.o2_cast (the function decorate calls on GPU). What only a
GPU exercises: decorate itself casting, and the cast kernel being a GPU one (the check casts its
snapshot where the tensor lives, so both sides are rounded by the same kernel there as here).
"""
import numpy as np
import paddle
import pytest

from ppmoco.modules.linear_eval import LinearEval
from ppmoco.modules.mhead_linear import MultiHeadLinearEval
from ppmoco.paddle_internals import o2_cast

TINY = {"name": "resnet18", "widths": [4, 8, 8, 16], "cifar_stem": True}
PROBES = {"linear": lambda: LinearEval(base_encoder=TINY, num_classes=3),
          "mhead": lambda: MultiHeadLinearEval(base_encoder=TINY, num_classes=3, layers=["feat2", "feat5"])}


def cast_probe(kind, dtype):
    paddle.seed(0)
    probe = PROBES[kind]()
    o2_cast(probe.low_precision_layers(), dtype)  # what decorate does to the Engine's module on GPU
    assert probe.backbone.conv1.weight.dtype == getattr(paddle, dtype), "the O2 cast reached the backbone"
    assert probe.backbone.bn1._mean.dtype == paddle.float32, "normalisation layers stay float32"
    return probe


def one_ulp_up(value, dtype):
    """The next `dtype` value above the (representable) positive float32 `value`, as float32."""
    if dtype == "float16":
        return np.float32(np.nextafter(np.float16(value), np.float16(np.inf)))
    bits = np.array([value], dtype=np.float32).view(np.uint32) + np.uint32(1 << 16)  # bfloat16: float32's top half
    return bits.view(np.float32)[0]


# Catches (reproduced before the fix: "backbone tensor conv1.weight changed during linear evaluation"):
# the float32 snapshot compared with the values O2 cast to float16 (rounded) or bfloat16 (whose
# numpy() gives its raw uint16 bits), which fails every O2 linear probe after its first epoch.
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["linear", "mhead"])
def test_the_backbone_check_passes_on_a_backbone_the_o2_cast_rounded(kind, dtype):
    probe = cast_probe(kind, dtype)
    probe.on_epoch_end(1)  # the Engine calls it after the first epoch; raises if it fails
    probe.check_backbone_unchanged()


# Catches a fix that stops checking what O2 cast: one that skips tensors not in float32 (mutation:
# `if value.dtype != paddle.float32: continue`) or compares them within a tolerance (mutation:
# np.allclose(..., rtol=1e-2)): a change of one unit in the last place of the cast dtype, in a
# convolution weight, must fail; so must a changed BatchNorm statistic (float32 under O2).
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["linear", "mhead"])
def test_the_backbone_check_still_fails_on_a_change_in_the_cast_dtype(kind, dtype):
    probe = cast_probe(kind, dtype)
    weight = probe.backbone.conv1.weight
    values = weight.astype("float32").numpy()
    flat = np.abs(values).reshape(-1)
    at = np.unravel_index(int(np.argmax(flat)), values.shape)
    changed = values.copy()
    changed[at] = np.sign(values[at]) * one_ulp_up(abs(values[at]), dtype)
    low = paddle.to_tensor(changed).astype(weight.dtype)
    assert np.array_equal(low.astype("float32").numpy(), changed), "the change is representable in the cast dtype"
    weight.set_value(low)
    with pytest.raises(RuntimeError, match="conv1.weight changed"):
        probe.check_backbone_unchanged()

    probe = cast_probe(kind, dtype)
    mean = probe.backbone.bn1._mean
    mean.set_value(mean + 1e-6)
    with pytest.raises(RuntimeError, match="bn1._mean changed"):
        probe.check_backbone_unchanged()
