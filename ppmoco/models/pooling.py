"""The backbone's stage maps pooled to the feature layers of ppmoco/feature_layers.py.

One implementation for everything that reads per-layer features: the SVM benchmarks
(ppmoco/eval/features.py) and the multi-head linear probe (ppmoco/modules/mhead_linear.py).
"""
import paddle.nn.functional as F

from ppmoco.feature_layers import LAYERS


def pool_stages(maps, layers):
    """{layer: [N, C, g, g] tensor} for each of `layers` from the [stem, res2, ..., res5] maps of one
    batch: stage LAYERS[layer][0] average-pooled adaptively to a g x g grid (g = LAYERS[layer][1]),
    so every input size gives the same dimensions."""
    return {layer: F.adaptive_avg_pool2d(maps[LAYERS[layer][0]], LAYERS[layer][1]) for layer in layers}
