"""Vision Transformers as MoCo v3 builds them (facebookresearch/moco-v3 vits.py), with timm's names.

The network is timm's `VisionTransformer` with a class token, pre-norm blocks (LayerNorm eps 1e-6),
one qkv Linear per attention, an MLP of 4x the width with exact GELU and a final LayerNorm; moco-v3
changes two things, which this file keeps:
- a fixed 2-D sin-cos position embedding (temperature 10000; zero for the class token), held as the
  persistable buffer `pos_embed`: in the state dict and in exported models, never trained;
- its initialisation: each of Q, K and V uniform with the Xavier bound of a [dim, dim] matrix
  (vits.py: sqrt(6 / (3 dim // 3 + dim))), every other Linear Xavier-uniform, every Linear bias 0,
  the patch projection Xavier-uniform over its flattened [dim, C*p*p] weight with bias 0, the class
  token N(0, 1e-6). `stop_grad_conv1` freezes the patch projection (its weight and bias get
  stop_gradient, so Module.trainable_parameters leaves them out), as moco-v3's --stop-grad-conv1.

Parameter names are timm's (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.norm1`,
`blocks.N.attn.qkv`, `blocks.N.attn.proj`, `blocks.N.norm2`, `blocks.N.mlp.fc1`, `blocks.N.mlp.fc2`,
`norm`), which moco-v3's convert_to_deit.py also writes, so a converter only transposes the Linear
weights (Paddle stores [in, out], PyTorch [out, in]). `forward` returns the class token after the
final norm, [N, embed_dim]: what moco-v3 feeds the head that replaces timm's `head`, and what timm's
`VisionTransformer(num_classes=0, global_pool='token')` returns. There is no `forward_stages`: a ViT
has no stage maps for the SVM protocols to pool.

Registered backbones (Model.model.base_encoder.name), each accepting every argument of the factory:
- vit_small: patch 16, embed_dim 384, depth 12, 12 heads, 224 px (moco-v3's ViT-S; DeiT-S has 6 heads)
- vit_base: patch 16, embed_dim 768, depth 12, 12 heads, 224 px (ViT-B/16)
- vit_mini: patch 4, embed_dim 64, depth 4, 4 heads, 16 px (a 4x4 grid of tokens): not a published
  network, a ViT small enough to pretrain on the digits demo's 16 px images on a CPU; at 32 px give
  `image_size: 32` (an 8x8 grid).
"""
import logging
import math
from typing import NamedTuple, Optional

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ppmoco.errors import CheckpointError, ConfigError
from ppmoco.models.pretrained import _check, _is_torch_file, _read_paddle, _read_torch, weights_file
from ppmoco.models.resnet import BACKBONES

logger = logging.getLogger("ppmoco")

LAYER_NORM_EPS = 1e-6
TEMPERATURE = 10000.0  # of the sin-cos position embedding (vits.py build_2d_sincos_position_embedding)

# The registered shapes: (patch_size, embed_dim, depth, num_heads, image_size).
SHAPES = {
    "vit_small": (16, 384, 12, 12, 224),
    "vit_base": (16, 768, 12, 12, 224),
    "vit_mini": (4, 64, 4, 4, 16),
}


