"""Evaluation of pretrained backbones: the weighted kNN benchmark and the evaluator behind `Eval`."""
from ppmoco.eval.knn import format_knn, knn_classify

__all__ = ["format_knn", "knn_classify"]
