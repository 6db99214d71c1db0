"""The SVM benchmarks (ppmoco/eval/svm.py) against known answers and an independent sklearn recomputation."""
import logging
import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from ppmoco.config import load_config
from ppmoco.errors import ConfigError, DataError
from ppmoco.eval.evaluator import summary_lines
from ppmoco.eval.svm import lowshot_indices, lowshot_scores, svm_scores

COSTS = [0.1, 1.0, 10.0]


def separable(per_class, num_classes=4, dims=6, seed=0):
    """Features near the class's own axis: any linear one-vs-rest classifier separates them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    features = np.eye(num_classes, dims)[labels] * 5 + rng.normal(0, 0.1, (len(labels), dims))
    return features.astype(np.float32), labels


def test_separable_features_score_100():
    # Catches decision values stacked on the wrong axis, argmax over samples, or labels misaligned with
    # their features (positives of class c taken from another class).
    train_x, train_y = separable(9)
    test_x, test_y = separable(5, seed=1)
    assert svm_scores(train_x, train_y, test_x, test_y, 4, COSTS, 3) == {"top1": 100.0, "mAP": 100.0}


def reference(train_x, train_y, test_x, test_y, num_classes, costs, folds):
    """mmselfsup's recipe written out plainly: normalise, per class the cost of the best CV AP, fit, score."""
    def norm(x):
        return x / (np.linalg.norm(x, axis=1)[:, None] + 1e-5)

    train_x, test_x = norm(train_x.astype(np.float64)), norm(test_x.astype(np.float64))
    decisions = np.zeros((len(test_y), num_classes))
    aps = []
    for c in range(num_classes):
        targets = np.where(train_y == c, 1, -1)

        def svc(cost):
            return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, dual=True, max_iter=2000, tol=1e-4, random_state=0)

        cv = [cross_val_score(svc(cost), train_x, targets, cv=folds, scoring="average_precision").mean()
              for cost in costs]
        decisions[:, c] = svc(costs[int(np.argmax(cv))]).fit(train_x, targets).decision_function(test_x)
        aps.append(average_precision_score(test_y == c, decisions[:, c]))
    return {"top1": 100.0 * np.mean(decisions.argmax(1) == test_y), "mAP": 100.0 * np.mean(aps)}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_noisy_labels_equal_an_independent_sklearn_recomputation():
    # Catches a missing normalisation, a changed class weight, the cost chosen by the worst or last CV
    # score, or mAP averaged over samples instead of classes: random labels leave no margin to hide in.
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(45, 7)), rng.normal(size=(30, 7))
    train_y, test_y = np.tile(np.arange(3), 15), rng.integers(0, 3, 30)
    got = svm_scores(train_x, train_y, test_x, test_y, 3, COSTS, 3)
    want = reference(train_x, train_y, test_x, test_y, 3, COSTS, 3)
    assert got == pytest.approx(want, abs=1e-9)
    assert got["top1"] < 70  # near chance (33%), not a leak of the labels


def test_lowshot_draws_exactly_k_per_class_reproducibly():
    # Catches a draw over all images instead of per class, sampling with replacement, an ignored seed
    # (other seed, same images) or an unseeded draw (same seed, other images).
    labels = np.repeat(np.arange(3), 10)
    first = lowshot_indices(labels, 3, 4, (0, 1))
    assert np.bincount(labels[first]).tolist() == [4, 4, 4] and len(set(first)) == 12
    assert np.array_equal(first, lowshot_indices(labels, 3, 4, (0, 1)))
    assert not np.array_equal(first, lowshot_indices(labels, 3, 4, (0, 2)))


def test_lowshot_caps_k_at_a_small_class_and_says_so_once(caplog):
    # Catches a k above a class's size reaching numpy/sklearn as a traceback, a message per k, and
    # draws that do not differ across samples (std 0 where k is below every class's size).
    train_x, train_y = separable(3, num_classes=3)
    test_x, test_y = separable(4, num_classes=3, seed=1)
    labels = np.concatenate([train_y, [0, 0, 0]])  # class 0 has 6 images, the others 3
    assert np.bincount(labels[lowshot_indices(labels, 3, 5, 0)]).tolist() == [5, 3, 3]
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        out = lowshot_scores(train_x, train_y, test_x, test_y, 3, COSTS, [1, 8, 16], 3, 0)
    assert sum("only 3 training images" in r.getMessage() for r in caplog.records) == 1
    assert out["k8_mAP_mean"] == 100.0 and out["k8_mAP_std"] == 0.0  # every draw is the whole class
    assert list(out)[:4] == ["k1_top1_mean", "k1_top1_std", "k1_mAP_mean", "k1_mAP_std"]


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 0, 0, 2, 2, 2]), "training split: class 1 has 0 images, the SVM needs at least 3"),
    (np.array([0, 0, 1, 1, 2, 2]), "class 0 has 2 images, the SVM needs at least 3 .* lower Eval.svm.cv_folds"),
])
def test_a_class_short_of_positives_is_one_line_naming_it(labels, message):
    # Catches a class without positives reaching sklearn (a ValueError traceback) or an unnamed class.
    x = np.ones((6, 2))
    with pytest.raises(DataError, match=message):
        svm_scores(x, labels, x, labels % 3, 3, COSTS, 3)


