"""`from ppmoco import load_backbone`: a network ready to fine-tune, its weights all or nothing, and
docs/transfer_export.md's fine-tuning snippet as written."""
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import paddle.vision.models as pvm
import pytest

from ppmoco import load_backbone
from ppmoco.errors import CheckpointError
from ppmoco.models.resnet import Architecture, ResNet

from transfer_helpers import random_tensors

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def save_lincls(path, tensors):
    """A ppmoco linear-classifier checkpoint: the backbone under `backbone.`, plus its classifier."""
    state = {f"backbone.{k}": v for k, v in tensors.items()}
    state["fc.weight"] = np.zeros([8, 10], "float32")
    paddle.save(state, str(path))


def assert_holds(net, tensors):
    state = net.state_dict()
    assert list(state) == list(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)


def test_published_architecture_is_a_paddle_vision_resnet(tmp_path):
    tensors = random_tensors(Architecture("resnet18"), seed=1)
    save_lincls(tmp_path / "lincls.pdparams", tensors)
    net = load_backbone(str(tmp_path / "lincls"))
    # catches: ppmoco's ResNet returned for a standard file, a classifier left on, weights not loaded
    assert type(net) is pvm.ResNet and net.num_classes == 0
    assert_holds(net, tensors)
    net.eval()
    assert net(paddle.randn([2, 3, 64, 64])).shape == [2, 512, 1, 1]


def test_other_widths_and_stem_give_ppmocos_resnet(tmp_path):
    arch = Architecture("resnet50", widths=(4, 8, 8, 16), cifar_stem=True)
    tensors = random_tensors(arch, seed=2)
    paddle.save(tensors, str(tmp_path / "narrow.pdparams"))
    net = load_backbone(str(tmp_path / "narrow.pdparams"))
    # catches: paddle.vision's ResNet built for widths it cannot hold (its load would fail or be partial)
    assert type(net) is ResNet and net.maxpool is None
    assert_holds(net, tensors)
    net.eval()
    assert net(paddle.randn([2, 3, 32, 32])).shape == [2, 64]


def test_an_incomplete_file_returns_no_network(tmp_path):
    tensors = random_tensors(Architecture("resnet18"), seed=3)
    del tensors["layer2.0.downsample.1._variance"]
    paddle.save(tensors, str(tmp_path / "partial.pdparams"))
    # catches: a partial load handing back a network with one random BatchNorm
    with pytest.raises(CheckpointError, match=r"load_backbone: .* is not a complete ResNet-18: missing: "
                                              r"layer2\.0\.downsample\.1\._variance"):
        load_backbone(str(tmp_path / "partial.pdparams"))


def test_import_ppmoco_does_not_import_paddle():
    code = ("import sys, ppmoco; assert 'paddle' not in sys.modules, 'paddle imported by ppmoco'; "
            "from ppmoco import load_backbone; assert 'paddle' in sys.modules; "
            "assert load_backbone.__module__ == 'ppmoco.models.pretrained'; "
            "missing = getattr(ppmoco, 'no_such_name', 'absent'); assert missing == 'absent'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # catches: an eager import in ppmoco/__init__.py (the tools must set Paddle's environment first)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_docs_fine_tuning_snippet_runs_and_trains(r50, tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "docs", "transfer_export.md"), encoding="utf-8") as f:
        snippets = [code for code in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "load_backbone" in code]
    assert len(snippets) == 1
    folder = tmp_path / "output" / "mocov2_pt_in1k_1n8c" / "epoch_200"  # the path the snippet names
    folder.mkdir(parents=True)
    os.link(r50.checkpoint, folder / "model.pdparams")
    monkeypatch.chdir(tmp_path)
    namespace = {}

    def loader():  # runs when the snippet's loop starts: the backbone must hold the checkpoint then
        assert_holds(namespace["backbone"], r50.tensors)
        yield paddle.to_tensor(r50.images[:, :, :64, :64]), paddle.to_tensor([[3], [7]])

    namespace["loader"] = loader()
    exec(compile(snippets[0], "docs/transfer_export.md", "exec"), namespace)
    # catches: a snippet that does not run, loads nothing, or whose optimizer does not reach the backbone
    assert type(namespace["backbone"]) is pvm.ResNet
    conv1 = namespace["backbone"].state_dict()["conv1.weight"].numpy()
    assert not np.array_equal(conv1, r50.tensors["conv1.weight"])
