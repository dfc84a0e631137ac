"""Metric definitions: the one place where validation in training and evaluation compute them.

Every figure comes from scikit-learn on arrays of true labels and predicted probabilities.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the ``k`` highest scores."""
    k = min(k, probs.shape[1])
    return float(
        skm.top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(probs.shape[1]))
        if probs.shape[1] > 2
        else skm.accuracy_score(y_true, probs.argmax(1))
    )


def core_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and top-k: the figures reported every epoch and kept in the bundle.

    Args:
        y_true: true label indices, shape ``[N]``.
        probs: class probabilities, shape ``[N, K]``.
    """
    y_pred = probs.argmax(axis=1)
    labels = np.arange(probs.shape[1])
    return {
        "acc": float(skm.accuracy_score(y_true, y_pred)),
        "f1_macro": float(
            skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "top3": top_k_accuracy(y_true, probs, 3),
        "top5": top_k_accuracy(y_true, probs, 5),
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """The ``K × K`` confusion matrix, rows true, columns predicted, every class present."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
