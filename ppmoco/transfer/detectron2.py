"""detectron2: the `.pkl` facebookresearch/moco's detection/convert-pretrain-to-detectron2.py writes.

`{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}` in plain pickle
(no torch needed): detectron2 reads a `.pkl` with pickle, and `matching_heuristics` makes it match
the names to its ResNet by suffix, as it does for MoCo's own files. Names follow that script's
rules: the stem is `stem.conv1`, layer1-4 are res2-res5, each BatchNorm is its conv's `.norm`,
the projection shortcut is `shortcut`, and PyTorch's BatchNorm tensors stay (counter included).
"""
import pickle

from ppmoco.transfer.target import SHORTCUT, TORCH_BN, TORCH_BN_BUFFERS, Target


def _modules(position, arch):
    stage, block, conv = position
    if stage == 0:
        name = "stem.conv1"
    else:
        name = f"res{stage + 1}.{block}." + ("shortcut" if conv == SHORTCUT else f"conv{conv}")
    return name, f"{name}.norm"


def _save_pickle(state):
    return pickle.dumps({"model": state, "__author__": "ppmoco", "matching_heuristics": True})


def _usage(arch, dst):
    depth = arch.name[len("resnet"):]
    extra = " MODEL.RESNETS.RES2_OUT_CHANNELS 64" if arch.name in ("resnet18", "resnet34") else ""
    return (f"detectron2: MODEL.WEIGHTS {dst} MODEL.RESNETS.DEPTH {depth}{extra} with "
            "configs/transfer/detectron2_pascal_voc_R_50_C4_24k_moco.yaml (STRIDE_IN_1X1 False, RGB input)")


TARGET = Target(
    name="detectron2",
    framework="detectron2",
    modules=_modules,
    bn_tensors=TORCH_BN,
    bn_buffers=TORCH_BN_BUFFERS,
    serialize=_save_pickle,
    usage=_usage,
    suffix=".pkl",
)
