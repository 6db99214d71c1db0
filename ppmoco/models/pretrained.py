"""Read pretrained ResNet weights from ppmoco, PaddleFleetX or PyTorch files and load them.

The layout is recognised from the keys, whichever tool wrote the file, and the load is all or
nothing: a file that does not fit the backbone exactly is an error, never a silent partial load
(which would quietly evaluate a half-random network). `read_backbone` and `infer_architecture` are
shared with the converters (ppmoco.transfer) and `load_backbone` (`from ppmoco import load_backbone`).
"""
import logging
import os
from typing import Dict, NamedTuple

import numpy as np
import paddle
import paddle.vision.models

from ppmoco import safe_pickle
from ppmoco.errors import CheckpointError
from ppmoco.models.resnet import ARCHS, Architecture, BottleneckBlock

logger = logging.getLogger("ppmoco")

# (name, prefix of the backbone's keys); a layout is recognised by `<prefix>conv1.weight`.
# The bare layout (paddle.vision / torchvision state_dict) comes last as it matches any prefix.
LAYOUTS = (
    ("ppmoco MoCo checkpoint", "encoder_q.backbone."),
    ("ppmoco MoCo v3 checkpoint", "base_encoder.backbone."),
    ("ppmoco linear-classifier checkpoint", "backbone."),
    ("PaddleFleetX MoCo checkpoint", "base_encoder.0."),
    ("facebookresearch/moco checkpoint", "module.encoder_q."),
    ("facebookresearch/moco-v3 checkpoint", "module.base_encoder."),
    ("ResNet state_dict", ""),
)
# torch.save writes a zip archive; before torch 1.6 it wrote a pickle led by this number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_BN_RENAMES = ((".running_mean", "._mean"), (".running_var", "._variance"))
_SHOWN = 3  # offenders named per problem, to keep the message to one readable line


class BackboneWeights(NamedTuple):
    """A backbone's tensors read from a file: numpy arrays under ppmoco's (paddle.vision's) names."""

    tensors: Dict[str, np.ndarray]
    file: str  # the file read (a folder's model.pdparams, or path + .pdparams)
    source: str  # what wrote it, e.g. "PyTorch facebookresearch/moco checkpoint"

    def __str__(self):
        return f"{self.file} ({self.source})"


def read_backbone(path, key_path, missing_hint="download them there or fix the path"):
    """The query encoder's backbone from any file `load_pretrained_backbone` accepts, heads dropped.

    `path` is a file, a checkpoint folder (its `model.pdparams`) or a file name without its
    `.pdparams` suffix, as FleetX configs give it. `key_path` names the setting in errors and
    `missing_hint` says what to do when there is no such file.
    """
    file = weights_file(path, key_path, missing_hint)
    is_torch = _is_torch_file(file)
    state = _read_torch(file, key_path) if is_torch else _read_paddle(file, key_path)
    layout, prefix = _detect(state, file, key_path)
    return BackboneWeights(_select(state, prefix), file, f"PyTorch {layout}" if is_torch else layout)


def infer_architecture(weights, key_path):
    """The ppmoco ResNet `weights` are, from their tensors alone (no config), checked to be complete.

    Depth from the block type and the blocks per stage, widths from each stage's first conv, the
    stem from the first conv's kernel (3x3: CIFAR stem). Then every tensor of that network must be
    there, with its shape, and nothing else.
    """
    tensors = weights.tensors
    name = _depth_name(tensors, weights, key_path)
    widths = tuple(_out_channels(tensors[f"layer{stage}.0.conv1.weight"]) for stage in (1, 2, 3, 4))
    cifar_stem = np.shape(tensors["conv1.weight"])[-1:] == (3,)  # the ImageNet stem's conv is 7x7
    arch = Architecture(name, widths, cifar_stem)
    with paddle.LazyGuard():  # names and shapes only: no memory, no initialisation
        expected = arch.build().state_dict()
    _check(tensors, expected, f"{key_path}: {weights} is not a complete {arch}", "is the file damaged?")
    return arch


def load_pretrained_backbone(backbone, path, key_path="Model.model.base_encoder.pretrained"):
    """Copy every tensor of `backbone` from the weights at `path`; return how many were loaded.

    `path` is what `read_backbone` accepts; `key_path` names the config key in errors.
    """
    weights = read_backbone(path, key_path, missing_hint=f"download them there, fix the path, or set {key_path} "
                                                         "to null for random init")
    _assign(backbone, weights, key_path)
    return len(weights.tensors)


def load_backbone(path):
    """A ResNet holding the backbone weights at `path`, loaded all or nothing, ready to fine-tune.

    A `paddle.vision.models` ResNet without classifier (`num_classes=0`: it returns the pooled
    features as [N, C, 1, 1]) when the weights are a published architecture; ppmoco's own ResNet
    (pooled features as [N, C]) when their widths or stem differ. `path` is any file
    `Model.model.base_encoder.pretrained` accepts.
    """
    weights = read_backbone(path, "load_backbone")
    arch = infer_architecture(weights, "load_backbone")
    net = getattr(paddle.vision.models, arch.name)(num_classes=0) if arch.standard else arch.build()
    _assign(net, weights, "load_backbone")
    return net


