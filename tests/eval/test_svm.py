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
from ppmoco.eval.svm import lowshot_rows, lowshot_scores, svm_scores, voc_ap

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


def loop_voc_ap(scores, positive):
    """mmselfsup's svm_helper.get_precision_recall + calculate_ap, written as its loops."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tp = fp = 0
    recall, precision = [0.0], [0.0]
    for i in order:
        tp, fp = tp + bool(positive[i]), fp + (not positive[i])
        recall.append(tp / sum(map(bool, positive)))
        precision.append(tp / (tp + fp))
    recall.append(1.0)
    precision.append(0.0)
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    return sum((recall[i] - recall[i - 1]) * precision[i] for i in range(1, len(recall)) if recall[i] != recall[i - 1])


def test_voc_ap_is_the_area_under_the_precision_envelope():
    # Catches sklearn's step AP (0.7 here) in place of mmselfsup's interpolated one, and the envelope
    # taken from the left (precision made non-decreasing).
    scores, positive = np.array([5.0, 4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 0, 1, 1], bool)
    assert average_precision_score(positive, scores) == pytest.approx(0.7)
    assert voc_ap(scores, positive) == pytest.approx(11 / 15)
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores, positive = rng.normal(size=40), rng.random(40) < 0.3
        positive[0] = True
        assert voc_ap(scores, positive) == pytest.approx(loop_voc_ap(list(scores), list(positive)), abs=1e-12)


def svc(cost):
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, dual=True, max_iter=2000, tol=1e-4, random_state=0)


def norm(x):
    return x / (np.linalg.norm(x.astype(np.float64), axis=1)[:, None] + 1e-5)


def reference(train_x, train_t, test_x, test_t, costs, folds):
    """mmselfsup's train_svm_kfold + test_svm written out plainly on [N, C] targets (1, 0, -1 =
    difficult): per class the cost of the best CV AP, trained with difficult as negative, tested without it."""
    train_x, test_x = norm(train_x), norm(test_x)
    decisions, aps = np.zeros((len(test_x), train_t.shape[1])), []
    for c in range(train_t.shape[1]):
        targets = np.where(train_t[:, c] == 1, 1, -1)
        cv = [cross_val_score(svc(cost), train_x, targets, cv=folds, scoring="average_precision").mean()
              for cost in costs]
        decisions[:, c] = svc(costs[int(np.argmax(cv))]).fit(train_x, targets).decision_function(test_x)
        kept = test_t[:, c] != -1
        aps.append(loop_voc_ap(list(decisions[kept, c]), list(test_t[kept, c] == 1)))
    return decisions, 100.0 * np.mean(aps)


def one_hot(labels, num_classes):
    return (labels[:, None] == np.arange(num_classes)).astype(np.int64)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_noisy_labels_equal_an_independent_sklearn_recomputation():
    # Catches a missing normalisation, a changed class weight, the cost chosen by the worst or last CV
    # score, or mAP averaged over samples instead of classes: random labels leave no margin to hide in.
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(45, 7)), rng.normal(size=(30, 7))
    train_y, test_y = np.tile(np.arange(3), 15), rng.integers(0, 3, 30)
    got = svm_scores(train_x, train_y, test_x, test_y, 3, COSTS, 3)
    decisions, mean_ap = reference(train_x, one_hot(train_y, 3), test_x, one_hot(test_y, 3), COSTS, 3)
    assert got == pytest.approx({"top1": 100.0 * np.mean(decisions.argmax(1) == test_y), "mAP": mean_ap}, abs=1e-9)
    assert got["top1"] < 70  # near chance (33%), not a leak of the labels


def test_lowshot_draws_exactly_k_per_class_reproducibly():
    # Catches a draw over all images instead of per class, sampling with replacement, an ignored seed
    # (other seed, same images), an unseeded draw (same seed, other images), and SVM targets
    # misaligned with the drawn rows.
    targets = one_hot(np.repeat(np.arange(3), 10), 3)
    first = lowshot_rows(targets, 4, (0, 1), single_label=True)
    rows = first[0][0]
    assert np.bincount(targets[rows].argmax(1)).tolist() == [4, 4, 4] and len(set(rows)) == 12
    assert all(np.array_equal(r, rows) for r, _ in first)  # one draw, each class against the rest of it
    assert all(np.array_equal(y, np.where(targets[rows, c] == 1, 1, -1)) for c, (_, y) in enumerate(first))
    again = lowshot_rows(targets, 4, (0, 1), single_label=True)
    assert all(np.array_equal(r1, r2) for (r1, _), (r2, _) in zip(first, again))
    assert not np.array_equal(rows, lowshot_rows(targets, 4, (0, 2), single_label=True)[0][0])


def test_multilabel_lowshot_draws_k_positives_and_c_minus_1_k_negatives_per_class():
    # Catches difficult (-1) images drawn as negatives, the single-label union used for VOC data, and
    # a negative count other than mmselfsup's (C - 1) * k.
    rng = np.random.default_rng(0)
    targets = rng.choice([1, 0, 0, 0, -1], size=(200, 3))
    for c, (rows, y) in enumerate(lowshot_rows(targets, 5, (0, 0), single_label=False)):
        assert np.sum(y == 1) == 5 and np.sum(y == -1) == 10 and len(set(rows)) == 15
        assert np.array_equal(targets[rows, c], np.where(y == 1, 1, 0))  # no difficult image drawn


def test_lowshot_caps_k_at_a_small_class_and_says_so_once_per_class(caplog):
    # Catches a k above a class's size reaching numpy/sklearn as a traceback, a message per k, and
    # draws that do not differ across samples (std 0 where k is below every class's size).
    train_x, train_y = separable(3, num_classes=3)
    test_x, test_y = separable(4, num_classes=3, seed=1)
    labels = np.concatenate([train_y, [0, 0, 0]])  # class 0 has 6 images, the others 3
    rows = lowshot_rows(one_hot(labels, 3), 5, 0, single_label=True)[0][0]
    assert np.bincount(labels[rows]).tolist() == [5, 3, 3]
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        out = lowshot_scores(train_x, train_y, test_x, test_y, 3, COSTS, [1, 8, 16], 3, 0,
                             class_names=["zero", "one", "two"])
    messages = [r.getMessage() for r in caplog.records if "training images" in r.getMessage()]
    assert messages == [f"lowshot_svm: class {c} ({name}) has only 3 training images; a k above that uses all of them"
                        for c, name in enumerate(["zero", "one", "two"])]
    assert out["k8_mAP_mean"] == 100.0 and out["k8_mAP_std"] == 0.0  # every draw is the whole class
    assert list(out)[:4] == ["k1_top1_mean", "k1_top1_std", "k1_mAP_mean", "k1_mAP_std"]


def multilabel(n, num_classes=3, dims=8, seed=0):
    """Random features and VOC-style targets (1 present, 0 absent, -1 difficult), each class present in some."""
    rng = np.random.default_rng(seed)
    targets = rng.choice([1, 0, 0, -1], size=(n, num_classes))
    targets[:3] = np.where(np.eye(3, num_classes, dtype=bool), 1, 0)
    return rng.normal(size=(n, dims)) + targets @ rng.normal(size=(num_classes, dims)), targets


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_multilabel_svm_equals_mmselfsups_recipe_recomputed():
    # Catches difficult images kept in the test AP, difficult images dropped from training (mmselfsup's
    # train_svm_kfold trains them as negatives), a top-1 reported for multi-label data, and targets
    # read as class indices.
    train_x, train_t = multilabel(60)
    test_x, test_t = multilabel(40, seed=1)
    got = svm_scores(train_x, train_t, test_x, test_t, 3, COSTS, 3, workers=2)
    assert got == pytest.approx({"mAP": reference(train_x, train_t, test_x, test_t, COSTS, 3)[1]}, abs=1e-9)


def test_difficult_test_images_do_not_count():
    # Catches difficult (-1) test images scored as negatives: here they would rank above every positive.
    train_x, train_y = separable(9)
    test_x, test_y = separable(5, seed=1)
    look_like_0 = test_x[test_y == 0] + 3 * np.eye(4, 6)[0]  # more like class 0 than its own images
    test_t = np.concatenate([one_hot(test_y, 4), np.tile([-1, 0, 0, 0], (len(look_like_0), 1))])
    assert svm_scores(train_x, one_hot(train_y, 4), np.concatenate([test_x, look_like_0]), test_t, 4, COSTS, 3) == \
        {"mAP": 100.0}


def lowshot_reference(train_x, train_t, test_x, test_t, costs, k, samples, seed, single_label):
    """mmselfsup's low-shot train, test and aggregate steps, plainly: mAP per (draw, cost), the cost
    of the best mean over draws, its mean and std."""
    train_x, test_x = norm(train_x), norm(test_x)
    maps = np.zeros((samples, len(costs)))
    for s in range(samples):
        draws = lowshot_rows(train_t, k, (seed, s), single_label)
        for i, cost in enumerate(costs):
            aps = []
            for c, (rows, y) in enumerate(draws):
                scores = svc(cost).fit(train_x[rows], y).decision_function(test_x)
                kept = test_t[:, c] != -1
                aps.append(loop_voc_ap(list(scores[kept]), list(test_t[kept, c] == 1)))
            maps[s, i] = 100.0 * np.mean(aps)
    best = int(np.argmax(maps.mean(axis=0)))
    return maps[:, best].mean(), maps[:, best].std()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("single_label", [True, False])
def test_lowshot_equals_mmselfsups_aggregate_recomputed(single_label):
    # Catches the best cost picked per draw (optimistic) instead of by the mean over draws, a std over
    # costs, and the multi-label draw or difficult handling diverging from the reference's.
    if single_label:
        rng = np.random.default_rng(3)
        train_x, test_x = rng.normal(size=(60, 6)), rng.normal(size=(30, 6))
        train_y, test_y = np.tile(np.arange(3), 20), np.tile(np.arange(3), 10)
        train_t, test_t = one_hot(train_y, 3), one_hot(test_y, 3)
    else:
        (train_x, train_y), (test_x, test_y) = multilabel(90), multilabel(40, seed=1)
        train_t, test_t = train_y, test_y
    got = lowshot_scores(train_x, train_y, test_x, test_y, 3, COSTS, [2, 4], 3, 7, workers=2)
    for k in (2, 4):
        mean, std = lowshot_reference(train_x, train_t, test_x, test_t, COSTS, k, 3, 7, single_label)
        assert (got[f"k{k}_mAP_mean"], got[f"k{k}_mAP_std"]) == pytest.approx((mean, std), abs=1e-9)
    assert ("k2_top1_mean" in got) == single_label


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
