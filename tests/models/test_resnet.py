import math

import numpy as np
import paddle
import paddle.vision.models as pvm
import pytest

from ppmoco.errors import ConfigError
from ppmoco.models import BACKBONES, ResNet, build_backbone
from ppmoco.models.resnet import BasicBlock, BottleneckBlock, resnet18, resnet50

NARROW = [8, 16, 32, 64]
KEY = "Model.model.base_encoder"


@pytest.mark.parametrize("ours, theirs", [(resnet18, pvm.resnet18), (resnet50, pvm.resnet50)])
def test_state_dict_matches_paddle_vision(ours, theirs):
    model, reference = ours(), theirs(num_classes=0)
    mine = {k: v.shape for k, v in model.state_dict().items()}
    ref = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert mine == ref
    missing, unexpected = model.set_state_dict(reference.state_dict())
    assert missing == [] and unexpected == []

    model.eval()
    reference.eval()
    x = paddle.randn([1, 3, 32, 32])
    np.testing.assert_allclose(model(x).numpy(), reference(x).flatten(1).numpy(), atol=1e-5)


def test_torchvision_style_names():
    keys = set(resnet50(widths=NARROW).state_dict())
    for key in ["conv1.weight", "bn1._mean", "bn1._variance", "layer1.0.conv3.weight",
                "layer1.0.bn3.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1._variance", "layer4.2.bn3.bias"]:
        assert key in keys
    assert not any(k.startswith("fc.") for k in keys)


@pytest.mark.parametrize("block, exp", [(BasicBlock, 1), (BottleneckBlock, 4)])
# The stem is taken before the max-pool (mmselfsup's; catches it taken after, at res2's size).
@pytest.mark.parametrize("cifar_stem, size, stem_size, res2_size", [(True, 32, 32, 32), (False, 64, 32, 16)])
def test_stage_shapes(block, exp, cifar_stem, size, stem_size, res2_size):
    model = ResNet(block, [1, 1, 1, 1], widths=NARROW, cifar_stem=cifar_stem)
    model.eval()
    x = paddle.randn([2, 3, size, size])
    stages = model.forward_stages(x)
    channels = [8, 8 * exp, 16 * exp, 32 * exp, 64 * exp]
    sizes = [stem_size, res2_size, res2_size // 2, res2_size // 4, res2_size // 8]
    assert [s.shape for s in stages] == [[2, c, h, h] for c, h in zip(channels, sizes)]
    assert model.stage_channels == channels
    assert model.out_dim == 64 * exp

    pooled = model(x)
    assert pooled.shape == [2, 64 * exp]
    np.testing.assert_allclose(pooled.numpy(), stages[-1].mean(axis=[2, 3]).numpy(), rtol=1e-6)


def test_stem_layers():
    cifar = resnet18(widths=NARROW, cifar_stem=True)
    imagenet = resnet18(widths=NARROW)
    assert cifar.conv1.weight.shape == [8, 3, 3, 3] and cifar.maxpool is None
    assert imagenet.conv1.weight.shape == [8, 3, 7, 7] and imagenet.maxpool is not None


def test_default_out_dims():
    assert resnet18().out_dim == 512
    assert resnet50().out_dim == 2048
    assert resnet50().stage_channels == [64, 256, 512, 1024, 2048]


def test_init_like_torchvision():
    model = resnet50()
    for name, layer in model.named_sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            assert (layer.weight.numpy() == 1).all() and (layer.bias.numpy() == 0).all(), name
            assert layer._momentum == 0.9 and layer._epsilon == 1e-5
        elif isinstance(layer, paddle.nn.Conv2D) and layer.weight.size > 50_000:
            out_ch, _, kh, kw = layer.weight.shape
            expected = math.sqrt(2.0 / (out_ch * kh * kw))
            assert abs(layer.weight.numpy().std() / expected - 1) < 0.05, name


def test_zero_init_residual():
    model = resnet50(widths=NARROW, zero_init_residual=True)
    for blocks in (model.layer1, model.layer4):
        for block in blocks:
            assert (block.bn3.weight.numpy() == 0).all()
            assert (block.bn1.weight.numpy() == 1).all()
    basic = resnet18(widths=NARROW, zero_init_residual=True)
    assert (basic.layer3[1].bn2.weight.numpy() == 0).all()


def test_registry_names():
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= set(BACKBONES.names())


def test_build_backbone_fleetx_config():
    cfg = {"name": "resnet18", "pretrained": "missing/file.pdparams", "widths": NARROW,
           "cifar_stem": True, "with_pool": False, "num_classes": 0}
    model = build_backbone(cfg, KEY)
    assert isinstance(model, ResNet) and model.out_dim == 64
    assert model.conv1.weight.shape == [8, 3, 3, 3]


def test_build_backbone_unknown_name():
    with pytest.raises(ConfigError, match="did you mean 'resnet50'"):
        build_backbone({"name": "resnet05"}, KEY)


def test_build_backbone_unknown_key():
    with pytest.raises(ConfigError, match=rf"{KEY}\.depth: unknown key"):
        build_backbone({"name": "resnet18", "depth": 18}, KEY)


def test_build_backbone_wrong_type():
    with pytest.raises(ConfigError, match=rf"{KEY}\.widths"):
        build_backbone({"name": "resnet18", "widths": 64}, KEY)


def test_build_backbone_rejects_classifier():
    with pytest.raises(ConfigError, match=rf"{KEY}\.num_classes: .*module/head"):
        build_backbone({"name": "resnet50", "num_classes": 1000}, KEY)


def test_build_backbone_needs_name():
    with pytest.raises(ConfigError, match="'name'"):
        build_backbone({"widths": NARROW}, KEY)


def test_build_backbone_needs_four_widths():
    with pytest.raises(ConfigError, match="4 stages"):
        build_backbone({"name": "resnet18", "widths": [8, 16, 32]}, KEY)
