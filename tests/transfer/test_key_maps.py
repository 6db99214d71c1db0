"""Each format's names and shapes, for every depth it holds, against the real frameworks' classes.

References: reference_keys/*.json, dumped from torchvision 0.28.0, PaddleClas 2.6.0 and
PaddleDetection 2.6.0 (release and file named in each); paddle.vision's own classes; for
detectron2, the renaming rules of facebookresearch/moco's converter applied to torchvision names.
"""
import numpy as np
import paddle
import paddle.vision.models as pvm
import pytest

from ppmoco.errors import CheckpointError
from ppmoco.models.resnet import ARCHS, Architecture
from ppmoco.transfer import FORMATS

from transfer_helpers import placeholder_tensors, reference_keys, shapes, without_classifier

DEPTHS = list(ARCHS)
# PaddleClas's model with the standard first block, per depth (the default ResNet18/34 add a shortcut)
PADDLECLAS_MODEL = {"resnet18": "ResNet18(use_first_short_conv=False)",
                    "resnet34": "ResNet34(use_first_short_conv=False)",
                    "resnet50": "ResNet50()", "resnet101": "ResNet101()"}


def converted(fmt, name, **arch):
    arch = Architecture(name, **arch)
    tensors = placeholder_tensors(arch)
    return FORMATS[fmt].convert(tensors, arch), tensors


def torch_named(ppmoco_key):
    """ppmoco (paddle.vision) name -> torchvision's: only BatchNorm statistics are named differently."""
    return ppmoco_key.replace("._mean", ".running_mean").replace("._variance", ".running_var")


def moco_detectron2_name(key):
    """A torchvision name as facebookresearch/moco's detection/convert-pretrain-to-detectron2.py
    (at 132aea9) renames it: every key outside the stages goes to the stem, layerN to res(N+1),
    bnK to convK.norm, downsample.0/1 to shortcut / shortcut.norm."""
    if "layer" not in key:
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for conv in (1, 2, 3):
        key = key.replace(f"bn{conv}", f"conv{conv}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


@pytest.mark.parametrize("name", DEPTHS)
def test_torchvision_names_are_torchvisions(name):
    out, tensors = converted("torchvision", name)
    # catches: running_var filled from _mean, BN weight and bias swapped, downsample.0/1 crossed
    assert all(out[torch_named(key)] is value for key, value in tensors.items())
    # catches: a missing num_batches_tracked (torch's strict load fails), Paddle's _mean kept, any renamed module
    assert shapes(out) == without_classifier(reference_keys("torchvision", f"{name}()"))
    assert out["bn1.num_batches_tracked"].dtype == np.int64 and out["bn1.num_batches_tracked"].shape == ()


def test_torchvision_holds_narrow_widths_and_the_cifar_stem():
    out, tensors = converted("torchvision", "resnet18", widths=(4, 8, 8, 16), cifar_stem=True)
    counters = {k.replace("running_var", "num_batches_tracked"): [] for k in map(torch_named, tensors)
                if k.endswith("running_var")}
    # catches: a key map that assumes the published widths or the 7x7 stem
    assert shapes(out) == dict({torch_named(k): list(v.shape) for k, v in tensors.items()}, **counters)
    assert list(out["conv1.weight"].shape) == [4, 3, 3, 3]


@pytest.mark.parametrize("name", DEPTHS)
def test_detectron2_names_are_mocos_converter_output(name):
    arch = Architecture(name)
    tensors = placeholder_tensors(arch)
    d2, tv = (FORMATS[fmt].convert(tensors, arch) for fmt in ("detectron2", "torchvision"))
    expected = {moco_detectron2_name(k): v for k, v in tv.items()}
    # catches: downsample.1 mapped to shortcut instead of shortcut.norm, a stem outside `stem.`,
    # layer1 called res1, the counters dropped (MoCo's files keep them)
    assert list(d2) == list(expected)
    for key, value in expected.items():
        if value.ndim:  # catches: running_mean and running_var crossed (each must be torchvision's array)
            assert d2[key] is value, key
        else:  # num_batches_tracked
            assert d2[key] == value == 0, key


@pytest.mark.parametrize("name", DEPTHS)
def test_paddle_vision_names_are_paddle_visions(name):
    out, _ = converted("paddle-vision", name)
    with paddle.LazyGuard():
        reference = getattr(pvm, name)(num_classes=0).state_dict()
    # catches: a map that drifts from paddle.vision's names (the ones ppmoco reads back)
    assert shapes(out) == shapes(reference)


@pytest.mark.parametrize("name", DEPTHS)
def test_paddleclas_names_are_paddleclas(name):
    out, _ = converted("paddleclas", name)
    # catches: a per-stage instead of flat block index, conv0..2 numbered from 1, bn vs norm
    assert shapes(out) == without_classifier(reference_keys("paddleclas", PADDLECLAS_MODEL[name]))


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_paddleclas_default_basic_resnets_differ_by_the_first_blocks_shortcut_only(name):
    """Why configs/transfer/ tells ResNet18/34 users to set use_first_short_conv: False."""
    model = f"ResNet{name[len('resnet'):]}()"
    default = without_classifier(reference_keys("paddleclas", model))
    out, _ = converted("paddleclas", name)
    assert sorted(set(default) - set(out)) == [f"blocks.0.short.{t}" for t in
                                              ("bn._mean", "bn._variance", "bn.bias", "bn.weight", "conv.weight")]
    assert set(out) <= set(default)


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_paddledet_names_are_paddledets(name):
    out, _ = converted("paddledet", name)
    depth = name[len("resnet"):]
    # catches: ResNet-101's res4 blocks lettered (res4w) instead of res4b1..res4b22, branch2a..c off by one
    assert shapes(out) == reference_keys("paddledet", f"ResNet(depth={depth})")


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_paddledet_refuses_basic_resnets_whose_first_block_it_gives_a_shortcut(name):
    depth = name[len("resnet"):]
    reference = reference_keys("paddledet", f"ResNet(depth={depth})")
    # The fact behind the refusal: PaddleDetection's block res2a projects 64 -> 64, ppmoco's has no projection.
    assert reference["res2.res2a.short.conv.weight"] == [64, 64, 1, 1]
    assert "layer1.0.downsample.0.weight" not in placeholder_tensors(Architecture(name))
    with pytest.raises(CheckpointError, match="res2a a 64->64 projection shortcut"):
        FORMATS["paddledet"].check(Architecture(name), "SRC")


@pytest.mark.parametrize("fmt", ["detectron2", "paddle-vision", "paddleclas", "paddledet"])
@pytest.mark.parametrize("arch", [dict(widths=(32, 64, 128, 256)), dict(cifar_stem=True)])
def test_published_only_formats_refuse_other_widths_and_the_cifar_stem(fmt, arch):
    # catches: a file the framework's ResNet would fail to load, or load partly
    with pytest.raises(CheckpointError, match=f"--to {fmt}: SRC is a ResNet-50 .* widths \\[64, 128, 256, 512\\] "
                                              "and the 7x7 ImageNet stem only"):
        FORMATS[fmt].check(Architecture("resnet50", **arch), "SRC")
