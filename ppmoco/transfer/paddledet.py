"""PaddleDetection's ResNet backbone (ppdet/modeling/backbones/resnet.py, variant "b").

Each conv and its BatchNorm form one `ConvNormLayer` (`.conv`, `.norm`); the stem is
`conv1.conv1`; stage N is `resN` and its blocks `resNa, resNb, ...` (ResNet-101's 23-block res4:
`res4a, res4b1 .. res4b22`); a block's convs are `branch2a..branch2c` and its projection shortcut
is `short`. Variant "b" strides the 3x3 conv, like ppmoco. `pretrain_weights` matches a file's
names to the model's by suffix, so bare backbone names load into any detector's `backbone.`.

Its ResNet-18/34 always give block res2a a 64->64 projection shortcut (no option turns it off),
which the standard ResNet has not: no file can make them compute a ppmoco ResNet-18/34.
"""
from ppmoco.transfer.target import PADDLE_BN, SHORTCUT, Target, save_pdparams

_LONG_STAGE = 10  # a res4 with more blocks than this numbers them b1, b2, ... after `a`


def _block_name(stage_name, count, index):
    if stage_name == "res4" and count > _LONG_STAGE and index > 0:
        return f"{stage_name}b{index}"
    return stage_name + chr(ord("a") + index)


def _modules(position, arch):
    stage, block, conv = position
    if stage == 0:
        layer = "conv1.conv1"
    else:
        stage_name = f"res{stage + 1}"
        branch = "short" if conv == SHORTCUT else "branch2" + "abc"[conv - 1]
        layer = f"{stage_name}.{_block_name(stage_name, arch.layers[stage - 1], block)}.{branch}"
    return f"{layer}.conv", f"{layer}.norm"


def _usage(arch, dst):
    return (f"PaddleDetection: pretrain_weights: {dst} with ResNet: {{depth: {arch.name[len('resnet'):]}, "
            "variant: b, freeze_at: -1, freeze_norm: false}, norm_type: sync_bn "
            "(configs/transfer/paddledet_mask_rcnn_r50_fpn_1x_coco_moco.yml)")


_SHORTCUT_RES2A = ("PaddleDetection's ResNet-18/34 always give block res2a a 64->64 projection shortcut "
                   "(res2.res2a.short, no option removes it) that this network lacks, so no file can make them "
                   "compute its features; convert a ResNet-50/101, or use --to paddle-vision / --to torchvision")

TARGET = Target(
    name="paddledet",
    framework="PaddleDetection",
    modules=_modules,
    bn_tensors=PADDLE_BN,
    serialize=save_pdparams,
    usage=_usage,
    suffix=".pdparams",
    refused={"resnet18": _SHORTCUT_RES2A, "resnet34": _SHORTCUT_RES2A},
)