def sincos_position_embedding(grid, embed_dim, temperature=TEMPERATURE):
    """moco-v3's fixed position embedding of a `grid` x `grid` patch grid, [1, 1 + grid**2, embed_dim]
    float32: a zero row for the class token, then one row per patch in the patches' row-major order.

    As vits.py builds it: omega_i = temperature**(-i / (embed_dim / 4)) for i < embed_dim / 4, and
    torch.meshgrid(grid_w, grid_h) with its default 'ij' indexing, which gives the patch of token
    t = row * grid + col the coordinates (row, col); the row is embedded first:
    [sin(row omega), cos(row omega), sin(col omega), cos(col omega)]. Computed in float64 and rounded
    once to float32 (moco-v3 computes in float32: the two differ by float32 rounding only).
    """
    if embed_dim % 4:
        raise ConfigError(f"embed_dim: {embed_dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    pos_dim = embed_dim // 4
    omega = 1.0 / temperature ** (np.arange(pos_dim, dtype=np.float64) / pos_dim)
    first, second = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    out_first, out_second = np.outer(first.ravel(), omega), np.outer(second.ravel(), omega)
    patches = np.concatenate([np.sin(out_first), np.cos(out_first), np.sin(out_second), np.cos(out_second)], axis=1)
    return np.concatenate([np.zeros((1, embed_dim)), patches])[None].astype(np.float32)


def qkv_bound(embed_dim):
    """moco-v3's uniform bound for the qkv weight, which it treats as three [dim, dim] matrices:
    sqrt(6 / (weight.shape[0] // 3 + weight.shape[1])) on torch's [3 dim, dim] weight."""
    return math.sqrt(6.0 / (3 * embed_dim // 3 + embed_dim))


def xavier_bound(fan_in, fan_out):
    return math.sqrt(6.0 / (fan_in + fan_out))


def _uniform(bound):
    return paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))


def _zeros():
    return paddle.ParamAttr(initializer=nn.initializer.Constant(0.0))


def _linear(in_dim, out_dim, bound=None):
    """A Linear with moco-v3's init: weight uniform in +-bound (Xavier's by default), bias 0."""
    bound = xavier_bound(in_dim, out_dim) if bound is None else bound
    return nn.Linear(in_dim, out_dim, weight_attr=_uniform(bound), bias_attr=_zeros())


def _layer_norm(dim):
    return nn.LayerNorm(dim, epsilon=LAYER_NORM_EPS)


class PatchEmbed(nn.Layer):
    """Non-overlapping p x p patches, each projected to embed_dim by one strided conv, as tokens [N, L, D]."""

    def __init__(self, image_size, patch_size, in_channels, embed_dim):
        super().__init__()
        self.grid = image_size // patch_size
        bound = xavier_bound(in_channels * patch_size * patch_size, embed_dim)  # the flattened [D, C*p*p] weight
        self.proj = nn.Conv2D(in_channels, embed_dim, patch_size, stride=patch_size,
                              weight_attr=_uniform(bound), bias_attr=_zeros())

    def forward(self, x):
        return self.proj(x).flatten(2).transpose([0, 2, 1])


class Attention(nn.Layer):
    """Multi-head self-attention; the qkv output is [q | k | v], each split into heads (timm's order)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = _linear(dim, 3 * dim, bound=qkv_bound(dim))
        self.proj = _linear(dim, dim)

    def forward(self, x):
        # [N, L, 3 D] -> [3, N, heads, L, head_dim]; 0 keeps the batch and token dimensions as they are
        qkv = self.qkv(x).reshape([0, 0, 3, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.softmax(paddle.matmul(q * self.scale, k, transpose_y=True), axis=-1)
        out = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([0, 0, self.num_heads * self.head_dim])
        return self.proj(out)


class Mlp(nn.Layer):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = _linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf), as torch.nn.GELU
        self.fc2 = _linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Layer):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, hidden):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Layer):
    """Headless ViT: `forward` gives the class token after the final norm, [N, out_dim]."""

    output_description = "the class token after the final LayerNorm"  # export.json's output.what (ppmoco.export)

    def __init__(self, image_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12, mlp_ratio=4.0,
                 in_channels=3, stop_grad_conv1=False):
        super().__init__()
        for key, value in (("image_size", image_size), ("patch_size", patch_size), ("embed_dim", embed_dim),
                           ("depth", depth), ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
            if not value > 0:
                raise ConfigError(f"{key}: {value} must be > 0")
        if image_size % patch_size:
            raise ConfigError(f"image_size: {image_size} px is not a whole number of {patch_size} px patches; "
                              f"use a multiple of patch_size, e.g. {max(1, image_size // patch_size) * patch_size}")
        if embed_dim % num_heads:
            raise ConfigError(f"num_heads: {num_heads} does not divide embed_dim {embed_dim}")
        self.image_size, self.patch_size, self.num_heads = image_size, patch_size, num_heads
        self.out_dim = embed_dim  # what the heads are built on (ResNet's attribute of the same meaning)
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, embed_dim)
        self.cls_token = self.create_parameter(
            [1, 1, embed_dim], attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 1e-6)))
        self.register_buffer("pos_embed", paddle.to_tensor(sincos_position_embedding(self.patch_embed.grid,
                                                                                     embed_dim)), persistable=True)
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.LayerList([Block(embed_dim, num_heads, hidden) for _ in range(depth)])
        self.norm = _layer_norm(embed_dim)
        if stop_grad_conv1:
            self.patch_embed.proj.weight.stop_gradient = True
            self.patch_embed.proj.bias.stop_gradient = True

    def forward_tokens(self, x):
        """Every token after the final norm, [N, 1 + grid**2, embed_dim]; the class token first."""
        size = self.image_size
        if any(side > 0 and side != size for side in x.shape[2:]):  # static sides only (-1: unknown while tracing)
            raise ConfigError(f"image_size: this ViT is built for {size}x{size} images (its position embedding "
                              f"has a {self.patch_embed.grid}x{self.patch_embed.grid} grid) and got "
                              f"{x.shape[2]}x{x.shape[3]}; set the backbone's image_size to the size the transforms "
                              "give")
        tokens = self.patch_embed(x)
        cls = paddle.zeros_like(tokens[:, :1]) + self.cls_token  # one per image, for any (traced) batch size
        x = paddle.concat([cls, tokens], axis=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        """The class token's features after the final norm, [N, out_dim]."""
        return self.forward_tokens(x)[:, 0]


def _register(name):
    patch_size, embed_dim, depth, num_heads, image_size = SHAPES[name]

    def factory(image_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, mlp_ratio=4.0, stop_grad_conv1=False):
        return VisionTransformer(image_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, mlp_ratio=mlp_ratio, stop_grad_conv1=stop_grad_conv1)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"{name} backbone: patch {patch_size}, embed_dim {embed_dim}, depth {depth}, "
                       f"{num_heads} heads, {image_size} px.")
    return BACKBONES.register(factory, name=name)


