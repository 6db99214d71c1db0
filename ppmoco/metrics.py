"""Top-k accuracy with one tie rule, on paddle tensors (training step) or numpy arrays (evaluation).

Tie rule: a row's classes are ranked by score, highest first, and classes with equal scores rank
lower class index first; this is the order of a stable descending sort
(`np.argsort(-scores, kind="stable")`). A row is a top-k hit when its label ranks below k, so a k
at or above the number of classes counts every row. Unlike `paddle.topk`, whose order among equal
values is unspecified, the rule is the same on every device and in every execution mode.

The ranking is computed once, in paddle (`label_ranks`); numpy callers go through it too, so the
training step, the linear probe and the kNN benchmark (ppmoco/eval/knn.py) cannot disagree.
"""
import numpy as np
import paddle


def label_ranks(scores, labels):
    """Rank of each row's label among its classes under the tie rule (0 = the predicted class).

    `scores` [N, C] and integer `labels` [N] are paddle Tensors; returns int64 [N]. Counts the
    classes ahead of the label instead of sorting: paddle ops only, no host read and no branch on a
    value, so it traces into the static program of the CPU fast path.
    """
    own = paddle.take_along_axis(scores, labels.unsqueeze(1), axis=1)
    classes = paddle.arange(scores.shape[1], dtype=labels.dtype).unsqueeze(0)
    ahead = (scores > own) | ((scores == own) & (classes < labels.unsqueeze(1)))
    return ahead.astype("int64").sum(axis=1)


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percent of rows whose label is a top-k hit, for each k in `ks`: 0-d float32 tensors.

    For the training step: the results stay on the device (no host sync), to be summed and read
    when a log line is written.
    """
    ranks = label_ranks(scores, labels)
    return [(ranks < k).astype("float32").mean() * 100.0 for k in ks]


def numpy_topk_accuracy(scores, labels, ks=(1, 5)):
    """{"top1": %, "top5": %} (a key per k in `ks`) as Python floats, from numpy arrays.

    For evaluation over a whole dataset: every row counted once, the hit rate computed in float64
    so it does not depend on the number of rows the way a float32 mean would.
    """
    ranks = label_ranks(paddle.to_tensor(np.asarray(scores)),
                        paddle.to_tensor(np.asarray(labels), dtype="int64")).numpy()
    return rank_accuracy(ranks, ks)


def rank_accuracy(ranks, ks=(1, 5)):
    """numpy_topk_accuracy's result from `label_ranks`' ranks (a numpy array): for an evaluation
    that keeps each row's rank rather than its [C] scores."""
    ranks = np.asarray(ranks)
    return {f"top{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}
