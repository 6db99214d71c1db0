"""Weighted kNN classification of features, the benchmark of InstDisc (Wu et al. 2018) and mmselfsup.

Every test feature is compared (cosine similarity) with all training features; its k most similar
training samples vote for their labels with weight exp(similarity / temperature), and the classes
are ranked by their summed votes.

Tie rules: training samples with equal similarity are ordered as `paddle.topk` returns them (this
only matters when the tie straddles the k-th place); classes with equal scores are ranked by the
one rule of ppmoco.metrics, lower class index first (a class without votes scores 0, so empty
classes fill the top 5 in index order after the voted ones).
"""
import numpy as np
import paddle
import paddle.nn.functional as F

from ppmoco.metrics import label_ranks
from ppmoco.progress import Progress


def _as_tensor(x, dtype):
    if isinstance(x, paddle.Tensor):
        return x.astype(dtype)
    return paddle.to_tensor(np.asarray(x), dtype=dtype)


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
                 ks=(10, 20, 100, 200), temperature=0.07, chunk_size=256):
    """{k: {"top1": %, "top5": %}} of weighted kNN over the test set, for every k in `ks`.

    Features ([N, D] float, raw: they are L2-normalised here) and labels ([N] int) may be paddle
    Tensors or numpy arrays. Test rows are processed `chunk_size` at a time, so the largest object is
    a [chunk_size, N_train] similarity block. A k above N_train uses all training samples. Top-5 means
    the label is among the min(5, num_classes) best-scored classes and got a vote: a class no
    neighbour voted for never counts (mmselfsup's knn_eval takes the first min(5, k) predictions, the
    same whenever k < 5; with k >= 5 and fewer than 5 classes voted, its order among the unvoted classes
    is torch's unstable sort, which ppmoco does not imitate).
    """
    train_x, test_x = _as_tensor(train_features, "float32"), _as_tensor(test_features, "float32")
    train_y, test_y = _as_tensor(train_labels, "int64"), _as_tensor(test_labels, "int64")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")
    _check_split("train", train_x, train_y, num_classes)
    _check_split("test", test_x, test_y, num_classes)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims, test features {test_x.shape[1]}")
    if not ks or any(k <= 0 for k in ks):
        raise ValueError(f"ks must be non-empty and positive, got {list(ks)}")
    if temperature <= 0 or chunk_size <= 0:
        raise ValueError(f"temperature and chunk_size must be > 0, got {temperature} and {chunk_size}")

    train_x, test_x = F.normalize(train_x, axis=1), F.normalize(test_x, axis=1)
    num_train, num_test = train_x.shape[0], test_x.shape[0]
    used = sorted({min(k, num_train) for k in ks})  # neighbour counts actually evaluated
    top5 = min(5, num_classes)
    hits = {k: [0, 0] for k in used}
    progress = Progress("eval knn: classifying", num_test, brief=True)
    for start in range(0, num_test, chunk_size):
        query, labels = test_x[start:start + chunk_size], test_y[start:start + chunk_size]
        similarity = paddle.matmul(query, train_x, transpose_y=True)
        top_sim, top_idx = paddle.topk(similarity, used[-1], axis=1)
        weights = paddle.exp(top_sim / temperature)
        votes_for = paddle.gather(train_y, top_idx.flatten()).reshape(top_idx.shape)
        scores = paddle.zeros([query.shape[0], num_classes], dtype="float32")
        done = 0
        for k in used:  # grow the vote from the previous k: each neighbour is added once
            scores = paddle.put_along_axis(scores, votes_for[:, done:k], weights[:, done:k], axis=1,
                                           reduce="add")
            done = k
            ranks = label_ranks(scores, labels)
            voted = paddle.take_along_axis(scores, labels.unsqueeze(1), axis=1).squeeze(1) > 0
            hits[k][0] += int((ranks < 1).sum())
            hits[k][1] += int(((ranks < top5) & voted).sum())
        progress.advance(query.shape[0])
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
