"""Collectives shared by methods and the engine: rank-ordered all-gather, shuffle BN, grad averaging,
BatchNorm over the global batch.

With one process every helper degenerates to the identity/local case, so the methods call them
unconditionally and the single-process path is the same code as the multi-process one.
"""
import paddle
import paddle.distributed as dist
import paddle.nn as nn


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


@paddle.no_grad()
def concat_all_gather(tensor):
    """Concatenate `tensor` from every rank along axis 0, in rank order (no gradient)."""
    if world_size() == 1:
        return tensor
    parts = []
    dist.all_gather(parts, tensor)
    return paddle.concat(parts, axis=0)


@paddle.no_grad()
def batch_shuffle(x):
    """Shuffle the global batch across ranks; return this rank's share and the undo index.

    The permutation is drawn on every rank (so RNG streams stay aligned) and rank 0's wins.
    """
    x_all = concat_all_gather(x)
    perm = paddle.randperm(x_all.shape[0])
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    mine = perm.reshape([world_size(), -1])[rank()]
    return paddle.gather(x_all, mine, axis=0), paddle.argsort(perm)


@paddle.no_grad()
def batch_unshuffle(x, idx_unshuffle):
    """Inverse of `batch_shuffle`: every row returns to the rank and position it came from."""
    x_all = concat_all_gather(x)
    mine = idx_unshuffle.reshape([world_size(), -1])[rank()]
    return paddle.gather(x_all, mine, axis=0)


def sync_batchnorm(layer):
    """`layer` with its BatchNorms as SyncBatchNorm (statistics over the global batch) where several GPU
    processes train, else `layer` unchanged: Paddle's SyncBatchNorm runs on GPUs only, so CPU processes
    normalise their own batches. The converted layers share the parameters and statistics of the ones
    they replace (their stop_gradient included) and keep their names."""
    if world_size() > 1 and paddle.device.get_device().startswith("gpu"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(layer)
    return layer


def all_reduce_mean(tensors):
    """Average a list of tensors over ranks (in place): one fused all-reduce per dtype, since mixed
    precision leaves float16/bfloat16 gradients next to the float32 ones of normalisation layers."""
    n = world_size()
    if n == 1 or not tensors:
        return
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = paddle.concat([t.reshape([-1]) for t in group])
        dist.all_reduce(flat)
        flat = flat / n
        offset = 0
        for t in group:
            size = t.size
            paddle.assign(flat[offset:offset + size].reshape(t.shape), t)
            offset += size
