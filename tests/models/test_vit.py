"""ppmoco.models.vit: moco-v3's ViT in Paddle, checked against NumPy recomputations of what vits.py
and timm define (the 2-D sin-cos embedding, the forward pass, the init bounds), and as a MoCo backbone.

Equality with timm's own VisionTransformer at the ViT-S/16 shape is in tests/transfer/test_timm.py.
Each test names the mutation of ppmoco/models/vit.py it catches.
"""
import math

import numpy as np
import paddle
import pytest
from scipy.special import erf

from ppmoco.errors import CheckpointError, ConfigError
from ppmoco.models import BACKBONES, VisionTransformer, build_backbone, load_pretrained_backbone
from ppmoco.models.pretrained import read_backbone
from ppmoco.models.vit import ViTArchitecture, infer_vit_architecture, read_vit_backbone, sincos_position_embedding
from ppmoco.modules.moco import MoCo

from vit_helpers import randomised

KEY = "Model.model.base_encoder"
# Measured: the float32 forward of the randomised vit_mini below is at most 1.2e-6 from the float64 NumPy
# one (seeds 0-4, features up to 3.5), so 1e-5 leaves 8x; the mutations the test names move it by 4.9e-5
# (LayerNorm eps 1e-5), 5.5e-4 (GELU's tanh approximation) and more than 1 (qkv split, post-norm, token).
NUMPY_TOLERANCE = 1e-5


