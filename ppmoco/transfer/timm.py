"""timm's VisionTransformer: a ppmoco ViT (ppmoco.models.vit) as the PyTorch state dict timm loads.

ppmoco's ViT already has timm's names (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.norm1`,
`blocks.N.attn.qkv`, `blocks.N.attn.proj`, `blocks.N.norm2`, `blocks.N.mlp.fc1`, `blocks.N.mlp.fc2`,
`norm`), what moco-v3's convert_to_deit.py writes for DeiT: the conversion transposes each Linear
weight from Paddle's [in, out] to PyTorch's [out, in] and keeps every other tensor as it is. The file
is a bare state dict without `head`, which `VisionTransformer(..., num_classes=0)` (class token,
global_pool 'token', its default LayerNorm eps 1e-6 and GELU) loads strictly; with `num_classes=N`
only the new classifier's `head.weight` and `head.bias` are missing. The weights do not say how many
heads the attention has: the usage line gives the registered backbone's where the shape is one of
them, and the user's config says it otherwise.
"""
from dataclasses import dataclass

import numpy as np

from ppmoco.errors import CheckpointError
from ppmoco.models.vit import ViTArchitecture, heads_hint
from ppmoco.transfer.torchvision import require_torch, save_torch


def to_timm(tensors):
    """{timm name: array} from a ppmoco ViT's tensors: the Linear weights (every 2-D `.weight`) transposed."""
    return {name: np.ascontiguousarray(value.T) if name.endswith(".weight") and np.ndim(value) == 2
            else np.array(value) for name, value in tensors.items()}


def timm_call(arch, num_heads=None):
    """The timm constructor call that builds `arch` without classifier (num_heads as given, else the
    registered shape's, else a placeholder the user fills in)."""
    heads = num_heads or heads_hint(arch)
    args = [f"img_size={arch.image_size}", f"patch_size={arch.patch_size}", f"embed_dim={arch.embed_dim}",
            f"depth={arch.depth}", f"num_heads={heads if heads else 'H'}"]
    args += [f"mlp_ratio={arch.mlp_ratio:g}"] if arch.mlp_dim != 4 * arch.embed_dim else []
    args += [f"in_chans={arch.in_channels}"] if arch.in_channels != 3 else []
    return f"VisionTransformer({', '.join(args + ['num_classes=0'])})"


def _usage(arch, dst):
    heads = heads_hint(arch)
    note = (f" (num_heads {heads} as {arch.registered()}: set your config's if it differs, the weights do not "
            "hold it)" if heads else " (H: the num_heads of your config, which the weights do not hold)")
    return (f"timm: from timm.models.vision_transformer import VisionTransformer; net = {timm_call(arch)}; "
            f"net.load_state_dict(torch.load('{dst}')){note}; for a classifier num_classes=N and strict=False "
            "(only head.* is new)")


@dataclass(frozen=True)
class ViTTarget:
    """A conversion target for ViTs: what ppmoco.transfer.convert asks of a Target, for ViT weights."""

    name: str
    framework: str
    suffix: str = None

    @staticmethod
    def requires():
        require_torch("timm")

    def check(self, arch, src):
        if not isinstance(arch, ViTArchitecture):
            raise CheckpointError(f"--to {self.name}: {src} is a {arch}, but this target writes timm's "
                                  "VisionTransformer, which holds ViTs only; use --to torchvision for a ResNet "
                                  "(timm's ResNets have torchvision's names: timm.create_model('resnet50', "
                                  "num_classes=0) loads that file)")

    @staticmethod
    def convert(tensors, arch):
        return to_timm(tensors)

    @staticmethod
    def serialize(state):
        return save_torch(state)

    @staticmethod
    def usage(arch, dst):
        return _usage(arch, dst)


TARGET = ViTTarget(name="timm", framework="timm")
