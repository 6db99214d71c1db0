"""--to timm: a ppmoco ViT as the state dict timm's VisionTransformer loads strictly, computing the same
features; the PyTorch ViT files ppmoco reads (moco-v3 checkpoints, timm state dicts); the refusals
between ResNets and ViTs.

The reference is timm's own class (the `test` extra pins timm). PyPI's torchvision wheel, which timm
imports, is CUDA-only; tests/optional_deps.py's `timm_vision_transformer` imports it beside the CPU
torch. Without timm the tests that need it skip, unless PPMOCO_REQUIRE_TORCH=1 (CI) makes that a
failure.
"""
import importlib.util
import os
import re
import sys

import numpy as np
import paddle
import pytest

from ppmoco.cli import run
from ppmoco.errors import ConfigError
from ppmoco.models import build_backbone, load_pretrained_backbone
from ppmoco.models.resnet import Architecture
from ppmoco.models.vit import read_vit_backbone
from ppmoco.transfer import FORMATS, convert

from optional_deps import timm_vision_transformer, torch_or_skip
from transfer_helpers import random_tensors
from vit_helpers import randomised

TOOL = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert.py"))

# The features of the converted ViT-S/16 in timm are compared with a float64 forward of the same timm
# network, within SPREAD_FACTOR x the distance of timm's own float32 forward from it. Measured at 224 px,
# batch 2, features up to 4.8: timm float32 2.2e-6 from float64, ppmoco (Paddle float32) 1.3e-6, so the
# bound (6.6e-6) leaves 5x; LayerNorm eps 1e-5 instead of 1e-6 moves ppmoco's by 1.7e-5.
SPREAD_FACTOR = 3


def convert_cli(argv, capsys):
    """tools/convert.py's main through ppmoco.cli.run, as the script runs it: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("convert_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    try:
        run(tool.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def randomised_vit(cfg, seed):
    """A ppmoco ViT with LayerNorm weights, biases and the class token far from their init (1, 0, ~0)."""
    paddle.seed(seed)
    return randomised(build_backbone(cfg, "test"), seed, spread=0.1)


def save_moco_checkpoint(net, path):
    """`net` as the query backbone of a ppmoco MoCo checkpoint whose key encoder, head and queue differ."""
    state = {f"encoder_q.backbone.{k}": v.numpy() for k, v in net.state_dict().items()}
    state.update({f"encoder_k.backbone.{k}": v.numpy() + 1.0 for k, v in net.state_dict().items()})
    state.update({"encoder_q.head.0.weight": np.ones((net.out_dim, 16), "float32"),
                  "queue": np.ones((16, 8), "float32")})
    paddle.save(state, path)
    return {k: v.numpy() for k, v in net.state_dict().items()}


def features(net, images):
    with paddle.no_grad():
        return net(paddle.to_tensor(images)).numpy()


def timm_from_usage(line):
    """The network the usage line's constructor call builds, in timm (H, the unknown heads, given as 4)."""
    call = re.search(r"net = (VisionTransformer\([^)]*\));", line).group(1)
    return eval(call.replace("num_heads=H", "num_heads=4"), {"VisionTransformer": timm_vision_transformer()})


@pytest.fixture(scope="module")
def vit_s16(tmp_path_factory):
    """ViT-S/16 at 224 px converted to timm from a ppmoco MoCo checkpoint: (tensors, features, images, file, lines)."""
    timm_vision_transformer()
    folder = tmp_path_factory.mktemp("vit_s16")
    net = randomised_vit({"name": "vit_small"}, seed=16)
    tensors = save_moco_checkpoint(net, str(folder / "moco.pdparams"))
    images = np.random.default_rng(7).standard_normal((2, 3, 224, 224)).astype("float32")
    dst = str(folder / "vit_small_timm.pth")
    lines = convert(str(folder / "moco.pdparams"), dst, "timm")
    return {"tensors": tensors, "features": features(net, images), "images": images, "file": dst, "lines": lines}


