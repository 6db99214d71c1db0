"""Evaluation of pretrained backbones: the weighted kNN and linear SVM benchmarks and the evaluator behind `Eval`."""
from ppmoco.eval.knn import flatten_knn, format_knn, knn_classify, nest_knn

__all__ = ["flatten_knn", "format_knn", "knn_classify", "nest_knn"]
