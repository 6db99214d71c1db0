"""ppmoco.metrics against an independent NumPy recomputation: a stable descending argsort."""
import numpy as np
import paddle
import pytest

from ppmoco.metrics import label_ranks, numpy_topk_accuracy, topk_accuracy


def reference_topk(scores, labels, ks):
    """{k: % of rows whose label is among the first k classes of a stable descending sort}."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    hits = order == np.asarray(labels)[:, None]
    return {k: 100.0 * float(hits[:, :k].any(axis=1).mean()) for k in ks}


def tied_scores(seed, rows, classes):
    """Small integer scores, so most rows hold ties, some of them at the label's own score."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=(rows, classes)).astype(np.float32)
    return scores, rng.integers(0, classes, size=rows).astype(np.int64)


KS = (1, 2, 3, 5, 6, 9)  # 6 classes below: k below, at and above the number of classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paddle_version_matches_the_stable_sort_with_ties(seed):
    # Catches ties going to the higher class index (`classes > labels`), counting equal scores
    # as ahead whatever their index (`scores >= own`), and `ranks <= k` instead of `ranks < k`.
    scores, labels = tied_scores(seed, 200, 6)
    got = topk_accuracy(paddle.to_tensor(scores), paddle.to_tensor(labels), ks=KS)
    want = reference_topk(scores, labels, KS)
    assert [float(g) for g in got] == pytest.approx([want[k] for k in KS], abs=1e-4)
    assert all(g.shape == [] and g.dtype == paddle.float32 for g in got)


@pytest.mark.parametrize("seed", [3, 4])
def test_numpy_version_matches_the_stable_sort_exactly(seed):
    # Catches counting in float32 (1/3 of 201 rows is not exact there) and keys not named top{k}.
    scores, labels = tied_scores(seed, 201, 6)
    assert numpy_topk_accuracy(scores, labels, ks=KS) == {f"top{k}": v for k, v in
                                                          reference_topk(scores, labels, KS).items()}


def test_all_equal_scores_rank_every_label_at_its_class_index():
    # Catches any tie rule but "lower class index first" (paddle.topk's order is unspecified).
    ranks = label_ranks(paddle.zeros([4, 4]), paddle.to_tensor([0, 1, 2, 3]))
    assert ranks.numpy().tolist() == [0, 1, 2, 3]
    assert numpy_topk_accuracy(np.zeros((4, 4)), [0, 1, 2, 3], ks=(1, 2, 4)) == {
        "top1": 25.0, "top2": 50.0, "top4": 100.0}


def test_k_above_the_number_of_classes_counts_every_row():
    # Catches a top-k built on paddle.topk(k) (fails for k > classes) or a k clipped to classes - 1.
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    labels = np.array([2, 0])  # both labels score lowest in their row
    got = topk_accuracy(paddle.to_tensor(scores), paddle.to_tensor(labels), ks=(1, 3, 5, 100))
    assert [float(g) for g in got] == [0.0, 100.0, 100.0, 100.0]
    assert numpy_topk_accuracy(scores, labels, ks=(5,)) == {"top5": 100.0}


def test_paddle_version_traces_into_a_static_program():
    # Catches a host read (.numpy(), float(), int()) or a value-dependent branch in the training
    # path: the CPU fast path compiles training_step, metrics included, into a static program.
    scores, labels = tied_scores(5, 32, 6)
    paddle.enable_static()
    try:
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            s = paddle.static.data("scores", [32, 6], "float32")
            y = paddle.static.data("labels", [32], "int64")
            outs = topk_accuracy(s, y, ks=(1, 5))
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        got = exe.run(main, feed={"scores": scores, "labels": labels}, fetch_list=outs)
    finally:
        paddle.disable_static()
    want = reference_topk(scores, labels, (1, 5))
    assert [float(g) for g in got] == pytest.approx([want[1], want[5]], abs=1e-4)