def numpy_layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def numpy_vit(state, images, num_heads):
    """The class token after the final norm, in float64, written from timm's VisionTransformer: patch
    conv, [cls | patches] + pos_embed, pre-norm blocks whose qkv output is [q | k | v] each split into
    heads, softmax(q k^T / sqrt(head_dim)) v, exact-GELU MLP, final LayerNorm. Linear weights are
    Paddle's [in, out]."""
    s = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    weight = s["patch_embed.proj.weight"]
    dim, channels, p, _ = weight.shape
    n, _, size, _ = images.shape
    g = size // p
    patches = images.astype(np.float64).reshape(n, channels, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    x = patches.reshape(n, g * g, -1) @ weight.reshape(dim, -1).T + s["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(s["cls_token"], (n, 1, dim)), x], axis=1) + s["pos_embed"]
    head_dim = dim // num_heads
    depth = sum(1 for k in s if k.endswith(".norm1.weight"))
    for i in range(depth):
        b = f"blocks.{i}."
        h = numpy_layer_norm(x, s[b + "norm1.weight"], s[b + "norm1.bias"])
        qkv = (h @ s[b + "attn.qkv.weight"] + s[b + "attn.qkv.bias"]).reshape(n, -1, 3, num_heads, head_dim)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(n, -1, dim)
        x = x + out @ s[b + "attn.proj.weight"] + s[b + "attn.proj.bias"]
        h = numpy_layer_norm(x, s[b + "norm2.weight"], s[b + "norm2.bias"])
        h = h @ s[b + "mlp.fc1.weight"] + s[b + "mlp.fc1.bias"]
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        x = x + h @ s[b + "mlp.fc2.weight"] + s[b + "mlp.fc2.bias"]
    return numpy_layer_norm(x, s["norm.weight"], s["norm.bias"])[:, 0]


def numpy_sincos(grid, dim):
    """moco-v3's embedding written per token: token 1 + row * grid + col gets
    [sin(row w_i), cos(row w_i), sin(col w_i), cos(col w_i)], w_i = 10000^(-i / (dim / 4)); row 0 is 0."""
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))
    out = np.zeros((1 + grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            out[1 + row * grid + col] = np.concatenate([np.sin(row * omega), np.cos(row * omega),
                                                        np.sin(col * omega), np.cos(col * omega)])
    return out[None]


def images(n, size, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype("float32")


@pytest.mark.parametrize("name, image_size, grid", [("vit_mini", 32, 8), ("vit_small", 224, 14)])
def test_position_embedding_is_moco_v3s_2d_sincos(name, image_size, grid):
    # Catches: the grid transposed (column embedded first), temperature other than 10000, omega over
    # dim/2, sin and cos swapped, a non-zero class-token row, the embedding left trainable.
    with paddle.LazyGuard():
        net = build_backbone({"name": name, "image_size": image_size}, KEY)
    pos = net.pos_embed.numpy()
    assert pos.shape == (1, 1 + grid * grid, net.out_dim) and pos.dtype == np.float32
    np.testing.assert_allclose(pos, numpy_sincos(grid, net.out_dim), rtol=0, atol=1e-6)
    assert "pos_embed" in net.state_dict() and "pos_embed" not in dict(net.named_parameters())
    # the function at a non-square spot of the table: row 1, col 2 differ, so a transpose shows
    np.testing.assert_allclose(sincos_position_embedding(4, 8)[0, 1 + 1 * 4 + 2], numpy_sincos(4, 8)[0, 7], atol=1e-7)


def test_init_is_moco_v3s():
    # Catches: the qkv bound of the whole [dim, 3 dim] matrix (0.71x) or moco-v3's torch formula applied to
    # Paddle's transposed [dim, 3 dim] shape (0.77x), a Xavier bound with the conv's fans (kernel area in
    # fan_out) for the patch projection, non-zero biases, a class token std other than 1e-6, the
    # (patch conv) weight drawn normal instead of uniform.
    paddle.seed(3)
    net = build_backbone({"name": "vit_small"}, KEY)  # the real shapes: 442k qkv samples per block
    dim = 384

    def assert_uniform(weight, bound):
        w = weight.numpy()
        assert np.abs(w).max() <= bound and np.abs(w).max() >= 0.995 * bound
        assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.01  # uniform's std, not a normal's

    for block in (net.blocks[0], net.blocks[11]):
        assert block.attn.qkv.weight.shape == [dim, 3 * dim]
        assert_uniform(block.attn.qkv.weight, math.sqrt(6 / (dim + dim)))  # vits.py: sqrt(6 / (3 dim // 3 + dim))
        assert_uniform(block.attn.proj.weight, math.sqrt(6 / (dim + dim)))
        assert_uniform(block.mlp.fc1.weight, math.sqrt(6 / (dim + 4 * dim)))
        assert_uniform(block.mlp.fc2.weight, math.sqrt(6 / (4 * dim + dim)))
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert not linear.bias.numpy().any()
        for norm in (block.norm1, block.norm2):
            assert (norm.weight.numpy() == 1).all() and not norm.bias.numpy().any() and norm._epsilon == 1e-6
    assert_uniform(net.patch_embed.proj.weight, math.sqrt(6 / (3 * 16 * 16 + dim)))
    assert not net.patch_embed.proj.bias.numpy().any()
    assert 0.85e-6 < net.cls_token.numpy().std() < 1.15e-6 and np.abs(net.cls_token.numpy()).max() < 6e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_is_the_class_token_of_timms_vit_recomputed_in_numpy(seed):
    # Catches: the qkv split as [heads, 3] instead of [3, heads], a scale of 1/sqrt(dim) or none, GELU's
    # tanh approximation, LayerNorm eps 1e-5, a post-norm block, a token other than the class token or
    # taken before the final norm, the position embedding not added.
    paddle.seed(seed)
    net = randomised(build_backbone({"name": "vit_mini", "image_size": 16}, KEY), seed)
    batch = images(3, 16, seed)
    with paddle.no_grad():
        features = net(paddle.to_tensor(batch)).numpy()
    reference = numpy_vit({k: v.numpy() for k, v in net.state_dict().items()}, batch, num_heads=4)
    assert features.shape == (3, 64) and np.abs(reference).max() > 0.5
    assert np.abs(features - reference).max() <= NUMPY_TOLERANCE


def test_registered_shapes_and_config_arguments():
    # Catches: a registered shape other than the documented one, a factory that drops an argument.
    assert {"vit_small", "vit_base", "vit_mini"} <= set(BACKBONES.names())
    expected = {"vit_small": (16, 384, 12, 12, 224), "vit_base": (16, 768, 12, 12, 224), "vit_mini": (4, 64, 4, 4, 16)}
    for name, (patch, dim, depth, heads, size) in expected.items():
        with paddle.LazyGuard():
            net = build_backbone({"name": name}, KEY)
        assert isinstance(net, VisionTransformer) and net.out_dim == dim
        assert net.patch_embed.proj.weight.shape == [dim, 3, patch, patch] and len(net.blocks) == depth
        assert net.blocks[0].attn.num_heads == heads and net.image_size == size
        assert net.blocks[0].mlp.fc1.weight.shape == [dim, 4 * dim]
    with paddle.LazyGuard():
        net = build_backbone({"name": "vit_small", "depth": 2, "num_heads": 6, "image_size": 32, "patch_size": 8,
                              "mlp_ratio": 2, "stop_grad_conv1": True}, KEY)
    assert len(net.blocks) == 2 and net.blocks[0].attn.num_heads == 6 and net.pos_embed.shape == [1, 17, 384]
    assert net.blocks[0].mlp.fc1.weight.shape == [384, 768] and net.patch_embed.proj.weight.stop_gradient
    # ViT-S/16 without head: timm's 21,665,664 parameters, less the fixed pos_embed (197 x 384) ppmoco keeps
    # as a buffer
    with paddle.LazyGuard():
        small = build_backbone({"name": "vit_small"}, KEY)
    assert sum(int(np.prod(p.shape)) for p in small.parameters()) == 21_665_664 - 197 * 384


@pytest.mark.parametrize("cfg, message", [
    ({"image_size": 18}, r"image_size: 18 px is not a whole number of 4 px patches; use a multiple of patch_size, "
                         r"e.g. 16"),
    ({"num_heads": 3}, r"num_heads: 3 does not divide embed_dim 64"),
    ({"embed_dim": 66, "num_heads": 6}, r"embed_dim: 66 must be divisible by 4 for the 2-D sin-cos"),
    ({"depth": 0}, r"depth: 0 must be > 0"),
    ({"image_size": 16.0}, r"Model.model.base_encoder.image_size: expected int"),
    ({"heads": 4}, r"Model.model.base_encoder.heads: unknown key \(did you mean 'num_heads'\?\)"),
])
def test_bad_shapes_are_one_line_config_errors(cfg, message):
    # Catches: a grid silently dropping the pixels of a last partial patch, heads of unequal width.
    with pytest.raises(ConfigError, match=message):
        build_backbone({"name": "vit_mini", **cfg}, KEY)


def test_an_image_of_another_size_is_a_config_error():
    # Catches: a ViT that broadcasts the position embedding over a wrong number of tokens or fails deep in Paddle.
    net = build_backbone({"name": "vit_mini"}, KEY)
    with pytest.raises(ConfigError, match=r"image_size: this ViT is built for 16x16 images .* got 32x32; set"):
        net(paddle.zeros([1, 3, 32, 32]))


@pytest.mark.parametrize("stop_grad_conv1", [True, False])
def test_moco_trains_a_vit_and_stop_grad_conv1_freezes_the_patch_projection_only(stop_grad_conv1):
    # Catches: stop_grad_conv1 ignored, freezing more than the projection's weight and bias (the class token,
    # the first block), the projection frozen without the option; a head not built on out_dim.
    paddle.seed(0)
    moco = MoCo(base_encoder={"name": "vit_mini", "stop_grad_conv1": stop_grad_conv1}, projector={"hidden_dim": 32},
                dim=16, K=32, m=0.9, T=0.2)
    moco.train()
    backbone = moco.encoder_q.backbone
    proj = [backbone.patch_embed.proj.weight, backbone.patch_embed.proj.bias]
    trainable = {id(p) for p in moco.trainable_parameters()}
    assert all((id(p) in trainable) != stop_grad_conv1 for p in proj)
    assert all(id(p) in trainable for name, p in backbone.named_parameters() if not name.startswith("patch_embed"))
    out = moco.training_step([paddle.to_tensor(images(4, 16, 5)), paddle.to_tensor(images(4, 16, 6))])
    out.loss.backward()
    assert all((p.grad is None) == stop_grad_conv1 for p in proj)
    assert backbone.cls_token.grad is not None and backbone.blocks[0].attn.qkv.weight.grad is not None
    assert moco.extract_features(paddle.to_tensor(images(2, 16))).shape == [2, 64]
    assert not hasattr(backbone, "forward_stages")  # no stage maps: the SVM protocols cannot pool a ViT


# Catches: a ViT-backed MoCo or probe claiming extract_stages (the SVM protocols would accept it and fail
# mid-run), the multi-head probe building on a ViT, and the refusal reaching ResNets.
def test_modules_on_a_vit_refuse_the_stage_protocols_up_front():
    from ppmoco.modules import LinearEval, MultiHeadLinearEval

    vit, resnet = {"name": "vit_mini"}, {"name": "resnet18", "widths": [8, 8, 8, 8]}
    for encoder, has_stages in ((vit, False), (resnet, True)):
        moco = MoCo(base_encoder=encoder, projector={"hidden_dim": 32}, dim=16, K=32, m=0.9, T=0.2)
        probe = LinearEval(base_encoder=encoder, num_classes=10)
        for module in (moco, probe):
            assert module.supports("extract_stages") == has_stages and module.supports("extract_features")
    with pytest.raises(ConfigError, match="no stage feature maps"):
        MultiHeadLinearEval(base_encoder=vit, num_classes=10)


def test_weights_round_trip_through_a_moco_checkpoint_and_refuse_other_architectures(tmp_path):
    # Catches: loading the key encoder or the head, a file of another ViT shape loading partly, a ResNet
    # file accepted by a ViT (or the other way round) with a traceback instead of one line.
    paddle.seed(1)
    moco = MoCo(base_encoder={"name": "vit_mini"}, projector={"hidden_dim": 32}, dim=16, K=32)
    for p in moco.encoder_k.parameters():
        p.set_value(p.numpy() + 1.0)
    path = str(tmp_path / "moco.pdparams")
    paddle.save(moco.state_dict(), path)
    weights = read_vit_backbone(path, "test")
    assert weights.source == "ppmoco MoCo checkpoint"
    arch = infer_vit_architecture(weights, "test")
    assert arch == ViTArchitecture(4, 64, 4, 16, 256) and arch.registered() == "vit_mini"
    assert str(arch) == "ViT-4 (embed_dim 64, depth 4) at 16 px, vit_mini's shape"
    net = build_backbone({"name": "vit_mini"}, KEY)
    assert load_pretrained_backbone(net, path) == len(net.state_dict()) == 54
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), moco.encoder_q.backbone.state_dict()[name].numpy())
    with pytest.raises(CheckpointError, match=r"does not fit the backbone: missing: blocks.4.norm1.weight, .*; "
                                              r"was it trained with a different ViT"):
        load_pretrained_backbone(build_backbone({"name": "vit_mini", "depth": 5}, KEY), path)
    resnet = build_backbone({"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True}, KEY)
    paddle.save(resnet.state_dict(), str(tmp_path / "r18.pdparams"))
    with pytest.raises(CheckpointError, match=r"holds no ViT .* but the backbone is a ViT; name a ViT's weights"):
        load_pretrained_backbone(net, str(tmp_path / "r18.pdparams"))
    with pytest.raises(CheckpointError, match=r"cannot tell what .* holds"):
        read_backbone(path, "test")  # the ResNet reader does not take a ViT for a ResNet
