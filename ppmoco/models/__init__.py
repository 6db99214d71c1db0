"""Backbones (built from config through BACKBONES: the ResNets of resnet.py and the Vision Transformers of
vit.py), the heads put on top of them, and the pooling of their stage maps to per-layer features
(pool_stages)."""
from ppmoco.errors import ConfigError
from ppmoco.models import pretrained
from ppmoco.models.heads import BatchNormMLP, LinearClassifier, NormLinearHead, ProjectionHead
from ppmoco.models.pooling import pool_stages
from ppmoco.models.pretrained import load_backbone
from ppmoco.models.resnet import BACKBONES, ResNet
from ppmoco.models.vit import VisionTransformer, load_pretrained_vit

__all__ = ["ResNet", "VisionTransformer", "BACKBONES", "build_backbone", "ProjectionHead", "BatchNormMLP",
           "LinearClassifier", "NormLinearHead", "load_pretrained_backbone", "load_backbone", "pool_stages"]


def build_backbone(cfg, key_path):
    """Build the backbone described by `cfg` (`name` plus factory kwargs) found at `key_path`.

    `pretrained` is skipped: loading weights belongs to the checkpoint code, after building. A key set
    to null takes the backbone's default, so a config can cancel one its `_base_` set for another
    backbone (a ViT config over the digits ResNet's `widths`).
    """
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ConfigError(f"{key_path}: expected a mapping with a 'name' key, got {cfg!r}")
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "pretrained") and v is not None}
    _drop_fleetx_keys(kwargs, key_path)
    return BACKBONES.build(cfg["name"], kwargs, key_path)


def load_pretrained_backbone(backbone, path, key_path="Model.model.base_encoder.pretrained"):
    """Copy every tensor of `backbone` from the weights at `path`, all or nothing; return how many were
    loaded: a ViT's as ppmoco.models.vit reads them, a ResNet's as ppmoco.models.pretrained does."""
    if isinstance(backbone, VisionTransformer):
        return load_pretrained_vit(backbone, path, key_path)
    return pretrained.load_pretrained_backbone(backbone, path, key_path)


def _drop_fleetx_keys(kwargs, key_path):
    """Accept FleetX's `with_pool`/`num_classes`, which ask paddle.vision for a headless net.

    Our backbone is always headless and `forward` always pools, so `with_pool` is ignored and
    only `num_classes: 0` makes sense.
    """
    with_pool = kwargs.pop("with_pool", False)
    if not isinstance(with_pool, bool):
        raise ConfigError(f"{key_path}.with_pool: expected bool, got {with_pool!r}")
    num_classes = kwargs.pop("num_classes", 0)
    if num_classes != 0:
        raise ConfigError(f"{key_path}.num_classes: must be 0, got {num_classes!r}; the backbone "
                          "has no classifier, it lives in the module/head")
