"""Linear SVM benchmarks of frozen features, as mmselfsup's svm_voc07 tools run them (scikit-learn).

Labels are either class indices [N] (single-label data) or VOC-style targets [N, C] (multi-label:
PRESENT, ABSENT, IGNORED = 1, 0, -1; a VOC "difficult" object is IGNORED). Per class, a one-vs-rest
LinearSVC (squared hinge, L2, dual, tol 1e-4, max_iter 2000, positives weighted 2 and negatives 1,
solver seeded) on L2-normalised features. `svm_scores` picks each class's cost from the grid by
`folds`-fold cross-validated average precision on the training set, then fits on all of it; as
mmselfsup's train_svm_kfold, an IGNORED training image counts as a negative there, while the test
leaves it out. Scores: per class the VOC average precision of mmselfsup's test (area under the
precision envelope), their mean (mAP), and for single-label data the top-1 of the argmax over the
classes' decision values.

Low-shot (`lowshot_scores`), several seeded draws per k. Single-label data (mmselfsup's Places205
form): k images of every class, each class against the rest of the draw. Multi-label data
(mmselfsup's VOC form): per class k positives and (C-1)k negatives, everything else ignored. A
class with fewer images than that uses them all (said once per class). Every cost of the grid is
fitted; as mmselfsup's aggregate_low_shot_svm_stats, the cost with the best mean test mAP over the
draws is reported, as mean and standard deviation over the draws.

Classes are fitted in parallel threads (liblinear releases the GIL); each fit is seeded and
independent, so the results do not depend on the thread count.
"""
import logging
import warnings

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import LinearSVC

from ppmoco.data.voc import ABSENT, IGNORED, PRESENT
from ppmoco.errors import DataError
from ppmoco.progress import Progress

logger = logging.getLogger("ppmoco")


def normalize(features):
    """Rows divided by their L2 norm + 1e-5 (mmselfsup's svm_helper.normalize_features)."""
    features = np.asarray(features, dtype=np.float64)
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5)


