"""Pictures of what the augmentation makes of the data: each image beside its augmented views."""
import numpy as np
from PIL import Image

_GAP = 2  # pixels between cells


def _cell(pixels, size):
    """uint8 HWC pixels scaled to a `size` x `size` cell (nearest: tiny images stay crisp)."""
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.NEAREST))


def spread_indices(length, count):
    """`count` sample indices (at most `length`) spread evenly over a dataset of `length`."""
    count = min(count, length)
    return [i * length // count for i in range(count)]


def view_grid(dataset, indices, size=96):
    """uint8 RGB grid: a row per sample index, the decoded image then each of its views.

    Views are the dataset's own (seeded per epoch and index, as training sees them), undone from
    NormalizeImage back to pixels; every pipeline ends with NormalizeImage then ToCHWImage.
    """
    normalize = dataset.transform.ops[-2]
    rows = []
    for index in indices:
        image, _ = dataset.load(index)
        views = dataset[index][:-1]
        cells = [_cell(np.asarray(image), size)]
        cells += [_cell(normalize.invert(np.transpose(view, (1, 2, 0))), size) for view in views]
        rows.append(cells)
    columns = len(rows[0])
    grid = np.full((len(rows) * (size + _GAP) - _GAP, columns * (size + _GAP) - _GAP, 3), 255, np.uint8)
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            grid[r * (size + _GAP):r * (size + _GAP) + size, c * (size + _GAP):c * (size + _GAP) + size] = cell
    return grid
