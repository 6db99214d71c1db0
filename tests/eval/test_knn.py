"""Weighted kNN against an independent brute-force numpy reference and hand-checked cases."""
import math

import numpy as np
import paddle
import pytest

from ppmoco.eval.knn import format_knn, knn_classify


def reference_knn(train_x, train_y, test_x, test_y, num_classes, ks, temperature):
    """Whole similarity matrix, stable sorts: equal class scores rank lower class index first; a
    class without a vote is never a top-5 hit."""
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    similarity = test.astype(np.float64) @ train.astype(np.float64).T
    order = np.argsort(-similarity, axis=1, kind="stable")
    rows = np.arange(len(test))[:, None]
    results = {}
    for k in ks:
        neighbours = order[:, :min(k, len(train))]
        weights = np.exp(similarity[rows, neighbours] / temperature)
        scores = np.zeros((len(test), num_classes))
        np.add.at(scores, (np.broadcast_to(rows, neighbours.shape), train_y[neighbours]), weights)
        ranking = np.argsort(-scores, axis=1, kind="stable")
        results[k] = {"top1": 100.0 * np.mean(ranking[:, 0] == test_y),
                      "top5": 100.0 * np.mean((ranking[:, :5] == test_y[:, None]).any(axis=1)
                                              & (scores[np.arange(len(test)), test_y] > 0))}
    return results


def random_split(rng, n, dim, num_classes):
    """Raw features of varied norms (the function must normalise them) and random labels."""
    features = rng.normal(size=(n, dim)) * rng.uniform(0.1, 10.0, size=(n, 1))
    return features.astype(np.float32), rng.integers(0, num_classes, size=n).astype(np.int64)


@pytest.mark.parametrize("num_train, num_test, dim, num_classes, ks, chunk_size, temperature", [
    (50, 3, 8, 4, (1, 5, 10), 256, 0.07),              # test set smaller than a chunk; 4 classes
    (60, 37, 16, 10, (1, 3, 20, 200), 8, 0.07),        # 37 = 4 chunks of 8 + 5; k > class size, > N
    (200, 64, 32, 7, (10, 20, 100, 200), 64, 0.5),     # exact multiple of the chunk
    (5, 9, 4, 12, (7, 2, 5), 4, 0.07),                 # tiny train set, empty classes, unsorted ks
])
def test_matches_brute_force(num_train, num_test, dim, num_classes, ks, chunk_size, temperature):
    rng = np.random.default_rng(num_train * 1000 + num_test)
    train_x, train_y = random_split(rng, num_train, dim, num_classes)
    test_x, test_y = random_split(rng, num_test, dim, num_classes)
    got = knn_classify(train_x, train_y, test_x, test_y, num_classes, ks=ks,
                       temperature=temperature, chunk_size=chunk_size)
    want = reference_knn(train_x, train_y, test_x, test_y, num_classes, ks, temperature)
    assert list(got) == list(ks)
    for k in ks:
        assert got[k] == pytest.approx(want[k])


def test_chunk_size_and_input_type_do_not_change_results():
    rng = np.random.default_rng(0)
    train_x, train_y = random_split(rng, 80, 12, 6)
    test_x, test_y = random_split(rng, 23, 12, 6)
    one_row = knn_classify(train_x, train_y, test_x, test_y, 6, ks=(1, 10, 50), chunk_size=1)
    one_chunk = knn_classify(paddle.to_tensor(train_x), paddle.to_tensor(train_y),
                             paddle.to_tensor(test_x), paddle.to_tensor(test_y), 6,
                             ks=(1, 10, 50), chunk_size=1000)
    assert one_row == one_chunk


