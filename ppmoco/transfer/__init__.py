"""A pretrained backbone written for other frameworks: one key map per target
(docs/transfer_export.md, "Use the backbone elsewhere"), used by tools/convert.py.

Reading is ppmoco's own (`ppmoco.models.pretrained.read_backbone`: anything
`Model.model.base_encoder.pretrained` accepts, heads and key encoder dropped; a ViT's through
`ppmoco.models.vit.read_vit_backbone`), and so is the architecture, inferred from the tensors: a ResNet
or a ViT, which the ResNet targets refuse, as the ViT target (timm) refuses a ResNet. Every check runs
before the output is written, and the output appears whole or not at all.
"""
import os

from ppmoco.errors import CheckpointError, ConfigError
from ppmoco.fileio import write_bytes_atomic
from ppmoco.models.pretrained import infer_architecture, read_backbone
from ppmoco.models.vit import infer_vit_architecture, read_vit_backbone
from ppmoco.transfer import detectron2, paddle_vision, paddleclas, paddledet, timm, torchvision

FORMATS = {module.TARGET.name: module.TARGET
           for module in (torchvision, detectron2, paddle_vision, paddleclas, paddledet, timm)}


def convert(src, dst, fmt):
    """Write the backbone at `src` to `dst` in format `fmt`; return the lines to show the user."""
    target = _target(fmt)
    target.requires()
    _check_destination(dst, target)
    weights, arch = _read(src)
    target.check(arch, weights)
    state = target.convert(weights.tensors, arch)
    _write(dst, target.serialize(state))
    return [f"wrote {len(state)} tensors in {fmt} format to {dst}, from {weights}: a {arch}",
            target.usage(arch, dst)]


def _read(src):
    """(weights, architecture) of the backbone at `src`: a ViT, else a ResNet (the file is read again)."""
    weights = read_vit_backbone(src, "SRC")
    if weights is not None:
        return weights, infer_vit_architecture(weights, "SRC")
    weights = read_backbone(src, "SRC")
    return weights, infer_architecture(weights, "SRC")


def _write(dst, data):
    try:
        write_bytes_atomic(dst, data)
    except OSError as err:
        raise CheckpointError(f"DST: cannot write {dst}: {err.strerror or err}; free disk space, fix the "
                              "permissions or choose another path (nothing was written)") from err


def _target(fmt):
    if fmt not in FORMATS:
        raise ConfigError(f"--to: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _check_destination(dst, target):
    if os.path.isdir(dst):
        raise ConfigError(f"DST: {dst} is a folder; give the file to write, e.g. {os.path.join(dst, 'backbone')}"
                          f"{target.suffix or ''}")
    if target.suffix and not dst.endswith(target.suffix):
        raise ConfigError(f"DST: {target.framework} reads only files named *{target.suffix}; name the output "
                          f"{os.path.splitext(dst)[0]}{target.suffix}")
