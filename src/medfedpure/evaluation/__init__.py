"""Evaluation: accuracy on clean and attacked scans."""

from medfedpure.evaluation.metrics import evaluate_accuracy

__all__ = ["evaluate_accuracy"]
