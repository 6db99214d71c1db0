"""PaddleClas's ResNet (ppcls/arch/backbone/legendary_models/resnet.py, version "vb").

Each conv and its BatchNorm form one `ConvBNLayer` (`.conv`, `.bn`); the stem is `stem.0`; the
blocks of all stages are one flat `blocks` list; a block's convs are `conv0..conv2` and its
projection shortcut is `short`. Loaded by name through `Global.pretrained_model` (fine-tuning) or
`Arch.pretrained`, which skip (and log) names they do not find, so every name must be exact.

PaddleClas's ResNet-18/34 give the first block a 64->64 projection shortcut by default
(`use_first_short_conv=True`), which the standard ResNet has not: `Arch.use_first_short_conv:
False` builds the standard one, which this file fits entirely. ResNet-50/101 must keep the default,
as their first block needs its 64->256 projection (False breaks their forward).
"""
from ppmoco.transfer.target import PADDLE_BN, SHORTCUT, Target, save_pdparams


def _modules(position, arch):
    stage, block, conv = position
    if stage == 0:
        layer = "stem.0"
    else:
        index = sum(arch.layers[:stage - 1]) + block  # `blocks` runs through every stage
        layer = f"blocks.{index}." + ("short" if conv == SHORTCUT else f"conv{conv - 1}")
    return f"{layer}.conv", f"{layer}.bn"


def _usage(arch, dst):
    name = f"ResNet{arch.name[len('resnet'):]}"
    basic = arch.name in ("resnet18", "resnet34")
    arch_line = f"Arch: {{name: {name}, class_num: N" + (", use_first_short_conv: False}" if basic else "}")
    return (f"PaddleClas: Global.pretrained_model={dst} with {arch_line} "
            "(configs/transfer/paddleclas_ResNet50_moco_finetune.yaml)")


TARGET = Target(
    name="paddleclas",
    framework="PaddleClas",
    modules=_modules,
    bn_tensors=PADDLE_BN,
    serialize=save_pdparams,
    usage=_usage,
    suffix=".pdparams",
)
