"""What every conversion target shares: the backbone's structure, and how a key map renames it.

A target never sees ppmoco's key strings. The architecture inferred from the weights gives each
conv + BatchNorm pair a position (stage, block, conv); a target's key map names the two modules at
that position in its framework, and the tensors move across under those names. Mapping by
structure means a target can only be wrong in how it names a position, which its tests pin down
against the framework's real classes.
"""
import io
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np
import paddle

from ppmoco.errors import CheckpointError
from ppmoco.models.resnet import STANDARD_WIDTHS, Architecture

SHORTCUT = 0  # Position.conv of a block's projection shortcut (ppmoco's `downsample`)
# BatchNorm tensors in ppmoco's (Paddle's) names, in the order targets list theirs.
PADDLE_BN = ("weight", "bias", "_mean", "_variance")
TORCH_BN = ("weight", "bias", "running_mean", "running_var")
# The counter PyTorch's BatchNorm keeps next to them (a strict load_state_dict wants it).
TORCH_BN_BUFFERS = {"num_batches_tracked": np.array(0, dtype=np.int64)}


class Position(NamedTuple):
    """Where a conv + BatchNorm pair sits in a ResNet."""

    stage: int  # 0: the stem; 1-4: ppmoco's layer1-4, which detection frameworks call res2-res5
    block: int  # index of the block in its stage (0 for the stem)
    conv: int  # 1-3: the block's convs in order (the stem's is 1); SHORTCUT: its projection


def positions(arch):
    """Every conv + BatchNorm pair of ppmoco's ResNet `arch`, in its state dict's order."""
    with paddle.LazyGuard():  # the structure only: no memory, no initialisation
        net = arch.build()
    found = [Position(0, 0, 1)]
    for stage in (1, 2, 3, 4):
        for index, block in enumerate(getattr(net, f"layer{stage}")):
            convs = sum(1 for name, _ in block.named_children() if name.startswith("conv"))
            found += [Position(stage, index, conv) for conv in range(1, convs + 1)]
            if block.downsample is not None:
                found.append(Position(stage, index, SHORTCUT))
    return found


def paddle_vision_modules(position, arch):
    """(conv, BatchNorm) module names of paddle.vision's ResNet, torchvision's and ppmoco's own."""
    stage, block, conv = position
    if stage == 0:
        return "conv1", "bn1"
    prefix = f"layer{stage}.{block}"
    if conv == SHORTCUT:
        return f"{prefix}.downsample.0", f"{prefix}.downsample.1"
    return f"{prefix}.conv{conv}", f"{prefix}.bn{conv}"


def save_pdparams(state):
    """A `.pdparams` as Paddle's frameworks write them: paddle.save of a dict of Tensors."""
    buffer = io.BytesIO()
    paddle.save({name: paddle.to_tensor(value) for name, value in state.items()}, buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class Target:
    """One framework's checkpoint format: its key map, what it can hold and how it is written."""

    name: str  # the value of `tools/convert.py --to`
    framework: str  # who loads the file, for messages
    modules: Callable  # (Position, Architecture) -> (conv module name, BatchNorm module name)
    bn_tensors: Tuple[str, str, str, str]  # its names of PADDLE_BN, in that order
    serialize: Callable  # {name: numpy array} -> the file's bytes
    usage: Callable  # (Architecture, output path) -> how its framework loads the file (printed)
    bn_buffers: Dict[str, object] = field(default_factory=dict)  # extra per-BatchNorm entries it expects
    suffix: Optional[str] = None  # the file ending its loader needs, if any
    standard_only: bool = True  # holds only the published widths and the 7x7 ImageNet stem
    refused: Dict[str, str] = field(default_factory=dict)  # ARCHS name -> why it cannot hold that depth
    requires: Callable = lambda: None  # raises when a package writing the file needs is missing

    def check(self, arch, src):
        """Refuse an architecture this framework's ResNet cannot reproduce exactly."""
        if not isinstance(arch, Architecture):  # a ViT (ppmoco.models.vit)
            raise CheckpointError(f"--to {self.name}: {src} is a {arch}, but {self.framework} holds ResNets only; "
                                  "use --to timm (timm's VisionTransformer)")
        if self.standard_only and not arch.standard:
            raise CheckpointError(
                f"--to {self.name}: {src} is a {arch}, but {self.framework} builds ResNets with widths "
                f"{list(STANDARD_WIDTHS)} and the 7x7 ImageNet stem only; use --to torchvision (torchvision "
                "names, for a PyTorch ResNet built with the same widths and stem) or, in Paddle, "
                "ppmoco.load_backbone")
        if arch.name in self.refused:
            raise CheckpointError(f"--to {self.name}: {src} is a {arch}; {self.refused[arch.name]}")

    def convert(self, tensors, arch):
        """{this framework's name: array} from ppmoco-named `tensors` of architecture `arch`."""
        out = {}
        for position in positions(arch):
            ours_conv, ours_bn = paddle_vision_modules(position, arch)
            conv, bn = self.modules(position, arch)
            out[f"{conv}.weight"] = tensors[f"{ours_conv}.weight"]
            for ours, theirs in zip(PADDLE_BN, self.bn_tensors):
                out[f"{bn}.{theirs}"] = tensors[f"{ours_bn}.{ours}"]
            for name, value in self.bn_buffers.items():
                out[f"{bn}.{name}"] = np.array(value)  # a copy each: a loader may write into one
        return out
