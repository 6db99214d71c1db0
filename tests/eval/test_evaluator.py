"""The Evaluator's contract with the Engine: refusal of unsupported protocols, flat results, log lines."""
import json

import pytest
from hook_modules import Classifier, Features, StepOnly

from ppmoco.errors import ConfigError
from ppmoco.eval.evaluator import Evaluator, report, summary_lines
from ppmoco.eval.knn import flatten_knn, nest_knn
from ppmoco.modules.base import Module


def config(protocol):
    """Just what the Evaluator reads before it builds any data."""
    return {"Eval": {"protocol": protocol, "knn": {}, "svm": {}, "lowshot": {}}, "Data": {}, "Global": {"seed": 0}}


@pytest.mark.parametrize("module, protocol, message", [
    (Features(), "linear", "Features does not support 'linear'; use knn"),
    (StepOnly(), "linear", "StepOnly does not support 'linear'; use knn"),
    (Classifier(), "svm", "Classifier does not support 'svm'; use linear or knn"),
    (Module(), "knn", "Module does not support 'knn'; it defines no evaluation hook (ppmoco/modules/base.py)"),
])
def test_a_protocol_the_module_cannot_serve_is_a_one_line_config_error(module, protocol, message):
    # Catches the check passing on hooks merely inherited from Module (hasattr is always true now),
    # and a linear check that looks at validation_step but not validation_end; for the SVMs, the
    # kNN hook taken for the stages hook they need.
    with pytest.raises(ConfigError) as err:
        Evaluator(config(protocol), module, env=None)
    assert str(err.value) == f"Eval.protocol: {message}"


KNN = {10: {"top1": 95.2777, "top5": 99.7222}, 200: {"top1": 90.0, "top5": 99.0}}  # knn_classify's form
KNN_FLAT = {"k10_top1": 95.2777, "k10_top5": 99.7222, "k200_top1": 90.0, "k200_top5": 99.0}


def test_knn_results_flatten_to_the_names_of_their_visualdl_tags_and_back():
    # Catches a renamed flat key, which would rename the VisualDL tag eval/knn_k10_top1, and a
    # nest_knn that keeps k as a string (eval_results.json and the log sort k numerically).
    assert flatten_knn(KNN) == KNN_FLAT and list(flatten_knn(KNN)) == list(KNN_FLAT)
    assert nest_knn(KNN_FLAT) == KNN and list(nest_knn(KNN_FLAT)) == [10, 200]


def test_summary_lines_of_flat_results_are_the_lines_the_logs_always_had():
    # Catches log lines built from the flat names (`knn k10_top1=...`) instead of per k.
    assert summary_lines({"knn": KNN_FLAT}) == ["knn k=10 top1=95.28 top5=99.72",
                                                "knn k=200 top1=90.00 top5=99.00"]
    assert summary_lines({"linear": {"top1": 71.2, "top5": 90.1}}) == ["linear top1=71.20 top5=90.10"]


def test_report_keeps_the_eval_results_json_format():
    # Catches eval_results.json switching to the flat form that tools/summarize_digits.py and
    # tests/eval/test_eval_e2e.py cannot read ({"knn": {"10": {"top1": ...}}}).
    flat = {"knn": KNN_FLAT}
    assert json.loads(json.dumps(report(flat))) == {"knn": {"10": KNN[10], "200": KNN[200]}}
    linear = {"linear": {"top1": 71.2, "top5": 90.1}}
    assert report(linear) == linear


# Catches: the kNN bank built with the per-view pipelines of a MoCo v3 training set (GeneralClsDataset
# refuses view_trans1/view_trans2, so every kNN evaluation of such a run stopped at its start).
def test_the_knn_bank_takes_the_training_images_without_their_view_pipelines():
    from ppmoco.eval.evaluator import bank_dataset_cfg

    train = {"name": "ContrastiveLearningDataset", "root": "train", "views": 2, "transform_ops": ["crop"],
             "view_trans1": ["blur"], "view_trans2": ["solarize"]}
    assert bank_dataset_cfg(train, {"transform_ops": ["resize"]}) == {
        "name": "GeneralClsDataset", "root": "train", "transform_ops": ["resize"]}
