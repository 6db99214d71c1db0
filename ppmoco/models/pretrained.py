"""Load pretrained ResNet weights into a backbone from ppmoco, PaddleFleetX or PyTorch files.

The layout is recognised from the keys, whichever tool wrote the file, and the load is all or
nothing: a file that does not fit the backbone exactly is an error, never a silent partial load
(which would quietly evaluate a half-random network).
"""
import logging
import os

import paddle

from ppmoco.errors import CheckpointError

logger = logging.getLogger("ppmoco")

# (name, prefix of the backbone's keys); a layout is recognised by `<prefix>conv1.weight`.
# The bare layout (paddle.vision / torchvision state_dict) comes last as it matches any prefix.
LAYOUTS = (
    ("ppmoco MoCo checkpoint", "encoder_q.backbone."),
    ("ppmoco linear-classifier checkpoint", "backbone."),
    ("PaddleFleetX MoCo checkpoint", "base_encoder.0."),
    ("facebookresearch/moco checkpoint", "module.encoder_q."),
    ("ResNet state_dict", ""),
)
# torch.save writes a zip archive; before torch 1.6 it wrote a pickle led by this number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_BN_RENAMES = ((".running_mean", "._mean"), (".running_var", "._variance"))
_SHOWN = 3  # offenders named per problem, to keep the message to one readable line


def load_pretrained_backbone(backbone, path, key_path="Model.model.base_encoder.pretrained"):
    """Copy every tensor of `backbone` from the weights at `path`; return how many were loaded.

    `path` is a file, a checkpoint folder (its `model.pdparams`) or a file name without its
    `.pdparams` suffix, as FleetX configs give it. `key_path` names the config key in errors.
    """
    file = _resolve(path, key_path)
    is_torch = _is_torch_file(file)
    state = _read_torch(file, key_path) if is_torch else _read_paddle(file, key_path)
    layout, prefix = _detect(state, file, key_path)
    fmt = f"PyTorch {layout}" if is_torch else layout
    tensors = _select(state, prefix)
    target = backbone.state_dict()
    _check(tensors, target, f"{key_path}: {file} ({fmt})")
    backbone.set_state_dict({k: paddle.to_tensor(v, dtype=target[k].dtype)
                             for k, v in tensors.items()})
    logger.info(f"loaded {len(tensors)} backbone tensors from {file} ({fmt})")
    return len(tensors)


def _resolve(path, key_path):
    """The file to read: `path` itself, a folder's `model.pdparams`, or `path` + `.pdparams`."""
    path = str(path)
    if os.path.isdir(path):
        tried = [os.path.join(path, "model.pdparams")]
    else:
        tried = [path] + ([] if path.endswith(".pdparams") else [path + ".pdparams"])
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise CheckpointError(f"{key_path}: no weights at {' or '.join(tried)}; download them there, "
                          f"fix the path, or set {key_path} to null for random init")


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
    try:
        return _unwrap(paddle.load(file, return_numpy=True))
    except Exception as err:
        raise CheckpointError(f"{key_path}: cannot read {file}: {err}") from err


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


def _check(tensors, target, source):
    """Demand exactly the backbone's tensors with its shapes, naming the first offenders."""
    problems = []
    missing = [k for k in target if k not in tensors]
    if missing:
        problems.append(f"missing: {_few(missing)}")
    extra = [k for k in tensors if k not in target]
    if extra:
        problems.append(f"unexpected: {_few(extra)}")
    mismatched = [f"{k} file {list(tensors[k].shape)} vs model {list(target[k].shape)}"
                  for k in target if k in tensors and list(tensors[k].shape) != target[k].shape]
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the backbone: {'; '.join(problems)}; was it "
                              "trained with a different architecture (name, widths or cifar_stem)?")


def _few(items):
    shown = ", ".join(str(item) for item in items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown}, ... ({len(items)} in all)"
