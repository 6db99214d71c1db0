"""Weighted kNN classification of features, the benchmark of InstDisc (Wu et al. 2018) and mmselfsup.

Every test feature is compared (cosine similarity) with all training features; its k most similar
training samples vote for their labels with weight exp(similarity / temperature), and the classes
are ranked by their summed votes.

Tie rules: training samples with equal similarity are ordered as `paddle.topk` returns them (this
only matters when the tie straddles the k-th place); classes with equal scores are ranked by the
one rule of ppmoco.metrics, lower class index first (a class without votes scores 0, so empty
classes fill the top 5 in index order after the voted ones).

Memory: the training features (the memory bank) stay where the caller holds them: the Evaluator's are
host (numpy) arrays, and a 2048-d bank of ImageNet's 1.28M images is 10.5 GB, more than a 16 GB GPU
spares next to training. They reach the device one block of at most `bank_block_bytes` (float32) at a
time, each block normalised there and compared with every test image, each test image keeping its k
best neighbours so far; a bank within one block (up to BANK_BLOCK_BYTES: CIFAR, ImageNet-100 at 2048-d)
is one block, the computation this function always made. Blocks are the same wherever the bank lives
(a host array or a device tensor), so where it lives never changes a result.
"""
import numpy as np
import paddle
import paddle.nn.functional as F

from ppmoco.metrics import label_ranks
from ppmoco.progress import Progress

# The most float32 bytes of the memory bank on the device at once: its upload, normalised copy and
# one [chunk_size, rows] similarity block then stay near 2 GB on a GPU whatever the bank's size.
BANK_BLOCK_BYTES = 1 << 30


def _as_tensor(x, dtype):
    if isinstance(x, paddle.Tensor):
        return x.astype(dtype)
    return paddle.to_tensor(np.asarray(x), dtype=dtype)


def bank_blocks(num_train, dim, block_bytes=BANK_BLOCK_BYTES):
    """[(start, stop)] of the bank's rows, each block at most `block_bytes` of float32 (one row at least)."""
    rows = max(1, block_bytes // (4 * max(dim, 1)))
    return [(start, min(start + rows, num_train)) for start in range(0, num_train, rows)]


def _merge_neighbours(best, candidates, k):
    """The k most similar of two (similarity, bank index) sets of one chunk of test rows; `best` None
    at the first block."""
    if best is None:
        return candidates
    similarity = paddle.concat([best[0], candidates[0]], axis=1)
    index = paddle.concat([best[1], candidates[1]], axis=1)
    top_sim, position = paddle.topk(similarity, min(k, similarity.shape[1]), axis=1)
    return top_sim, paddle.take_along_axis(index, position, axis=1)


def nearest_neighbours(train_x, test_x, k, chunk_size, block_bytes=BANK_BLOCK_BYTES, progress=None):
    """[(similarities [c, k'], bank indices [c, k'])] per chunk of `chunk_size` rows of the normalised
    test features `test_x` (a device tensor): their k' = min(k, N_train) most similar rows of the raw
    bank `train_x` ([N_train, D] numpy array or tensor, left where it is), best first.

    The bank is visited in bank_blocks: each block is copied to the device and normalised once, and
    every chunk's best neighbours are merged with the block's. With one block this is exactly
    `topk(normalize(test) @ normalize(bank).T)` per chunk."""
    chunks = list(range(0, test_x.shape[0], chunk_size))
    best = [None] * len(chunks)
    for start, stop in bank_blocks(train_x.shape[0], train_x.shape[1], block_bytes):
        # A slice of a host array is the only copy of the bank on the device (dropped after the block).
        block = F.normalize(_as_tensor(train_x[start:stop], "float32"), axis=1)
        for i, row in enumerate(chunks):
            query = test_x[row:row + chunk_size]
            similarity = paddle.matmul(query, block, transpose_y=True)
            top_sim, top_idx = paddle.topk(similarity, min(k, stop - start), axis=1)
            if start:
                top_idx = top_idx + start
            best[i] = _merge_neighbours(best[i], (top_sim, top_idx), k)
            if progress is not None:
                progress.advance(query.shape[0])
        del block
    return best


def _check_split(name, features, labels, num_classes):
    if features.ndim != 2 or labels.ndim != 1:
        raise ValueError(f"{name}: features must be [N, D] and labels [N], got "
                         f"{list(features.shape)} and {list(labels.shape)}")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: {features.shape[0]} features but {labels.shape[0]} labels")
    if features.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name}: labels span [{low}, {high}], outside [0, {num_classes})")


