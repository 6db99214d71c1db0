"""Inference over a whole dataset, distributed, returning results in dataset order without padding."""
import numpy as np
import paddle

from ppmoco.distributed import concat_all_gather, world_size
from ppmoco.progress import Progress


def gather_in_order(local, num_samples):
    """Rebuild dataset order from every rank's share and drop the sampler's padding.

    Rank r holds positions r, r + R, r + 2R, ... of the (unshuffled) evaluation order, and every
    position >= num_samples only repeats a sample to even out the ranks.
    """
    gathered = concat_all_gather(paddle.to_tensor(local)).numpy()
    ranks = world_size()
    per_rank = gathered.shape[0] // ranks
    interleaved = gathered.reshape(ranks, per_rank, *gathered.shape[1:]).swapaxes(0, 1)
    return interleaved.reshape(ranks * per_rank, *gathered.shape[1:])[:num_samples]


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
