import numpy as np
import paddle

from ppmoco.feature_layers import LAYERS
from ppmoco.models import pool_stages


def numpy_adaptive_average(x, grid):
    """Adaptive average pooling by its definition: cell i spans [floor(i*H/g), ceil((i+1)*H/g))."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, grid, grid), x.dtype)
    for i in range(grid):
        for j in range(grid):
            rows = slice(i * h // grid, -(-(i + 1) * h // grid))
            cols = slice(j * w // grid, -(-(j + 1) * w // grid))
            out[:, :, i, j] = x[:, :, rows, cols].mean(axis=(2, 3))
    return out


# Catches: a layer pooled from the wrong stage or to the wrong grid, or any size not pooled adaptively.
def test_each_layer_pools_its_stage_to_its_grid():
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((2, 3, side, side)).astype("float32") for side in (20, 17, 9, 5, 3)]
    pooled = pool_stages([paddle.to_tensor(m) for m in maps], list(LAYERS))
    assert list(pooled) == list(LAYERS)
    for layer, (index, grid) in LAYERS.items():
        np.testing.assert_allclose(pooled[layer].numpy(), numpy_adaptive_average(maps[index], grid),
                                   rtol=1e-5, atol=1e-6, err_msg=layer)