vit_small = _register("vit_small")
vit_base = _register("vit_base")
vit_mini = _register("vit_mini")


class ViTArchitecture(NamedTuple):
    """Which ppmoco ViT a set of weights is, as far as its tensors tell: not the number of heads, which
    no tensor's shape depends on."""

    patch_size: int
    embed_dim: int
    depth: int
    image_size: int
    mlp_dim: int
    in_channels: int = 3

    @property
    def mlp_ratio(self):
        return self.mlp_dim / self.embed_dim

    def registered(self):
        """The registered backbone of this shape (whose heads it then most likely has), or None."""
        for name, (patch, dim, depth, _, size) in SHAPES.items():
            if (patch, dim, depth, size, 4 * dim, 3) == tuple(self):
                return name
        return None

    def build(self, num_heads=1):
        return VisionTransformer(self.image_size, self.patch_size, self.embed_dim, self.depth, num_heads,
                                 self.mlp_ratio, self.in_channels)

    def __str__(self):
        """E.g. "ViT-16 (embed_dim 384, depth 12) at 224 px, vit_small's shape"."""
        extra = [f"MLP width {self.mlp_dim}"] if self.mlp_dim != 4 * self.embed_dim else []
        extra += [f"{self.in_channels} input channels"] if self.in_channels != 3 else []
        text = f"ViT-{self.patch_size} ({', '.join([f'embed_dim {self.embed_dim}', f'depth {self.depth}', *extra])})"
        name = self.registered()
        return f"{text} at {self.image_size} px" + (f", {name}'s shape" if name else "")


# (name, prefix of the backbone's keys); a layout is recognised by `<prefix>patch_embed.proj.weight`.
# The bare layout (a timm state dict, as --to timm writes it) comes last: it matches any prefix.
LAYOUTS = (
    ("ppmoco MoCo checkpoint", "encoder_q.backbone."),
    ("ppmoco MoCo v3 checkpoint", "base_encoder.backbone."),
    ("ppmoco linear-classifier checkpoint", "backbone."),
    ("facebookresearch/moco-v3 checkpoint", "module.base_encoder."),
    ("facebookresearch/moco-v3 checkpoint", "base_encoder."),
    ("ViT state_dict", ""),
)
_MARK = "patch_embed.proj.weight"


class ViTWeights(NamedTuple):
    """A ViT's tensors read from a file: numpy arrays under ppmoco's (timm's) names, Paddle's layout."""

    tensors: dict
    file: str
    source: str

    def __str__(self):
        return f"{self.file} ({self.source})"


def vit_layout(state):
    """(name, prefix) of the first LAYOUTS entry whose patch projection `state` holds, or None."""
    keys = state if isinstance(state, dict) else {}
    return next(((name, prefix) for name, prefix in LAYOUTS if prefix + _MARK in keys), None)


