import logging
import sys

import numpy as np
import paddle
import pytest

from ppmoco.errors import CheckpointError
from ppmoco.models import build_backbone, load_pretrained_backbone
from ppmoco.models.pretrained import BackboneWeights, infer_architecture
from ppmoco.models.resnet import ARCHS, Architecture
from ppmoco.modules.moco import MoCo

from optional_deps import torch_or_skip

TINY = {"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True}
KEY = "Model.model.base_encoder.pretrained"


def tiny(seed, **overrides):
    paddle.seed(seed)
    return build_backbone(dict(TINY, **overrides), "test")


def randomize(backbone, seed):
    """Random values everywhere, BN statistics included, so a default init cannot pass for a load."""
    rng = np.random.default_rng(seed)
    for name, tensor in backbone.state_dict().items():
        value = rng.standard_normal(tensor.shape).astype("float32")
        tensor.set_value(np.abs(value) + 0.5 if name.endswith("_variance") else value)
    return backbone


def numpy_state(layer, prefix=""):
    return {prefix + k: v.numpy() for k, v in layer.state_dict().items()}


@pytest.fixture
def source():
    return randomize(tiny(1), seed=1)


def assert_loaded(source, path):
    backbone = tiny(2)
    assert load_pretrained_backbone(backbone, path) == len(source.state_dict())
    expected = numpy_state(source)
    for name, value in numpy_state(backbone).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_ppmoco_moco_checkpoint_by_folder_and_suffixless_file(tmp_path, caplog):
    paddle.seed(3)
    moco = MoCo(base_encoder=TINY, projector={"hidden_dim": 16}, dim=8, K=16)
    randomize(moco.encoder_q.backbone, seed=3)
    folder = tmp_path / "epoch_1"
    folder.mkdir()
    paddle.save(moco.state_dict(), str(folder / "model.pdparams"))

    with caplog.at_level(logging.INFO, logger="ppmoco"):
        assert_loaded(moco.encoder_q.backbone, str(folder))
    assert "backbone tensors from" in caplog.text and "(ppmoco MoCo checkpoint)" in caplog.text
    assert_loaded(moco.encoder_q.backbone, str(folder / "model"))


def test_moco_starts_both_encoders_from_pretrained_weights_read_once(tmp_path, source, caplog):
    path = tmp_path / "r18.pdparams"
    paddle.save(source.state_dict(), str(path))
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        moco = MoCo(base_encoder=dict(TINY, pretrained=str(path)), projector={"hidden_dim": 16}, dim=8, K=16)
    assert caplog.text.count("backbone tensors from") == 1
    expected = numpy_state(source)
    for encoder in (moco.encoder_q, moco.encoder_k):
        for name, value in numpy_state(encoder.backbone).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_linear_classifier_checkpoint(tmp_path, source):
    state = numpy_state(source, "backbone.")
    state.update({"fc.weight": np.zeros([8, 10], "float32"), "fc.bias": np.zeros([10], "float32"),
                  "classifier.fc.weight": np.zeros([8, 10], "float32")})
    paddle.save(state, str(tmp_path / "lincls.pdparams"))
    assert_loaded(source, str(tmp_path / "lincls.pdparams"))


def test_fleetx_checkpoint(tmp_path, source):
    state = {**numpy_state(source, "base_encoder.0."),
             **numpy_state(randomize(tiny(4), seed=4), "momentum_encoder.0."),
             "base_encoder.1.mlp.0.weight": np.zeros([8, 16], "float32"),
             "base_encoder.2.fc.weight": np.zeros([16, 8], "float32"),
             "queue": np.zeros([8, 16], "float32"), "queue_ptr": np.zeros([1], "int64")}
    paddle.save(state, str(tmp_path / "mocov2_pt_imagenet2012_resnet50.pdparams"))
    assert_loaded(source, str(tmp_path / "mocov2_pt_imagenet2012_resnet50"))


def test_bare_paddle_vision_state_dict(tmp_path, source):
    state = dict(numpy_state(source), **{"fc.weight": np.zeros([8, 10], "float32"),
                                          "fc.bias": np.zeros([10], "float32")})
    paddle.save(state, str(tmp_path / "resnet18.pdparams"))
    assert_loaded(source, str(tmp_path / "resnet18.pdparams"))


def torch_names(state):
    """Paddle BN statistics under torchvision's names, plus the counter torch keeps."""
    out = {}
    for name, value in state.items():
        name = name.replace("._mean", ".running_mean").replace("._variance", ".running_var")
        out[name] = value
        if name.endswith(".running_var"):
            out[name.replace("running_var", "num_batches_tracked")] = np.array(5)
    return out


@pytest.mark.parametrize("legacy", [False, True])
def test_official_pytorch_moco_checkpoint(tmp_path, source, caplog, legacy):
    torch = torch_or_skip()
    state = {f"module.encoder_q.{k}": v for k, v in torch_names(numpy_state(source)).items()}
    state.update({f"module.encoder_k.{k}": v for k, v in torch_names(numpy_state(tiny(5))).items()})
    state.update({"module.encoder_q.fc.0.weight": np.zeros([16, 8], "float32"),
                  "module.encoder_q.fc.2.bias": np.zeros([8], "float32"),
                  "module.queue": np.zeros([8, 16], "float32"), "module.queue_ptr": np.zeros([1])})
    checkpoint = {"epoch": 200, "arch": "resnet50", "optimizer": {},
                  "state_dict": {k: torch.tensor(v) for k, v in state.items()}}
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save(checkpoint, str(path), _use_new_zipfile_serialization=not legacy)

    with caplog.at_level(logging.INFO, logger="ppmoco"):
        assert_loaded(source, str(path))
    assert "(PyTorch facebookresearch/moco checkpoint)" in caplog.text


def test_torchvision_state_dict(tmp_path, source):
    torch = torch_or_skip()
    state = dict(torch_names(numpy_state(source)), **{"fc.weight": np.zeros([10, 8], "float32")})
    torch.save({k: torch.tensor(v) for k, v in state.items()}, str(tmp_path / "r18.pth"))
    assert_loaded(source, str(tmp_path / "r18.pth"))


def test_pytorch_names_saved_by_paddle(tmp_path, source):
    """The conversion the no-torch hint suggests: the same keys as numpy arrays, via paddle.save."""
    state = {f"module.encoder_q.{k}": v for k, v in torch_names(numpy_state(source)).items()}
    paddle.save({"epoch": 200, "state_dict": state}, str(tmp_path / "converted.pdparams"))
    assert_loaded(source, str(tmp_path / "converted.pdparams"))


def test_missing_file_names_key_and_paths_tried(tmp_path):
    path = str(tmp_path / "pretrained" / "mocov2")
    with pytest.raises(CheckpointError) as err:
        load_pretrained_backbone(tiny(0), path)
    message = str(err.value)
    assert KEY in message and f"{path} or {path}.pdparams" in message and "null" in message


def test_folder_without_model_file(tmp_path):
    with pytest.raises(CheckpointError, match="model.pdparams"):
        load_pretrained_backbone(tiny(0), str(tmp_path))


def test_different_widths_is_a_shape_mismatch(tmp_path, source):
    paddle.save(numpy_state(source), str(tmp_path / "narrow.pdparams"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained_backbone(tiny(0, widths=[8, 8, 8, 8]), str(tmp_path / "narrow"))
    message = str(err.value)
    assert "shape mismatch: conv1.weight file [4, 3, 3, 3] vs model [8, 3, 3, 3]" in message
    assert "widths" in message and "\n" not in message


def test_missing_bn_statistic_is_named(tmp_path, source):
    state = numpy_state(source)
    del state["layer4.1.bn2._mean"]
    paddle.save(state, str(tmp_path / "partial.pdparams"))
    backbone = tiny(0)
    before = numpy_state(backbone)
    with pytest.raises(CheckpointError, match=r"missing: layer4\.1\.bn2\._mean"):
        load_pretrained_backbone(backbone, str(tmp_path / "partial.pdparams"))
    for name, value in numpy_state(backbone).items():
        np.testing.assert_array_equal(value, before[name])


def test_bigger_architecture_reports_unexpected_tensors(tmp_path):
    paddle.save(numpy_state(tiny(0, name="resnet34")), str(tmp_path / "r34.pdparams"))
    with pytest.raises(CheckpointError, match=r"unexpected: layer1\.2\.conv1\.weight, .* in all\)"):
        load_pretrained_backbone(tiny(0), str(tmp_path / "r34.pdparams"))


def test_unknown_layout_lists_keys_and_formats(tmp_path):
    paddle.save({"encoder.stem.weight": np.zeros([2], "float32")}, str(tmp_path / "odd.pdparams"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained_backbone(tiny(0), str(tmp_path / "odd.pdparams"))
    message = str(err.value)
    assert "encoder.stem.weight" in message and "PaddleFleetX MoCo checkpoint" in message


def test_unreadable_file(tmp_path):
    (tmp_path / "junk.pdparams").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pretrained_backbone(tiny(0), str(tmp_path / "junk.pdparams"))


def test_pytorch_file_without_torch_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "moco.pth").write_bytes(b"PK\x03\x04" + bytes(60))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="needs torch: pip install torch"):
        load_pretrained_backbone(tiny(0), str(tmp_path / "moco.pth"))


def placeholders(arch):
    """Every tensor of `arch` as zeros: inference reads names and shapes only."""
    with paddle.LazyGuard():
        return {k: np.zeros(v.shape, "float32") for k, v in arch.build().state_dict().items()}


OTHER_ARCHS = [Architecture("resnet50", (8, 16, 32, 64), cifar_stem=True), Architecture("resnet18", (4, 4, 8, 8))]


@pytest.mark.parametrize("arch", [Architecture(name) for name in ARCHS] + OTHER_ARCHS, ids=str)
def test_architecture_is_inferred_from_the_tensors_alone(arch):
    tensors = placeholders(arch)
    # catches: blocks counted in the wrong stage, widths read from a bottleneck's expanded conv3, the stem misread
    assert infer_architecture(BackboneWeights(tensors, "w.pdparams", "test"), KEY) == arch


def test_inferred_architecture_must_be_complete():
    tensors = placeholders(Architecture("resnet18"))
    tensors["layer2.0.conv1.weight"] = np.zeros([128, 64, 1, 1], "float32")
    with pytest.raises(CheckpointError, match=r"is not a complete ResNet-18: shape mismatch: layer2\.0\.conv1\.weight "
                                              r"file \[128, 64, 1, 1\] vs model \[128, 64, 3, 3\]"):
        infer_architecture(BackboneWeights(tensors, "w.pdparams", "test"), KEY)
