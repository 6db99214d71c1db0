"""One output folder's evaluation results: eval_results.json holds every protocol's results for every
evaluated checkpoint, eval_results.md the markdown tables in the seed's layout (mmselfsup's benchmark
tables): kNN k=10..200; SVM and low-shot SVM k=1..96 with the best layer; linear feature1..5.

Results are in `report` form (ppmoco/eval/evaluator.py): kNN nested by k, the others flat.
"""
import json
import os
import re

from ppmoco.errors import DataError

RANDOM_INIT = "random init"  # the row of a backbone without pretrained weights


def read_results(path):
    """{checkpoint: {protocol: results}} of an existing eval_results.json ({} when there is none).

    A file of an older ppmoco (one protocol, no checkpoints) contributes nothing: it did not record
    which weights it scored."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        checkpoints = data.get("checkpoints", {})
        if not isinstance(checkpoints, dict):
            raise ValueError("'checkpoints' is not a mapping")
        return checkpoints
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: not an eval_results.json ppmoco can add to ({err}); move it away or set "
                        "Engine.save_load.output_dir to another folder") from None


def add_results(checkpoints, checkpoint, results):
    """`checkpoints` with `results` ({protocol: results}) added to the row of `checkpoint`: a protocol
    evaluated again replaces its earlier results, other protocols and rows stay."""
    results = json.loads(json.dumps(results))  # keys as a file read back has them (kNN's k as strings)
    row = dict(checkpoints.get(checkpoint, {}), **results)
    return {**{name: values for name, values in checkpoints.items() if name != checkpoint}, checkpoint: row}


def _markdown(title, note, header, rows):
    if not rows:
        return []
    return [f"## {title}", "", note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _cell(value):
    return "" if value is None else f"{value:.2f}"


def _sorted_ks(keys):
    return sorted(keys, key=int)


def _knn_table(checkpoints):
    ks = _sorted_ks({k for row in checkpoints.values() for k in row.get("knn", {})})
    rows = [[name] + [_cell(row["knn"].get(k, {}).get("top1")) for k in ks]
            for name, row in checkpoints.items() if "knn" in row]
    return _markdown("kNN (top-1 %)", "Global-average-pooled last stage, weighted vote of k neighbours.",
                     ["checkpoint"] + [f"k={k}" for k in ks], rows)


def _layers(values, pattern):
    """The feature layers named in `values`' keys, in order, by a regex with one group for the layer."""
    layers = []
    for key in values:
        found = re.fullmatch(pattern, key)
        if found and found.group(1) != "best" and found.group(1) not in layers:
            layers.append(found.group(1))
    return layers


def best_layer(row):
    """The layer of the row's SVM results with the best mAP (first of equals); without SVM results,
    the low-shot layer with the best mean mAP over its ks."""
    if "svm" in row:
        svm = row["svm"]
        return max(_layers(svm, r"(\w+?)_mAP"), key=lambda layer: svm[f"{layer}_mAP"])
    low = row["lowshot_svm"]

    def mean_over_ks(layer):
        values = [v for key, v in low.items() if re.fullmatch(rf"{layer}_k\d+_mAP_mean", key)]
        return sum(values) / len(values)

    return max(_layers(low, r"(\w+?)_k\d+_mAP_mean"), key=mean_over_ks)


def _svm_table(checkpoints):
    scored = {name: row for name, row in checkpoints.items() if "svm" in row or "lowshot_svm" in row}
    ks = _sorted_ks({found.group(1) for row in scored.values() for key in row.get("lowshot_svm", {})
                     if (found := re.fullmatch(r"\w+?_k(\d+)_mAP_mean", key))})
    rows = []
    for name, row in scored.items():
        layer = best_layer(row)
        svm, low = row.get("svm", {}), row.get("lowshot_svm", {})
        rows.append([name, layer, _cell(svm.get(f"{layer}_mAP"))]
                    + [_cell(low.get(f"{layer}_k{k}_mAP_mean")) for k in ks])
    return _markdown("SVM / low-shot SVM (mAP %)", "Best layer by SVM mAP (else by mean low-shot mAP); low-shot "
                     "columns are the mean over the draws at k positives per class (standard deviations in "
                     "eval_results.json).", ["checkpoint", "best layer", "SVM"] + [f"k={k}" for k in ks], rows)


def _linear_tables(checkpoints):
    heads = {name: row["linear"] for name, row in checkpoints.items()
             if "linear" in row and _layers(row["linear"], r"(feat\d)_top1")}
    layers = sorted({layer for values in heads.values() for layer in _layers(values, r"(feat\d)_top1")})
    multi = _markdown("Linear, feature1..5 (top-1 %)", "One linear head per pooled stage (multi-head probe).",
                      ["checkpoint"] + [layer.replace("feat", "feature") for layer in layers],
                      [[name] + [_cell(values.get(f"{layer}_top1")) for layer in layers]
                       for name, values in heads.items()])
    single = _markdown("Linear (%)", "A linear classifier on the global-average-pooled last stage.",
                       ["checkpoint", "top-1", "top-5"],
                       [[name, _cell(row["linear"].get("top1")), _cell(row["linear"].get("top5"))]
                        for name, row in checkpoints.items() if "linear" in row and name not in heads])
    return multi + single


def results_markdown(checkpoints):
    """eval_results.md: a table per benchmark that has results, a row per evaluated checkpoint."""
    tables = _knn_table(checkpoints) + _svm_table(checkpoints) + _linear_tables(checkpoints)
    return "\n".join(["# Evaluation results", "", *tables])
