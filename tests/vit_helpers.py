"""What the ViT tests share (tests/models/test_vit.py, tests/transfer/test_timm.py)."""
import numpy as np


def randomised(net, seed, spread=0.3):
    """`net` with every LayerNorm weight (uniform 0.5-1.5), bias and the class token (normal, std
    `spread`) far from moco-v3's init (1, 0, ~0), so that a swapped or ignored tensor changes the
    features; in eval mode."""
    rng = np.random.default_rng(seed)
    for name, tensor in net.state_dict().items():
        if name.endswith(".weight") and "norm" in name:
            tensor.set_value(rng.uniform(0.5, 1.5, tensor.shape).astype("float32"))
        elif name.endswith(".bias") or name == "cls_token":
            tensor.set_value(rng.normal(0.0, spread, tensor.shape).astype("float32"))
    net.eval()
    return net