def test_vit_s16_loads_strictly_into_timm_and_computes_ppmocos_features(vit_s16):
    # Catches: a Linear weight not transposed (attn.proj and the qkv of a square ViT would still load), the
    # qkv split order or attention scale unlike timm's, LayerNorm eps 1e-5, GELU's tanh approximation, the
    # key encoder's weights written, a usage line whose constructor call does not build the loading network.
    import torch

    assert vit_s16["lines"][0].endswith("from " + vit_s16["file"].replace("vit_small_timm.pth", "moco.pdparams")
                                        + " (ppmoco MoCo checkpoint): a ViT-16 (embed_dim 384, depth 12) at 224 px, "
                                        "vit_small's shape")
    assert ("VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12, num_classes=0)"
            in vit_s16["lines"][1])
    net = timm_from_usage(vit_s16["lines"][1])
    assert net.global_pool == "token" and net.cls_token is not None and net.blocks[0].norm1.eps == 1e-6
    net.load_state_dict(torch.load(vit_s16["file"], weights_only=True), strict=True)
    net.eval()
    with torch.no_grad():
        timm32 = net(torch.tensor(vit_s16["images"])).numpy()
        timm64 = net.double()(torch.tensor(vit_s16["images"], dtype=torch.float64)).numpy()
    spread = np.abs(timm32 - timm64).max()
    assert 0 < spread < 1e-4 and np.abs(timm64).max() > 1  # a live network, features of a trained one's scale
    assert np.abs(vit_s16["features"] - timm64).max() <= SPREAD_FACTOR * spread
    assert np.abs(vit_s16["features"] - timm32).max() <= SPREAD_FACTOR * spread


def test_timm_file_reads_back_bit_identical(vit_s16):
    # Catches: a dtype change, a tensor transposed one way only (Linear weights) or one that is not a Linear's
    # (the conv's, the class token's, the position embedding's), a lost tensor.
    weights = read_vit_backbone(vit_s16["file"], "test")
    assert weights.source == "PyTorch ViT state_dict"
    assert sorted(weights.tensors) == sorted(vit_s16["tensors"])
    for name, value in vit_s16["tensors"].items():
        assert weights.tensors[name].dtype == value.dtype and weights.tensors[name].tobytes() == value.tobytes(), name


def test_unregistered_shape_converts_with_its_mlp_ratio_and_heads_left_to_the_user(tmp_path, capsys):
    # Catches: an MLP width or image size not read from the tensors, a heads count guessed for a shape that is
    # no registered backbone's.
    torch = torch_or_skip()
    net = randomised_vit({"name": "vit_mini", "mlp_ratio": 2.0, "image_size": 32}, seed=2)
    save_moco_checkpoint(net, str(tmp_path / "mini.pdparams"))
    code, out, err = convert_cli([str(tmp_path / "mini.pdparams"), str(tmp_path / "mini.pth"), "--to", "timm"], capsys)
    assert code == 0, err
    first, usage = out.splitlines()
    assert first.endswith("a ViT-4 (embed_dim 64, depth 4, MLP width 128) at 32 px") and "wrote 54 tensors" in first
    assert ("VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=H, mlp_ratio=2, "
            "num_classes=0)" in usage and "H: the num_heads of your config" in usage)
    timm_net = timm_from_usage(usage)
    timm_net.load_state_dict(torch.load(str(tmp_path / "mini.pth"), weights_only=True), strict=True)
    timm_net.eval()
    images = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype("float32")
    with torch.no_grad():
        theirs = timm_net(torch.tensor(images)).numpy()
    assert np.abs(theirs - features(net, images)).max() <= 1e-5