def test_empty_features_are_one_line():
    # Catches empty features reaching numpy's reductions (a traceback about zero-size arrays).
    with pytest.raises(DataError, match=r"training split: no features \(shape \[0, 4\]\)"):
        svm_scores(np.zeros((0, 4)), np.zeros(0, np.int64), np.ones((2, 4)), np.array([0, 1]), 2, COSTS, 3)


def test_log_lines_group_by_layer_and_k_with_std_after_its_mean():
    # Catches a std attached to the wrong metric or k, and the SVM results logged as one unreadable line.
    lowshot = {"feat5_k1_top1_mean": 50.0, "feat5_k1_top1_std": 1.5, "feat5_k1_mAP_mean": 60.0,
               "feat5_k1_mAP_std": 2.5, "gap_k8_top1_mean": 70.0, "gap_k8_top1_std": 1.0,
               "gap_k8_mAP_mean": 80.0, "gap_k8_mAP_std": 0.5}
    svm = {"feat5_top1": 94.7, "feat5_mAP": 96.1, "best_top1": 94.7, "best_mAP": 96.1}
    assert summary_lines({"svm": svm, "lowshot_svm": lowshot}) == [
        "svm feat5 top1=94.70 mAP=96.10", "svm best top1=94.70 mAP=96.10",
        "lowshot_svm feat5 k=1 top1=50.00+-1.50 mAP=60.00+-2.50",
        "lowshot_svm gap k=8 top1=70.00+-1.00 mAP=80.00+-0.50"]


@pytest.mark.parametrize("override, message", [
    ("Eval.svm.costs=[]", "Eval.svm.costs: [] must be a non-empty list of numbers > 0"),
    ("Eval.svm.costs=[1,-1]", "Eval.svm.costs: [1, -1] must be"),
    ("Eval.svm.cv_folds=1", "Eval.svm.cv_folds: 1 must be >= 2"),
    ("Eval.svm.layers=[feat6]", "Eval.svm.layers: ['feat6'] must be a non-empty list of distinct layers among feat1"),
    ("Eval.svm.layers=[feat5,feat5]", "Eval.svm.layers: ['feat5', 'feat5'] must be a non-empty list of distinct"),
    ("Eval.svm.cache_dir=''", "Eval.svm.cache_dir: '' must be a folder"),
    ("Eval.lowshot.ks=[0]", "Eval.lowshot.ks: [0] must be a non-empty list of ints > 0"),
    ("Eval.lowshot.samples=0", "Eval.lowshot.samples: 0 must be > 0"),
    ("Eval.lowshot.seed=-1", "Eval.lowshot.seed: -1 must lie in"),
    ("Eval.protocol=svn", "Eval.protocol: 'svn' is not one of linear, knn, svm, lowshot_svm"),
])
def test_bad_svm_options_are_one_line_naming_the_key(override, message):
    # Catches a missing LIMITS entry: the value would reach sklearn or numpy and fail with a traceback.
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("moco_lincls_digits_1n2c.yaml", [override])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_lowshot_repeats_exactly_and_depends_on_its_seed():
    # Catches an unseeded solver or draw (a second run differs) and a seed that is ignored.
    rng = np.random.default_rng(5)
    train_x, test_x = rng.normal(size=(40, 5)), rng.normal(size=(20, 5))
    train_y, test_y = np.tile(np.arange(2), 20), np.tile(np.arange(2), 10)
    args = (train_x, train_y, test_x, test_y, 2, COSTS, [2, 4])
    first = lowshot_scores(*args, 3, 0)
    assert lowshot_scores(*args, 3, 0) == first
    assert lowshot_scores(*args, 3, 1) != first
