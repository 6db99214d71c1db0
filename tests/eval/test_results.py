"""The results table of an output folder (ppmoco/eval/results.py): rows added, merged and drawn."""
import json

import pytest

from ppmoco.errors import DataError
from ppmoco.eval.results import add_results, best_layer, read_results, results_markdown

KNN = {"knn": {10: {"top1": 91.0, "top5": 99.0}, 200: {"top1": 88.5, "top5": 98.0}}}
SVM = {"svm": {"feat4_top1": 80.0, "feat4_mAP": 85.0, "feat5_top1": 90.0, "feat5_mAP": 84.0,
               "best_top1": 80.0, "best_mAP": 85.0}}
# mean mAP of feat4: 41 at k=1, 136 at k=96; of feat5: 51 and 146 (best over k); every std 1
LOW = {"lowshot_svm": {f"{layer}_k{k}_{metric}_{stat}": (base + k if stat == "mean" else 1.0)
                       for layer, base in (("feat4", 40.0), ("feat5", 50.0)) for k in (1, 96)
                       for metric in ("top1", "mAP") for stat in ("mean", "std")}}


def test_a_second_checkpoint_adds_a_row_and_a_second_protocol_fills_its_own_row():
    # Catches a table rewritten from the latest run only, one protocol's results dropping another's,
    # and a re-evaluation appending a duplicate row instead of replacing its results.
    rows = add_results({}, "a.pdparams", KNN)
    rows = add_results(json.loads(json.dumps(rows)), "random init", KNN)  # as read back from the file
    rows = add_results(rows, "a.pdparams", SVM)
    assert list(rows) == ["random init", "a.pdparams"]  # the row evaluated last comes last
    assert sorted(rows["a.pdparams"]) == ["knn", "svm"] and list(rows["random init"]) == ["knn"]
    rows = add_results(rows, "a.pdparams", {"svm": dict(SVM["svm"], feat5_mAP=99.0)})
    assert rows["a.pdparams"]["svm"]["feat5_mAP"] == 99.0 and len(rows) == 2


def test_the_markdown_has_the_seeds_layout():
    # Catches the best layer taken as the last or by top-1 (feat5 has the better top-1 here), low-shot
    # columns from another layer than the SVM's, the std shown for the mean, k columns sorted as
    # strings (96 before 200), and a missing result drawn as 0 instead of an empty cell.
    rows = add_results(add_results({}, "a.pdparams", {**KNN, **SVM, **LOW}), "random init",
                       {"knn": {10: {"top1": 30.0, "top5": 60.0}}, "linear": {"top1": 41.0, "top5": 77.0}})
    rows = add_results(rows, "b.pdparams", {"linear": {f"feat{i}_{m}": 10.0 * i + (m == "top5") for i in range(1, 6)
                                                       for m in ("top1", "top5")}})
    assert results_markdown(rows).splitlines() == [
        "# Evaluation results", "",
        "## kNN (top-1 %)", "", "Global-average-pooled last stage, weighted vote of k neighbours.", "",
        "| checkpoint | k=10 | k=200 |", "|---|---|---|",
        "| a.pdparams | 91.00 | 88.50 |", "| random init | 30.00 |  |", "",
        "## SVM / low-shot SVM (mAP %)", "",
        "Best layer by SVM mAP (else by mean low-shot mAP); low-shot columns are the mean over the draws at k "
        "positives per class (standard deviations in eval_results.json).", "",
        "| checkpoint | best layer | SVM | k=1 | k=96 |", "|---|---|---|---|---|",
        "| a.pdparams | feat4 | 85.00 | 41.00 | 136.00 |", "",
        "## Linear, feature1..5 (top-1 %)", "", "One linear head per pooled stage (multi-head probe).", "",
        "| checkpoint | feature1 | feature2 | feature3 | feature4 | feature5 |", "|---|---|---|---|---|---|",
        "| b.pdparams | 10.00 | 20.00 | 30.00 | 40.00 | 50.00 |", "",
        "## Linear (%)", "", "A linear classifier on the global-average-pooled last stage.", "",
        "| checkpoint | top-1 | top-5 |", "|---|---|---|", "| random init | 41.00 | 77.00 |"]


def test_without_svm_results_the_best_low_shot_layer_is_by_its_mean_over_k():
    # Catches a crash on low-shot-only rows and the first layer taken without comparing.
    assert best_layer(LOW) == "feat5"
    assert best_layer({**SVM, **LOW}) == "feat4"


def test_an_unreadable_results_file_is_one_line_and_an_old_one_adds_nothing(tmp_path):
    # Catches a corrupt file crashing after a long evaluation (it is read first) with a JSON traceback,
    # and an older single-protocol file breaking the table.
    path = tmp_path / "eval_results.json"
    assert read_results(str(path)) == {}
    path.write_text('{"protocol": "knn", "results": {"knn": {}}}')
    assert read_results(str(path)) == {}
    path.write_text('{"checkpoints": ')
    with pytest.raises(DataError, match=r"eval_results.json: not an eval_results.json ppmoco can add to .*; move it "
                                        r"away or set Engine.save_load.output_dir to another folder") as err:
        read_results(str(path))
    assert "\n" not in str(err.value)
