import numpy as np
import paddle

from ppmoco.feature_layers import LAYERS
from ppmoco.models import pool_stages
from ppmoco.models.pooling import MMSELFSUP_WINDOWS

from optional_deps import torch_or_skip


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


# Catches: a layer pooled from the wrong stage or to the wrong grid, or other sizes not pooled adaptively.
def test_each_layer_pools_its_stage_to_its_grid():
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((2, 3, side, side)).astype("float32") for side in (20, 17, 9, 5, 3)]
    pooled = pool_stages([paddle.to_tensor(m) for m in maps], list(LAYERS))
    assert list(pooled) == list(LAYERS)
    for layer, (index, grid) in LAYERS.items():
        np.testing.assert_allclose(pooled[layer].numpy(), numpy_adaptive_average(maps[index], grid),
                                   rtol=1e-5, atol=1e-6, err_msg=layer)


def numpy_window_average(x, kernel, stride, padding):
    """Average over kernel x kernel windows of the zero-padded map, padding counted (torch's
    AvgPool2d default, count_include_pad=True, which mmselfsup's MultiPooling uses)."""
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cells = (padded.shape[2] - kernel) // stride + 1
    out = np.zeros(x.shape[:2] + (cells, cells), x.dtype)
    for i in range(cells):
        for j in range(cells):
            rows, cols = slice(i * stride, i * stride + kernel), slice(j * stride, j * stride + kernel)
            out[:, :, i, j] = padded[:, :, rows, cols].mean(axis=(2, 3))
    return out


def maps_at(sides, rng):
    return [rng.standard_normal((2, 3, side, side)).astype("float32") for side in sides]


# Catches: mmselfsup's windows not used at the sizes a ResNet gives at 224 px (adaptive pooling has
# other windows there: e.g. 7 -> 2 averages 4 x 4 cells, mmselfsup 6 x 6), the padding left out of the
# average, or a window table that does not give LAYERS' grids.
def test_maps_of_224_px_use_mmselfsups_windows():
    maps = maps_at((112, 56, 28, 14, 7), np.random.default_rng(1))
    pooled = pool_stages([paddle.to_tensor(m) for m in maps], list(MMSELFSUP_WINDOWS))
    for layer, (side, kernel, stride, padding) in MMSELFSUP_WINDOWS.items():
        index, grid = LAYERS[layer]
        expected = numpy_window_average(maps[index], kernel, stride, padding)
        assert expected.shape[2:] == (grid, grid)
        np.testing.assert_allclose(pooled[layer].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=layer)
        assert not np.allclose(expected, numpy_adaptive_average(maps[index], grid), atol=1e-3), layer


# Catches: windows that differ from torch's AvgPool2d with mmselfsup's parameters (needs torch).
def test_windows_equal_torch_avgpool2d():
    torch = torch_or_skip()
    maps = maps_at((112, 56, 28, 14, 7), np.random.default_rng(2))
    pooled = pool_stages([paddle.to_tensor(m) for m in maps], list(MMSELFSUP_WINDOWS))
    for layer, (_, kernel, stride, padding) in MMSELFSUP_WINDOWS.items():
        pool = torch.nn.AvgPool2d(kernel_size=kernel, stride=stride, padding=padding)
        expected = pool(torch.from_numpy(maps[LAYERS[layer][0]])).numpy()
        np.testing.assert_allclose(pooled[layer].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=layer)
