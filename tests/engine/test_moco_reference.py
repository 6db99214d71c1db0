"""ppmoco's eager MoCo step, with ppmoco's oneDNN convolution and with Paddle's (Engine.conv), equals
an independent PyTorch step.

The reference (tests/torch_moco_reference.py) is written from facebookresearch/moco builder.py.
Each configuration runs 3 steps, each from the float64 reference's own state (tests/moco_equivalence.py
says why), with standard widths and real head sizes. Tolerances are set from float32's own spread,
measured in the same test: a float32 PyTorch step compared with the float64 one the same way.
- loss (relative) and queue (absolute): 1e-4; measured below 2e-5 for float32 PyTorch and ppmoco;
- the relative error of every tensor's update (weights, BN statistics, key encoder, momentum
  buffers excluded): the 90th percentile within 4x float32's + 1e-2 and the worst within
  4x float32's + 5e-2. Float32 flips a ReLU here and there, so single tensors of the stem or of the
  key encoder (its update (1-m)(q-k) cancels) reach 0.05-0.2 for every float32 implementation; a
  oneDNN in-place add fault (a residual sum overwriting an input its backward reads) gave a 90th
  percentile of 0.7 and a worst tensor of 2.
"""
import numpy as np
import pytest

from moco_equivalence import Setup, compare
from optional_deps import torch_or_skip

torch_or_skip()

SETUPS = {
    # The urgent issue's setup: ImageNet stem at 64 px (2x2 maps in the last stage), v2 head 512-256-128.
    "r18_imagenet_stem_64px_v2": Setup(),
    # The r18c_32 benchmark model (CIFAR stem, default widths, head 512-512-128), with two BN groups
    # so that the key batch's shuffle changes the statistics each key is normalised with.
    "r18_cifar_stem_32px_v2_bn_splits_2": Setup(cifar_stem=True, px=32, hidden_dim=512, bn_splits=2),
    "r18_imagenet_stem_64px_v1": Setup(hidden_dim=None),
    # Bottleneck blocks with the v2 head; the v1 head is covered on ResNet-18 (a ResNet-50 v1 case
    # cost a minute of CI for no axis the others miss).
    "r50_imagenet_stem_64px_v2": Setup(arch="resnet50", hidden_dim=2048),
    # The batch that crashed oneDNN's add_grad natively.
    "r18_imagenet_stem_64px_batch_1": Setup(batch=1),
}


@pytest.fixture(scope="module")
def float32_spread():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = compare(SETUPS[name], "float32")
        return cache[name]
    return get


def _quantiles(step):
    values = np.array(list(step["updates"].values()))
    return np.quantile(values, 0.9), values.max()


# Every setup with the convolutions CPU training uses by default (Engine.conv: auto: ppmoco's oneDNN
# operator) and with Paddle's (GPUs, Engine.conv: paddle).
CONVS = [(name, conv) for name in SETUPS for conv in ("onednn", "paddle")]


@pytest.mark.slow
@pytest.mark.parametrize("name,conv", CONVS)
def test_step_equals_the_pytorch_reference(name, conv, float32_spread):
    spread = float32_spread(name)
    for i, (own, f32) in enumerate(zip(compare(SETUPS[name], conv=conv), spread)):
        where = f"{name}, {conv} convolutions, step {i + 1}"
        assert own["loss"] <= 1e-4, f"{where}: loss off by {own['loss']:.2g} (relative)"
        assert own["queue"] <= 1e-4, f"{where}: queue off by {own['queue']:.2g}"
        assert own["queue_ptr"][0] == own["queue_ptr"][1], where
        p90, worst = _quantiles(own)
        p90_32, worst_32 = _quantiles(f32)
        worst_key = max(own["updates"], key=own["updates"].get)
        assert p90 <= 4 * p90_32 + 1e-2, f"{where}: 90% of updates within {p90:.2g} (float32: {p90_32:.2g})"
        assert worst <= 4 * worst_32 + 5e-2, (f"{where}: {worst_key} update off by {worst:.2g} "
                                              f"(float32 worst: {worst_32:.2g})")


def test_float32_is_well_conditioned_at_these_sizes(float32_spread):
    """The tolerances above lean on float32 itself staying close to float64 for these setups."""
    for name in ("r18_imagenet_stem_64px_v2", "r18_cifar_stem_32px_v2_bn_splits_2"):
        for step in float32_spread(name):
            assert step["loss"] < 1e-5 and step["queue"] < 1e-5
            assert np.median(list(step["updates"].values())) < 1e-4