def _assign(backbone, weights, key_path):
    """Set every tensor of `backbone` from `weights`, after checking they fit it exactly."""
    target = backbone.state_dict()
    _check(weights.tensors, target, f"{key_path}: {weights} does not fit the backbone",
           "was it trained with a different architecture (name, widths or cifar_stem)?")
    backbone.set_state_dict({k: paddle.to_tensor(v, dtype=target[k].dtype) for k, v in weights.tensors.items()})
    logger.info(f"loaded {len(weights.tensors)} backbone tensors from {weights}")


def _depth_name(tensors, weights, key_path):
    """The ARCHS name with the tensors' block type and blocks per stage."""
    bottleneck = "layer1.0.conv3.weight" in tensors
    counts = tuple(_count_blocks(tensors, stage) for stage in (1, 2, 3, 4))
    for name, (block, layers) in ARCHS.items():
        if layers == counts and (block is BottleneckBlock) == bottleneck:
            return name
    known = ", ".join(f"{name} {list(layers)} {_block_kind(block is BottleneckBlock)}"
                      for name, (block, layers) in ARCHS.items())
    raise CheckpointError(f"{key_path}: {weights} holds a ResNet of {list(counts)} "
                          f"{_block_kind(bottleneck)} per stage, which is none of {known}")


def _block_kind(bottleneck):
    return "bottleneck blocks" if bottleneck else "basic blocks"


def _count_blocks(tensors, stage):
    count = 0
    while f"layer{stage}.{count}.conv1.weight" in tensors:
        count += 1
    return count


def _out_channels(value):
    shape = np.shape(value)
    return int(shape[0]) if shape else 0


def weights_file(path, key_path, missing_hint):
    """The file the weights at `path` are read from: `path` itself, a folder's `model.pdparams`, or
    `path` + `.pdparams`."""
    path = str(path)
    if os.path.isdir(path):
        tried = [os.path.join(path, "model.pdparams")]
    else:
        tried = [path] + ([] if path.endswith(".pdparams") else [path + ".pdparams"])
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise CheckpointError(f"{key_path}: no weights at {' or '.join(tried)}; {missing_hint}")


def _is_torch_file(file):
    with open(file, "rb") as f:
        head = f.read(16)
    return head.startswith(_ZIP_MAGIC) or _LEGACY_TORCH_MAGIC in head


def _unwrap(obj):
    """Training checkpoints nest the weights under `state_dict` next to epoch, optimizer, ..."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj


def _read_paddle(file, key_path):
    """Arrays from a paddle.save (or pickle) file, read without running code from it (safe_pickle)."""
    try:
        return _unwrap(safe_pickle.load_paddle(file, return_numpy=True))
    except CheckpointError as err:
        raise CheckpointError(f"{key_path}: {err}") from None


def _read_torch(file, key_path):
    """Tensors as float32 numpy arrays; torch is imported only here, as few users need it."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{key_path}: reading PyTorch checkpoint {file} needs torch: pip install torch (CPU "
            "build is enough), or convert it where torch is installed by paddle.save-ing its "
            "state_dict as numpy arrays (same keys)") from None
    try:
        state = _unwrap(torch.load(file, map_location="cpu", weights_only=True))
    except Exception as err:
        raise CheckpointError(f"{key_path}: cannot read PyTorch file {file}: {err}") from err
    if not isinstance(state, dict):
        return state
    return {k: v.detach().float().numpy() for k, v in state.items() if torch.is_tensor(v)}


def _detect(state, file, key_path):
    """The first layout whose stem conv is in the file, as (name, prefix)."""
    keys = list(state) if isinstance(state, dict) else []
    for name, prefix in LAYOUTS:
        if prefix + "conv1.weight" in keys:
            return name, prefix
    known = "; ".join(f"{name} ({prefix}conv1.weight, ...)" for name, prefix in LAYOUTS)
    found = f"keys {_few(keys)}" if keys else f"a {type(state).__name__}, not a dict of tensors"
    raise CheckpointError(f"{key_path}: cannot tell what {file} holds ({found}); understood "
                          f"layouts: {known}")


def _select(state, prefix):
    """The backbone's tensors under Paddle names: prefix stripped, heads and BN counters dropped."""
    tensors = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith("fc.") or name.endswith(".num_batches_tracked"):
            continue
        for old, new in _BN_RENAMES:
            if name.endswith(old):
                name = name[:-len(old)] + new
        tensors[name] = value
    return tensors


def _check(tensors, target, problem, hint):
    """Demand exactly the target's tensors with its shapes; else `problem`, the first offenders, `hint`."""
    problems = []
    missing = [k for k in target if k not in tensors]
    if missing:
        problems.append(f"missing: {_few(missing)}")
    extra = [k for k in tensors if k not in target]
    if extra:
        problems.append(f"unexpected: {_few(extra)}")
    mismatched = [f"{k} file {list(np.shape(tensors[k]))} vs model {list(target[k].shape)}"
                  for k in target if k in tensors and list(np.shape(tensors[k])) != list(target[k].shape)]
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"{problem}: {'; '.join(problems)}; {hint}")


def _few(items):
    shown = ", ".join(str(item) for item in items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown}, ... ({len(items)} in all)"