def read_vit_backbone(path, key_path, missing_hint="download them there or fix the path"):
    """The ViT backbone in the file at `path` (what `read_backbone` accepts: a file, a checkpoint folder,
    a name without `.pdparams`), head dropped, Linear weights in Paddle's [in, out]; None when the file
    holds no ViT. PyTorch files (moco-v3 checkpoints, timm state dicts) store [out, in]: their 2-D
    weights, the Linear layers' and nothing else, are transposed."""
    file = weights_file(path, key_path, missing_hint)
    is_torch = _is_torch_file(file)
    state = _read_torch(file, key_path) if is_torch else _read_paddle(file, key_path)
    found = vit_layout(state)
    if found is None:
        return None
    layout, prefix = found
    tensors = {}
    for key, value in state.items():
        if not key.startswith(prefix) or key[len(prefix):].startswith("head."):  # moco-v3's projector, timm's fc
            continue
        name = key[len(prefix):]
        tensors[name] = np.ascontiguousarray(np.asarray(value).T) if is_torch and _is_linear_weight(name, value) \
            else value
    return ViTWeights(tensors, file, f"PyTorch {layout}" if is_torch else layout)


def _is_linear_weight(name, value):
    return name.endswith(".weight") and np.ndim(value) == 2


def infer_vit_architecture(weights, key_path):
    """The ppmoco ViT `weights` are, from their tensors alone, checked to be complete: patch size, width
    and input channels from the patch projection, the grid (so the image size) from the position
    embedding, the depth from the blocks, the MLP width from the first block's fc1."""
    tensors = weights.tensors
    proj, pos = np.shape(tensors[_MARK]), np.shape(tensors.get("pos_embed", ()))
    fc1 = np.shape(tensors.get("blocks.0.mlp.fc1.weight", ()))
    depth = 0
    while f"blocks.{depth}.norm1.weight" in tensors:
        depth += 1
    tokens = pos[1] if len(pos) == 3 else 0
    grid = math.isqrt(max(tokens - 1, 0))
    if len(proj) != 4 or proj[2] != proj[3] or grid < 1 or grid * grid != tokens - 1 or len(fc1) != 2:
        raise CheckpointError(f"{key_path}: {weights} is not a ViT ppmoco builds ({_MARK} {list(proj)}, pos_embed "
                              f"{list(pos)}, blocks.0.mlp.fc1.weight {list(fc1)}: square patches, a class token "
                              "and a square grid of patch tokens expected); is the file damaged?")
    arch = ViTArchitecture(int(proj[2]), int(proj[0]), depth, grid * int(proj[2]), int(fc1[1]), int(proj[1]))
    with paddle.LazyGuard():  # names and shapes only: no memory, no initialisation
        expected = arch.build().state_dict()
    _check(tensors, expected, f"{key_path}: {weights} is not a complete {arch}", "is the file damaged?")
    return arch


def load_pretrained_vit(backbone, path, key_path="Model.model.base_encoder.pretrained"):
    """Copy every tensor of the ViT `backbone` from the weights at `path`, all or nothing; return how many."""
    weights = read_vit_backbone(path, key_path, missing_hint=f"download them there, fix the path, or set {key_path} "
                                                            "to null for random init")
    if weights is None:
        raise CheckpointError(f"{key_path}: {weights_file(path, key_path, '')} holds no ViT (no {_MARK} with "
                              "any prefix ppmoco knows) but the backbone is a ViT; name a ViT's weights, or build "
                              "the backbone the file holds (Model.model.base_encoder.name)")
    target = backbone.state_dict()
    _check(weights.tensors, target, f"{key_path}: {weights} does not fit the backbone",
           "was it trained with a different ViT (patch_size, embed_dim, depth, mlp_ratio or image_size)?")
    backbone.set_state_dict({k: paddle.to_tensor(v, dtype=target[k].dtype) for k, v in weights.tensors.items()})
    logger.info(f"loaded {len(weights.tensors)} backbone tensors from {weights}")
    return len(weights.tensors)


def heads_hint(arch: ViTArchitecture) -> Optional[int]:
    """The number of heads of the registered backbone of `arch`'s shape, or None."""
    name = arch.registered()
    return SHAPES[name][3] if name else None
