"""What the transfer tests share: ppmoco backbones with realistic weights, their features, and the
key lists of the real frameworks' classes (reference_keys/, see dump_reference_keys.py)."""
import json
import os
from typing import Dict, List, NamedTuple

import numpy as np
import paddle

from ppmoco.models.resnet import Architecture

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIZE = 224  # the size these networks are used at: a stem or stride error shows at full resolution
IMAGE_SEED = 7  # every backbone is evaluated on the same two images


def reference_keys(framework, model):
    """{name: shape} of `model` (e.g. "ResNet(depth=50)") in reference_keys/<framework>.json."""
    with open(os.path.join(HERE, "reference_keys", f"{framework}.json"), encoding="utf-8") as f:
        return json.load(f)["models"][model]


def without_classifier(keys):
    """A framework's key list without its `fc` classifier, which no converted file holds."""
    return {name: shape for name, shape in keys.items() if not name.startswith("fc.")}


def shapes(state):
    return {name: list(np.shape(value)) for name, value in state.items()}


def arch_shapes(arch):
    """{name: shape} of ppmoco's `arch`, in its state dict's order."""
    with paddle.LazyGuard():
        return {name: list(value.shape) for name, value in arch.build().state_dict().items()}


def placeholder_tensors(arch):
    """Every tensor of ppmoco's `arch` as its own zero array: for names, shapes and where each goes."""
    return {name: np.zeros(shape, "float32") for name, shape in arch_shapes(arch).items()}


def random_tensors(arch, seed):
    """Every tensor of ppmoco's `arch`, random and distinct (positive variances), as numpy arrays."""
    names = arch_shapes(arch)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in names.items():
        value = rng.standard_normal(shape).astype("float32")
        tensors[name] = np.abs(value) + 0.5 if name.endswith("_variance") else value
    return tensors


class Pretrained(NamedTuple):
    """A ppmoco backbone saved as a MoCo checkpoint, with its eval-mode outputs on `images`."""

    checkpoint: str  # a ppmoco MoCo checkpoint file: query and key encoders, head, queue
    tensors: Dict[str, np.ndarray]  # the query encoder's backbone, ppmoco names
    images: np.ndarray
    features: np.ndarray  # pooled, [N, C]
    stages: List[np.ndarray]  # res2..res5 feature maps


def realistic_backbone(name, folder, seed):
    """ppmoco's `name` with BatchNorm weights and statistics far from their defaults, saved as a
    MoCo checkpoint whose key encoder and head differ from the backbone (they must be dropped)."""
    paddle.seed(seed)
    net = Architecture(name).build()
    rng = np.random.default_rng(seed)
    residual_ends = {id(bn) for bn in _residual_branch_ends(net)}
    for bn in net.sublayers():
        if not isinstance(bn, paddle.nn.BatchNorm2D):
            continue
        # Weight and bias unlike each other and unlike 1 and 0, so a swap or a default changes the
        # output. Small weights end each residual branch, as in trained ResNets: with weights near 1
        # there, 16 blocks' sums amplify float32 rounding to ~7e-5 in either framework alone
        # (measured against a float64 forward), which would hide a real difference.
        low, high = (0.1, 0.5) if id(bn) in residual_ends else (0.5, 1.5)
        bn.weight.set_value(rng.uniform(low, high, bn.weight.shape).astype("float32"))
        bn.bias.set_value(rng.normal(0.0, 0.2, bn.bias.shape).astype("float32"))
        bn._momentum = 0.0  # one training pass sets the running statistics to that batch's
    net.train()
    with paddle.no_grad():
        net(paddle.to_tensor(rng.standard_normal([4, 3, IMAGE_SIZE, IMAGE_SIZE]).astype("float32")))
    net.eval()
    images = np.random.default_rng(IMAGE_SEED).standard_normal([2, 3, IMAGE_SIZE, IMAGE_SIZE]).astype("float32")
    with paddle.no_grad():
        stages = net.forward_stages(paddle.to_tensor(images))
        features = stages[-1].mean(axis=[2, 3]).numpy()  # what ResNet.forward returns
    tensors = {k: v.numpy() for k, v in net.state_dict().items()}
    checkpoint = os.path.join(folder, f"{name}_moco.pdparams")
    state = {f"encoder_q.backbone.{k}": v for k, v in tensors.items()}
    state.update({f"encoder_k.backbone.{k}": v + 1.0 for k, v in tensors.items()})
    state.update({"encoder_q.head.fc.0.weight": rng.standard_normal([net.out_dim, 8]).astype("float32"),
                  "queue": rng.standard_normal([8, 16]).astype("float32"), "queue_ptr": np.zeros([1], "int64")})
    paddle.save(state, checkpoint)
    return Pretrained(checkpoint, tensors, images, features, [stage.numpy() for stage in stages[1:]])


def _residual_branch_ends(net):
    """The BatchNorm before each block's sum: bn3 of a bottleneck block, bn2 of a basic one."""
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in stage:
            yield [layer for name, layer in block.named_children() if name.startswith("bn")][-1]
