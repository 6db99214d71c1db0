"""Linear SVM benchmarks of frozen features, as mmselfsup's svm_voc07 runs them (scikit-learn).

Per class, a one-vs-rest LinearSVC (squared hinge, L2, dual, tol 1e-4, max_iter 2000, positives
weighted 2 and negatives 1, solver seeded) on L2-normalised features. `svm_scores` picks each class's cost from the
grid by `folds`-fold cross-validated average precision on the training set, then fits on all of it.
Results are the mean over classes of the test average precision (mAP) and the top-1 of the argmax
over the classes' decision values (single-label data).

Low-shot (`lowshot_scores`): k positives per class drawn from the training set (their union is the
training set), several seeded draws per k; as mmselfsup's low-shot benchmark, every cost of the
grid is fitted and the one with the best test mAP is reported (k = 1 leaves nothing to
cross-validate). A class with fewer than k training images uses them all.
"""
import logging
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import LinearSVC

from ppmoco.errors import DataError

logger = logging.getLogger("ppmoco")


def normalize(features):
    """Rows divided by their L2 norm + 1e-5 (mmselfsup's svm_helper.normalize_features)."""
    features = np.asarray(features, dtype=np.float64)
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5)


def linear_svc(cost):
    # random_state: liblinear's dual solver visits samples in a random order; fixed, a run repeats
    # exactly (mmselfsup leaves it unseeded).
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True,
                     tol=1e-4, max_iter=2000, random_state=0)


def _fit(cost, features, targets):
    with warnings.catch_warnings():  # mmselfsup's 2000 iterations are the benchmark: no early warning
        warnings.simplefilter("ignore", ConvergenceWarning)
        return linear_svc(cost).fit(features, targets)


def _cv_ap(cost, features, targets, folds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_score(linear_svc(cost), features, targets, cv=StratifiedKFold(folds),
                               scoring="average_precision").mean()


def check_features(name, features, labels, num_classes, min_positives=1, fix=""):
    """A one-line DataError for empty features or a class with fewer than `min_positives` images."""
    if num_classes < 2:
        raise DataError(f"{name}: {num_classes} class; one-vs-rest SVMs need at least 2")
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise DataError(f"{name}: no features (shape {list(features.shape)}); check the dataset lists its images")
    if features.shape[0] != labels.shape[0]:
        raise DataError(f"{name}: {features.shape[0]} features but {labels.shape[0]} labels")
    counts = np.bincount(labels, minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] < min_positives]
    if short:
        raise DataError(f"{name}: class {short[0]} has {counts[short[0]]} images, the SVM needs at least "
                        f"{min_positives}{fix}")


def _scores(classifiers, features, labels, num_classes):
    """(top-1 %, mAP %) of one fitted SVM per class on (features, labels)."""
    decisions = np.stack([clf.decision_function(features) for clf in classifiers], axis=1)
    aps = [average_precision_score(labels == c, decisions[:, c]) for c in range(num_classes)]
    return 100.0 * float(np.mean(decisions.argmax(axis=1) == labels)), 100.0 * float(np.mean(aps))


def svm_scores(train_x, train_y, test_x, test_y, num_classes, costs, folds):
    """{"top1": %, "mAP": %} of per-class SVMs whose cost `folds`-fold cross-validation chose."""
    check_features("training split", train_x, train_y, num_classes, folds,
                   " (one per cross-validation fold): add images or lower Eval.svm.cv_folds")
    check_features("evaluation split", test_x, test_y, num_classes)
    train_x, test_x = normalize(train_x), normalize(test_x)
    classifiers = []
    for c in range(num_classes):
        targets = np.where(train_y == c, 1, -1)
        best = max(costs, key=lambda cost: _cv_ap(cost, train_x, targets, folds))  # first of equals
        classifiers.append(_fit(best, train_x, targets))
    top1, mean_ap = _scores(classifiers, test_x, test_y, num_classes)
    return {"top1": top1, "mAP": mean_ap}


def lowshot_indices(labels, num_classes, k, seed):
    """Sorted training indices: k of each class's images (all of a class with fewer), drawn by `seed`."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), min(k, int(np.sum(labels == c))), replace=False)
              for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def _lowshot_once(train_x, train_y, test_x, test_y, num_classes, costs):
    """(top-1 %, mAP %) of the cost with the best test mAP, every class fitted on (train_x, train_y)."""
    results = []
    for cost in costs:
        classifiers = [_fit(cost, train_x, np.where(train_y == c, 1, -1)) for c in range(num_classes)]
        results.append(_scores(classifiers, test_x, test_y, num_classes))
    return max(results, key=lambda r: r[1])


def lowshot_scores(train_x, train_y, test_x, test_y, num_classes, costs, ks, samples, seed):
    """{"k{k}_top1_mean": %, "k{k}_top1_std", "k{k}_mAP_mean", "k{k}_mAP_std"} over `samples` draws per k.

    Draw s of every k uses the seed (seed, s), so the same seed gives the same images.
    """
    check_features("training split", train_x, train_y, num_classes)
    check_features("evaluation split", test_x, test_y, num_classes)
    train_x, test_x = normalize(train_x), normalize(test_x)
    smallest = int(np.bincount(train_y, minlength=num_classes).min())
    if max(ks) > smallest:
        logger.info(f"lowshot_svm: a class has only {smallest} training images; a k above that uses "
                    "all of that class's images")
    out = {}
    for k in ks:
        runs = np.array([_lowshot_once(train_x[idx], train_y[idx], test_x, test_y, num_classes, costs)
                         for idx in (lowshot_indices(train_y, num_classes, k, (seed, s)) for s in range(samples))])
        for i, metric in enumerate(("top1", "mAP")):
            out[f"k{k}_{metric}_mean"] = float(runs[:, i].mean())
            out[f"k{k}_{metric}_std"] = float(runs[:, i].std())
    return out