@paddle.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, num_classes,
                 ks=(10, 20, 100, 200), temperature=0.07, chunk_size=256, bank_block_bytes=BANK_BLOCK_BYTES):
    """{k: {"top1": %, "top5": %}} of weighted kNN over the test set, for every k in `ks`.

    Features ([N, D] float, raw: they are L2-normalised here) and labels ([N] int) may be paddle
    Tensors or numpy arrays. Test rows are processed `chunk_size` at a time against blocks of at most
    `bank_block_bytes` of training features (see the module docstring: the training features are never
    copied whole to the device), so the largest objects are a block and a [chunk_size, rows of a block]
    similarity block. A k above N_train uses all training samples. Top-5 means
    the label is among the min(5, num_classes) best-scored classes and got a vote: a class no
    neighbour voted for never counts (mmselfsup's knn_eval takes the first min(5, k) predictions, the
    same whenever k < 5; with k >= 5 and fewer than 5 classes voted, its order among the unvoted classes
    is torch's unstable sort, which ppmoco does not imitate).
    """
    # The training features stay where they are (see nearest_neighbours); the rest go to the device.
    train_x = train_features if isinstance(train_features, paddle.Tensor) else np.asarray(train_features)
    test_x = _as_tensor(test_features, "float32")
    train_y, test_y = _as_tensor(train_labels, "int64"), _as_tensor(test_labels, "int64")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")
    _check_split("train", train_x, train_y, num_classes)
    _check_split("test", test_x, test_y, num_classes)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims, test features {test_x.shape[1]}")
    if not ks or any(k <= 0 for k in ks):
        raise ValueError(f"ks must be non-empty and positive, got {list(ks)}")
    if temperature <= 0 or chunk_size <= 0 or bank_block_bytes <= 0:
        raise ValueError(f"temperature, chunk_size and bank_block_bytes must be > 0, got {temperature}, "
                         f"{chunk_size} and {bank_block_bytes}")

    test_x = F.normalize(test_x, axis=1)
    num_train, num_test = train_x.shape[0], test_x.shape[0]
    used = sorted({min(k, num_train) for k in ks})  # neighbour counts actually evaluated
    top5 = min(5, num_classes)
    hits = {k: [0, 0] for k in used}
    blocks = len(bank_blocks(num_train, train_x.shape[1], bank_block_bytes))
    progress = Progress("eval knn: classifying" + (f" against {blocks} bank blocks" if blocks > 1 else ""),
                        num_test * blocks, unit="images" if blocks == 1 else "image-blocks", brief=True)
    neighbours = nearest_neighbours(train_x, test_x, used[-1], chunk_size, bank_block_bytes, progress)
    for start, (top_sim, top_idx) in zip(range(0, num_test, chunk_size), neighbours):
        labels = test_y[start:start + chunk_size]
        weights = paddle.exp(top_sim / temperature)
        votes_for = paddle.gather(train_y, top_idx.flatten()).reshape(top_idx.shape)
        scores = paddle.zeros([labels.shape[0], num_classes], dtype="float32")
        done = 0
        for k in used:  # grow the vote from the previous k: each neighbour is added once
            scores = paddle.put_along_axis(scores, votes_for[:, done:k], weights[:, done:k], axis=1,
                                           reduce="add")
            done = k
            ranks = label_ranks(scores, labels)
            voted = paddle.take_along_axis(scores, labels.unsqueeze(1), axis=1).squeeze(1) > 0
            hits[k][0] += int((ranks < 1).sum())
            hits[k][1] += int(((ranks < top5) & voted).sum())
    return {k: {"top1": 100.0 * hits[min(k, num_train)][0] / num_test,
                "top5": 100.0 * hits[min(k, num_train)][1] / num_test} for k in ks}


def flatten_knn(results):
    """knn_classify's {k: {"top1", "top5"}} as one flat {"k20_top1": %, ...}, in the same order.

    The Engine logs flat results by name (VisualDL tag `eval/knn_k20_top1`) and looks its monitor
    up among them, so it needs no knowledge of kNN's nesting.
    """
    return {f"k{k}_{metric}": value for k, values in results.items() for metric, value in values.items()}


def nest_knn(flat):
    """The inverse of flatten_knn: {"k20_top1": %} -> {20: {"top1": %}}, order kept."""
    nested = {}
    for name, value in flat.items():
        k, _, metric = name.partition("_")
        nested.setdefault(int(k[1:]), {})[metric] = value
    return nested


def format_knn(results):
    """One log line per k, ascending: `knn k=20 top1=97.11 top5=99.78`."""
    return [f"knn k={k} top1={results[k]['top1']:.2f} top5={results[k]['top5']:.2f}"
            for k in sorted(results)]