def test_hand_checked_votes():
    """One strong neighbour of class 0 against two weaker ones of class 1.

    Test point (3, 0) has similarities 1.0, 0.8, 0.6 to the three training points. At temperature 1
    the weights are e^1 = 2.72 (class 0) and e^0.8 + e^0.6 = 4.05 (class 1): class 0 wins for k <= 2,
    class 1 for k = 3. At temperature 0.1, e^10 outweighs e^8 + e^6 for every k. Test point (0, 5)
    is nearest to the class-1 points whatever k and temperature.
    """
    train_x = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], dtype=np.float32)
    train_y = np.array([0, 1, 1])
    test_x = np.array([[3.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    test_y = np.array([1, 1])
    warm = knn_classify(train_x, train_y, test_x, test_y, 2, ks=(1, 2, 3, 10), temperature=1.0)
    assert {k: v["top1"] for k, v in warm.items()} == {1: 50.0, 2: 50.0, 3: 100.0, 10: 100.0}
    # k=1: the first test point's only neighbour votes class 0, so its label 1 is no top-5 hit.
    assert {k: v["top5"] for k, v in warm.items()} == {1: 50.0, 2: 100.0, 3: 100.0, 10: 100.0}
    cold = knn_classify(train_x, train_y, test_x, test_y, 2, ks=(3,), temperature=0.1)
    assert cold == {3: {"top1": 50.0, "top5": 100.0}}
    assert math.exp(10) > math.exp(8) + math.exp(6)


def test_classes_without_votes_never_count_for_top5():
    """The one neighbour votes for class 3. Ranking the unvoted classes by index would put class 0
    second and count it (catches that); mmselfsup's knn_eval takes the first min(5, k) = 1
    prediction, so its top-5 equals its top-1 here, and so does ppmoco's."""
    train_x = np.array([[1.0, 0.0]], dtype=np.float32)
    test_x = np.array([[1.0, 0.1]] * 3, dtype=np.float32)
    results = knn_classify(train_x, [3], test_x, [0, 5, 3], 10, ks=(1,))
    assert results[1] == {"top1": pytest.approx(100.0 / 3), "top5": pytest.approx(100.0 / 3)}


def test_separable_clusters_are_classified_perfectly():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16))
    train_y, test_y = np.repeat(np.arange(4), 40), np.repeat(np.arange(4), 10)
    train_x = (centres[train_y] + 0.05 * rng.normal(size=(160, 16))).astype(np.float32)
    test_x = (centres[test_y] + 0.05 * rng.normal(size=(40, 16))).astype(np.float32)
    results = knn_classify(train_x, train_y, test_x, test_y, 4, chunk_size=16)
    assert all(results[k] == {"top1": 100.0, "top5": 100.0} for k in (10, 20, 100, 200))


@pytest.mark.parametrize("change, message", [
    ({"train_labels": np.zeros(5, dtype=np.int64)}, "6 features but 5 labels"),
    ({"train_features": np.zeros((0, 3)), "train_labels": np.zeros(0)}, "train: no samples"),
    ({"test_labels": np.array([0, 4])}, r"test: labels span \[0, 4\], outside \[0, 4\)"),
    ({"train_labels": np.array([0, 1, -1, 0, 1, 2])}, r"outside \[0, 4\)"),
    ({"ks": (10, 0)}, "ks must be non-empty and positive"),
    ({"ks": ()}, "ks must be non-empty and positive"),
    ({"test_features": np.ones((2, 4))}, "train features have 3 dims, test features 4"),
    ({"chunk_size": 0}, "must be > 0"),
])
def test_rejects_bad_inputs(change, message):
    args = {"train_features": np.ones((6, 3)), "train_labels": np.array([0, 1, 2, 3, 0, 1]),
            "test_features": np.ones((2, 3)), "test_labels": np.array([0, 1]), "num_classes": 4}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        knn_classify(**args)


def test_format_knn_lists_ks_in_ascending_order():
    results = {200: {"top1": 90.0, "top5": 99.0}, 20: {"top1": 97.1149, "top5": 99.7761}}
    assert format_knn(results) == ["knn k=20 top1=97.11 top5=99.78", "knn k=200 top1=90.00 top5=99.00"]
