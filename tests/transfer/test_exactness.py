"""The converted ResNet-50 computes what ppmoco's does, in PyTorch and in paddle.vision, and
converting back gives every tensor bit for bit.

PyTorch: tests/torch_moco_reference.py's ResNet stands in for torchvision.models.resnet50, whose
wheel (CUDA-only on PyPI) does not import next to the CPU torch here. Its names are checked against
the key list dumped from torchvision 0.28.0's real class (reference_keys/torchvision.json), so a
strict load into it is a strict load into torchvision's.
"""
import numpy as np
import paddle
import paddle.vision.models as pvm
import pytest

from ppmoco.models.pretrained import read_backbone
from ppmoco.transfer import convert

from optional_deps import torch_or_skip
from transfer_helpers import reference_keys, shapes, without_classifier

FEATURE_TOLERANCE = 1e-4  # float32 features of two frameworks' kernels (measured: see the test)


def read_ppmoco(path):
    return read_backbone(path, "test").tensors


def assert_bit_identical(tensors, expected):
    assert list(tensors) == list(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and tensors[key].tobytes() == value.tobytes(), key


@pytest.fixture(scope="module")
def torchvision_file(r50, tmp_path_factory):
    torch_or_skip()
    path = str(tmp_path_factory.mktemp("tv") / "r50.pth")
    convert(r50.checkpoint, path, "torchvision")
    return path


@pytest.fixture(scope="module")
def paddle_vision_file(r50, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pv") / "r50.pdparams")
    convert(r50.checkpoint, path, "paddle-vision")
    return path


def torchvision_resnet50():
    """torchvision.models.resnet50() with `fc = Identity()`, as a fine-tuner strips the classifier."""
    import torch

    from torch_moco_reference import ResNet

    net = ResNet("resnet50", (64, 128, 256, 512), cifar_stem=False, hidden_dim=None, dim=1000)
    net.fc = torch.nn.Identity()
    return net


def test_torchvision_stand_in_has_torchvisions_names():
    # catches: a stand-in whose names differ from torchvision's (then a strict load here proves nothing there)
    reference = without_classifier(reference_keys("torchvision", "resnet50()"))
    assert shapes({k: v.numpy() for k, v in torchvision_resnet50().state_dict().items()}) == reference


def test_torchvision_file_loads_strictly_and_computes_ppmocos_features(r50, torchvision_file):
    import torch

    net = torchvision_resnet50()
    net.load_state_dict(torch.load(torchvision_file), strict=True)
    net.eval()
    with torch.no_grad():
        features = net(torch.tensor(r50.images)).numpy()
    # catches: BN running_var from _mean, weight/bias swapped, a conv's weight on another conv, the key
    # encoder's weights instead of the query encoder's. Measured: 3.5e-6 on features up to 1.9 (each
    # framework is 3e-6 from a float64 forward of the same network).
    assert np.abs(features - r50.features).max() <= FEATURE_TOLERANCE
    assert np.abs(r50.features).max() > 0.5  # non-trivial features (a dead network would pass any tolerance)


def test_ppmoco_torchvision_ppmoco_round_trip_is_bit_identical(r50, torchvision_file):
    # catches: a dtype change (float64, float16), a transposed or reshaped tensor, a lost tensor
    assert_bit_identical(read_ppmoco(torchvision_file), r50.tensors)


def test_ppmoco_paddle_vision_ppmoco_round_trip_is_bit_identical(r50, paddle_vision_file):
    assert_bit_identical(read_ppmoco(paddle_vision_file), r50.tensors)


def test_paddle_vision_file_loads_strictly_and_computes_ppmocos_features(r50, paddle_vision_file):
    net = pvm.resnet50(num_classes=0)
    missing, unexpected = net.set_state_dict(paddle.load(paddle_vision_file))
    # catches: names paddle.vision does not have (its set_state_dict only warns about them)
    assert missing == [] and unexpected == []
    net.eval()
    with paddle.no_grad():
        features = net(paddle.to_tensor(r50.images)).flatten(1).numpy()
    # the same kernels in the same framework: measured identical; avg-pooling vs mean may differ in the last bit
    assert np.abs(features - r50.features).max() <= 1e-6
