"""The backbone's stage maps pooled to the feature layers of ppmoco/feature_layers.py, as mmselfsup does.

One implementation for everything that reads per-layer features: the SVM benchmarks
(ppmoco/eval/features.py) and the multi-head linear probe (ppmoco/modules/mhead_linear.py).

mmselfsup's benchmarks (svm_voc07.py, resnet50_multihead.py: MultiPooling with pool_type 'specified')
average the maps a ResNet gives at 224 px (stem 112 px, before the max-pool; res2..res5 56, 28, 14,
7) with fixed windows, MMSELFSUP_WINDOWS, chosen to give the grids of LAYERS (12, 6, 4, 3, 2 cells a
side); torch's AvgPool2d counts the zero padding in the average (count_include_pad). ppmoco uses
those windows wherever a map has that size, and pools any other size adaptively to the same grid, so
every input size gives the same dimensions (ResNet-50: 9216, 9216, 8192, 9216, 8192).
"""
import paddle.nn.functional as F

from ppmoco.feature_layers import LAYERS

# What a layer's features are; cached features (ppmoco/eval/features.py) are keyed by it. Raise it when
# pool_stages or ResNet.forward_stages change them (2: mmselfsup's windows, the stem before the max-pool).
POOLING_VERSION = 2
# layer -> (map side at 224 px, kernel, stride, padding): mmselfsup's MultiPooling.POOL_PARAMS['resnet50'].
MMSELFSUP_WINDOWS = {"feat1": (112, 10, 10, 4), "feat2": (56, 16, 8, 0), "feat3": (28, 13, 5, 0),
                     "feat4": (14, 8, 3, 0), "feat5": (7, 6, 1, 0)}


def pool_stages(maps, layers):
    """{layer: [N, C, g, g] tensor} for each of `layers` from the [stem, res2, ..., res5] maps of one
    batch: stage LAYERS[layer][0] average-pooled to a g x g grid (g = LAYERS[layer][1]), with
    mmselfsup's windows where the map has their size, else adaptively."""
    pooled = {}
    for layer in layers:
        index, grid = LAYERS[layer]
        x = maps[index]
        window = MMSELFSUP_WINDOWS.get(layer)
        if window is not None and list(x.shape[2:]) == [window[0], window[0]]:  # static shapes: known sizes
            pooled[layer] = F.avg_pool2d(x, window[1], stride=window[2], padding=window[3], exclusive=False)
        else:
            pooled[layer] = F.adaptive_avg_pool2d(x, grid)
    return pooled
