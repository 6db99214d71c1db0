"""Inference over a whole dataset, distributed, returning results in dataset order without padding."""
import numpy as np
import paddle

from ppmoco.distributed import concat_all_gather, world_size
from ppmoco.progress import Progress

# The most bytes one all-gather of gather_in_order brings to each device: a kNN memory bank gathered
# whole (ImageNet's 1.28M 2048-d features are 10.5 GB) would not fit beside training on a 16 GB GPU.
GATHER_BYTES = 256 << 20


def gather_in_order(local, num_samples, gather_bytes=None):
    """Rebuild dataset order from every rank's share and drop the sampler's padding.

    Rank r holds positions r, r + R, r + 2R, ... of the (unshuffled) evaluation order, and every
    position >= num_samples only repeats a sample to even out the ranks. Every rank holds as many rows
    (the sampler pads them even), gathered in row blocks of at most `gather_bytes` over all ranks and
    assembled on the host: the whole array is never on a device. `gather_bytes` None reads GATHER_BYTES.
    """
    local = np.asarray(local)
    gather_bytes = GATHER_BYTES if gather_bytes is None else gather_bytes
    ranks = world_size()
    if ranks == 1:
        return local[:num_samples]
    per_rank, row_shape = local.shape[0], local.shape[1:]
    row_bytes = max(1, local.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64)))
    rows = max(1, gather_bytes // (ranks * row_bytes))
    interleaved = np.empty((per_rank, ranks, *row_shape), dtype=local.dtype)
    # Every rank runs the same blocks in the same order (same per_rank and row size): collectives match.
    for start in range(0, max(per_rank, 1), rows):
        stop = min(start + rows, per_rank)
        gathered = concat_all_gather(paddle.to_tensor(local[start:stop])).numpy()
        interleaved[start:stop] = gathered.reshape(ranks, stop - start, *row_shape).swapaxes(0, 1)
    return interleaved.reshape(per_rank * ranks, *row_shape)[:num_samples]


@paddle.no_grad()
def predict_dataset(step, loader, sampler, dataset, name="inference"):
    """Apply `step(batch) -> {name: [B, ...] tensor}` to every sample; {name: np.ndarray [N, ...]}.

    Progress lines (rate, ETA) are logged under `name`, counting this rank's share of the images.
    """
    if sampler.shuffle or sampler.drop_last:
        raise ValueError("evaluation needs an unshuffled sampler without drop_last")
    dataset.set_epoch(0)
    sampler.set_epoch(0)
    parts = {}
    progress = Progress(name, sampler.num_samples)
    for batch in loader:
        for key, value in step(batch).items():
            parts.setdefault(key, []).append(value.numpy())
        progress.advance(batch[0].shape[0])
    return {key: gather_in_order(np.concatenate(chunks), len(dataset)) for key, chunks in parts.items()}