@pytest.mark.parametrize("layout", ["moco-v3", "timm"])
def test_moco_v3_checkpoints_and_timm_state_dicts_load_into_a_ppmoco_vit(tmp_path, layout):
    # Catches: PyTorch Linear weights loaded untransposed, moco-v3's projection head (`head.*`), momentum
    # encoder or predictor taken for the backbone, a timm classifier (`head.*`) refused.
    torch = torch_or_skip()
    source = randomised_vit({"name": "vit_mini"}, seed=4)
    tensors = {k: v.numpy() for k, v in source.state_dict().items()}
    timm_layout = {k: torch.tensor(v.T.copy() if k.endswith(".weight") and v.ndim == 2 else v)
                   for k, v in tensors.items()}
    if layout == "moco-v3":
        state = {f"module.base_encoder.{k}": v for k, v in timm_layout.items()}
        state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in timm_layout.items()})
        state.update({"module.base_encoder.head.0.weight": torch.ones(256, 64),
                      "module.predictor.0.weight": torch.ones(256, 256)})
        saved, source_name = {"epoch": 300, "arch": "vit_mini", "state_dict": state}, "facebookresearch/moco-v3"
    else:
        saved, source_name = dict(timm_layout, **{"head.weight": torch.ones(10, 64)}), "ViT state_dict"
    torch.save(saved, str(tmp_path / "w.pth.tar"))
    assert read_vit_backbone(str(tmp_path / "w.pth.tar"), "test").source.startswith(f"PyTorch {source_name}")
    net = build_backbone({"name": "vit_mini"}, "test")
    assert load_pretrained_backbone(net, str(tmp_path / "w.pth.tar")) == 54
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), tensors[name], err_msg=name)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    paddle.save(random_tensors(Architecture("resnet18"), seed=1), str(folder / "r18.pdparams"))
    save_moco_checkpoint(randomised_vit({"name": "vit_mini"}, seed=5), str(folder / "vit.pdparams"))
    return {"r18": str(folder / "r18.pdparams"), "vit": str(folder / "vit.pdparams")}


VIT = "ViT-4 (embed_dim 64, depth 4) at 16 px, vit_mini's shape"
REFUSALS = [
    ("r18", "x.pth", "timm", "--to timm: {src} (ResNet state_dict) is a ResNet-18, but this target writes timm's "
                             "VisionTransformer, which holds ViTs only; use --to torchvision for a ResNet (timm's "
                             "ResNets have torchvision's names"),
    ("vit", "x.pth", "torchvision", f"--to torchvision: {{src}} (ppmoco MoCo checkpoint) is a {VIT}, but torchvision "
                                    "holds ResNets only; use --to timm (timm's VisionTransformer)"),
    ("vit", "x.pdparams", "paddleclas", f"--to paddleclas: {{src}} (ppmoco MoCo checkpoint) is a {VIT}, but "
                                        "PaddleClas holds ResNets only; use --to timm"),
    ("vit", "x.pkl", "detectron2", "but detectron2 holds ResNets only; use --to timm"),
]


@pytest.mark.parametrize("source, dst_name, fmt, message", REFUSALS, ids=[f"{s}-{f}" for s, _, f, _ in REFUSALS])
def test_resnet_to_timm_and_vit_to_resnet_formats_are_one_line_refusals(sources, tmp_path, capsys, source, dst_name,
                                                                          fmt, message):
    # Catches: a ResNet written under ViT names or a ViT under ResNet names (a KeyError traceback or a file
    # no framework loads), a refusal that does not say which format to use instead.
    code, out, err = convert_cli([sources[source], str(tmp_path / dst_name), "--to", fmt], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message.format(src=sources[source]) in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_timm_without_torch_says_how_to_install_it(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ConfigError, match=r"^--to timm: writing a PyTorch file needs torch: pip install torch"):
        FORMATS["timm"].requires()
    code, _, err = convert_cli([sources["vit"], str(tmp_path / "x.pth"), "--to", "timm"], capsys)
    assert code == 2 and err.startswith("error: --to timm: writing a PyTorch file needs torch") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