def as_targets(labels, num_classes):
    """[N, C] targets (PRESENT / ABSENT / IGNORED): multi-label targets as they are, class indices one-hot."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(np.int64)
    return np.where(labels[:, None] == np.arange(num_classes), PRESENT, ABSENT)


def voc_ap(scores, positive):
    """Average precision as mmselfsup's svm_helper computes it: precision made non-increasing from
    the right (its envelope), summed over the recall steps. `positive` is a boolean per score."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(positive, dtype=np.float64)[order]
    recall = np.concatenate([[0.0], np.cumsum(hits) / hits.sum(), [1.0]])
    precision = np.concatenate([[0.0], np.cumsum(hits) / np.arange(1, len(hits) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


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


def _class_name(c, class_names):
    return f"class {c}" + (f" ({class_names[c]})" if class_names is not None else "")


def check_features(name, features, targets, min_positives=1, fix="", class_names=None):
    """A one-line DataError for empty features or a class with fewer than `min_positives` positive or
    negative images."""
    if targets.shape[1] < 2:
        raise DataError(f"{name}: {targets.shape[1]} class; one-vs-rest SVMs need at least 2")
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise DataError(f"{name}: no features (shape {list(features.shape)}); check the dataset lists its images")
    if features.shape[0] != targets.shape[0]:
        raise DataError(f"{name}: {features.shape[0]} features but {targets.shape[0]} labels")
    for what, counts in (("images", np.sum(targets == PRESENT, axis=0)),
                         ("negative images", np.sum(targets != PRESENT, axis=0))):
        short = np.flatnonzero(counts < min_positives)
        if short.size:
            c = int(short[0])
            raise DataError(f"{name}: {_class_name(c, class_names)} has {counts[c]} {what}, the SVM needs at "
                            f"least {min_positives}{fix}")


def _parallel(jobs, workers, progress):
    """The jobs' results in order, run on `workers` threads, `progress` advanced per finished job."""
    results = []
    for result in Parallel(n_jobs=workers, prefer="threads", return_as="generator")(jobs):
        results.append(result)
        progress.advance(1)
    return results


def _fit_class(train_x, targets, costs, folds):
    """The SVM of one class (targets +-1), its cost chosen by cross-validation."""
    best = max(costs, key=lambda cost: _cv_ap(cost, train_x, targets, folds))  # first of equals
    return _fit(best, train_x, targets)


def _scores(decisions, test_t, single_label):
    """{"mAP": %} (+ "top1" for single-label data) of decision values [N, C] against targets [N, C]."""
    kept = test_t != IGNORED
    aps = [voc_ap(decisions[kept[:, c], c], test_t[kept[:, c], c] == PRESENT) for c in range(test_t.shape[1])]
    out = {"mAP": 100.0 * float(np.mean(aps))}
    if single_label:
        out = {"top1": 100.0 * float(np.mean(decisions.argmax(axis=1) == test_t.argmax(axis=1))), **out}
    return out


def _prepare(train_x, train_y, test_x, test_y, num_classes, min_positives, fix, class_names):
    train_t, test_t = as_targets(train_y, num_classes), as_targets(test_y, num_classes)
    check_features("training split", train_x, train_t, min_positives, fix, class_names)
    check_features("evaluation split", test_x, test_t, 1, "", class_names)
    return normalize(train_x), train_t, normalize(test_x), test_t, np.asarray(train_y).ndim == 1


def svm_scores(train_x, train_y, test_x, test_y, num_classes, costs, folds, workers=1, class_names=None,
               name="svm"):
    """{"top1": %, "mAP": %} ("mAP" only for multi-label data) of per-class SVMs whose cost
    `folds`-fold cross-validation chose."""
    train_x, train_t, test_x, test_t, single_label = _prepare(
        train_x, train_y, test_x, test_y, num_classes, folds,
        " (one per cross-validation fold): add images or lower Eval.svm.cv_folds", class_names)
    classifiers = _parallel((delayed(_fit_class)(train_x, np.where(train_t[:, c] == PRESENT, 1, -1), costs, folds)
                             for c in range(num_classes)), workers, Progress(name, num_classes, unit="classes"))
    decisions = np.stack([clf.decision_function(test_x) for clf in classifiers], axis=1)
    return _scores(decisions, test_t, single_label)


def lowshot_rows(targets, k, seed, single_label):
    """Per class (training rows, their +-1 SVM targets) of one low-shot draw (see the module docstring)."""
    rng = np.random.default_rng(seed)
    num_classes = targets.shape[1]

    def draw(rows, n):
        return rng.choice(rows, min(n, len(rows)), replace=False)

    if single_label:
        rows = np.sort(np.concatenate([draw(np.flatnonzero(targets[:, c] == PRESENT), k)
                                       for c in range(num_classes)]))
        return [(rows, np.where(targets[rows, c] == PRESENT, 1, -1)) for c in range(num_classes)]
    out = []
    for c in range(num_classes):
        rows = np.sort(np.concatenate([draw(np.flatnonzero(targets[:, c] == PRESENT), k),
                                       draw(np.flatnonzero(targets[:, c] == ABSENT), (num_classes - 1) * k)]))
        out.append((rows, np.where(targets[rows, c] == PRESENT, 1, -1)))
    return out


def _say_caps(targets, ks, single_label, class_names):
    """Log once per class whose images cannot fill the largest k (it then uses all of them)."""
    need = max(ks)
    for c in range(targets.shape[1]):
        positives, negatives = int(np.sum(targets[:, c] == PRESENT)), int(np.sum(targets[:, c] == ABSENT))
        if positives < need:
            logger.info(f"lowshot_svm: {_class_name(c, class_names)} has only {positives} training images; "
                        "a k above that uses all of them")
        elif not single_label and negatives < (targets.shape[1] - 1) * need:
            logger.info(f"lowshot_svm: {_class_name(c, class_names)} has only {negatives} negative training "
                        f"images; a k above {negatives // (targets.shape[1] - 1)} uses all of them")


def _lowshot_decisions(train_x, test_x, draws, cost):
    """Decision values [N_test, C] of one cost, each class fitted on its draw."""
    return np.stack([_fit(cost, train_x[rows], y).decision_function(test_x) for rows, y in draws], axis=1)


def lowshot_scores(train_x, train_y, test_x, test_y, num_classes, costs, ks, samples, seed, workers=1,
                   class_names=None, name="lowshot_svm"):
    """{"k{k}_top1_mean": %, "k{k}_top1_std", "k{k}_mAP_mean", "k{k}_mAP_std"} over `samples` draws per k
    (top-1 for single-label data only), at the cost with the best mean mAP.

    Draw s of every k uses the seed (seed, s), so the same seed gives the same images.
    """
    train_x, train_t, test_x, test_t, single_label = _prepare(train_x, train_y, test_x, test_y, num_classes,
                                                              1, "", class_names)
    _say_caps(train_t, ks, single_label, class_names)
    out = {}
    progress = Progress(name, len(ks) * samples * len(costs), unit="fits")
    for k in ks:
        draws = [lowshot_rows(train_t, k, (seed, s), single_label) for s in range(samples)]
        decisions = _parallel((delayed(_lowshot_decisions)(train_x, test_x, draws[s], cost)
                               for s in range(samples) for cost in costs), workers, progress)
        scores = [[_scores(decisions[s * len(costs) + i], test_t, single_label) for i in range(len(costs))]
                  for s in range(samples)]
        best = int(np.argmax([np.mean([scores[s][i]["mAP"] for s in range(samples)])
                              for i in range(len(costs))]))  # first of equals
        for metric in scores[0][best]:
            values = np.array([scores[s][best][metric] for s in range(samples)])
            out[f"k{k}_{metric}_mean"], out[f"k{k}_{metric}_std"] = float(values.mean()), float(values.std())
    return out
