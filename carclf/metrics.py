"""Metric definitions: the one place where training and evaluation compute them.

Every figure comes from scikit-learn on arrays of true label indices ``y_true`` (``[N]``) and
predicted probabilities ``probs`` (``[N, K]``, rows summing to one, column ``k`` = label ``k``),
except the expected calibration error, which scikit-learn lacks and :func:`reliability` defines.

``metrics.json`` (written by :func:`full_metrics` via ``carclf evaluate``), schema version 1:

``schema_version`` (int), ``n`` (images), ``labels`` (class names in index order),
``summary`` — one flat object of floats, ``null`` only where the figure is undefined:
    ``acc``, ``balanced_acc`` (mean recall over the classes present in the split),
    ``precision_{macro,weighted,micro}``, ``recall_{…}``, ``f1_{…}`` (over every class of the
    model: ``labels=range(K)``, ``zero_division=0``), ``top3``, ``top5``, ``cohen_kappa``,
    ``mcc``, ``jaccard_macro``, ``hamming_loss``, ``log_loss``, ``roc_auc_ovr_macro`` (mean of
    the per-class one-vs-rest AUCs that are defined), ``roc_auc_ovr_micro``, ``ece``;
``undefined`` — metric name → reason, for every ``null`` in ``summary``;
``per_class`` — label → ``precision``, ``recall``, ``f1-score``, ``support``, ``predicted``
    (images predicted as this class), ``roc_auc`` (``null`` with ``roc_auc_undefined`` giving the
    reason when the class is absent from the split or is the only class in it);
``absent_classes``, ``never_predicted`` — labels with no true / no predicted image;
``most_confused`` — up to 20 ``{"true", "pred", "count", "rate"}`` off-diagonal pairs, most
    frequent first (``rate``: share of the true class's images);
``calibration`` — ``n_bins`` and per-bin ``lower``, ``upper``, ``count``, ``confidence``,
    ``accuracy`` of the reliability diagram;
``temperature_scaling`` (added by ``carclf evaluate``) — ``temperature`` applied to the logits
    before the softmax, where it came from (``source``), and ``ece_before`` (temperature 1) and
    ``ece_after`` on the evaluated split (:func:`temperature_effect`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

SCHEMA_VERSION = 1
ECE_BINS = 15

Mode = Literal["max", "min"]
T = TypeVar("T")


# --- direction: whether a metric is better high or low ---------------------------------------


def metric_mode(metric: str) -> Mode:
    """``min`` for losses and error rates (``val_loss``, ``log_loss``, ``ece``), else ``max``.

    The one rule for a metric's direction: early stopping, checkpoint ranking and the plateau
    schedule follow it for ``train.monitor``; a search states its own (``tune.mode``).
    """
    name = metric.removeprefix("val_").removeprefix("test_")
    return "min" if name.endswith("loss") or name == "ece" else "max"


def better_sign(mode: Mode) -> float:
    """+1 when higher is better, -1 when lower is: ``sign * value`` is always to maximise."""
    return 1.0 if mode == "max" else -1.0


def rank_key(value: float | None, mode: Mode) -> tuple[bool, float]:
    """A sort key that grows as ``value`` gets better in direction ``mode``.

    NaN (or None) ranks below every number, infinities included, as in Ray Train's own
    checkpoint ranking: every comparison with NaN is false, so ``max`` or ``sorted`` on the raw
    value could pick a diverged epoch as the best, or rank the real best below it.
    """
    if value is None or math.isnan(value):
        return False, 0.0
    return True, better_sign(mode) * float(value)


def best_of(items: Iterable[T], score: Callable[[T], float | None], mode: Mode) -> T:
    """The item whose ``score`` is best in direction ``mode`` (the first of equals); a NaN
    score only where every score is NaN (:func:`rank_key`)."""
    return max(items, key=lambda item: rank_key(score(item), mode))


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


# --- calibration -----------------------------------------------------------------------------


def reliability(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per-bin confidence and accuracy of the top-1 prediction (the reliability diagram).

    Bins split ``[0, 1]`` into ``n_bins`` equal widths, each closed on the right
    (``lower < confidence <= upper``), as :func:`sklearn.calibration.calibration_curve` does.
    Empty bins have ``count`` 0 and ``null`` confidence and accuracy.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(ids, minlength=n_bins)
    conf_sum = np.bincount(ids, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(ids, weights=correct, minlength=n_bins)

    def mean(sums: np.ndarray) -> list[float | None]:
        return [float(v / c) if c else None for v, c in zip(sums, count, strict=True)]

    return {
        "n_bins": n_bins,
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": count.tolist(),
        "confidence": mean(conf_sum),
        "accuracy": mean(acc_sum),
    }


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE: the count-weighted mean gap between accuracy and confidence over the bins.

    ``ECE = Σ_b |B_b| / N · |acc(B_b) − conf(B_b)|`` over the bins of :func:`reliability`
    (Guo et al., 2017); 0 for a perfectly calibrated model.
    """
    bins = reliability(y_true, probs, n_bins)
    n = max(sum(bins["count"]), 1)
    return float(
        sum(
            c / n * abs(a - p)
            for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
            if c
        )
    )


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature ``T`` minimising the log loss of ``softmax(logits / T)`` (Guo et al., 2017).

    One scalar, so accuracy and ranking are unchanged; fitted on held-out (validation) data.
    Searched in ``[0.05, 20]`` on a log scale.
    """
    labels = np.arange(logits.shape[1])
    logits = logits.astype(np.float64)

    def nll(log_t: float) -> float:
        return skm.log_loss(y_true, softmax(logits / math.exp(log_t)), labels=labels)

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def temperature_effect(
    logits: np.ndarray, y_true: np.ndarray, temperature: float, source: str
) -> dict[str, float | str]:
    """ECE of the raw softmax and of the temperature-scaled one, for ``metrics.json``."""
    logits = logits.astype(np.float64)
    return {
        "temperature": float(temperature),
        "source": source,
        "ece_before": expected_calibration_error(y_true, softmax(logits)),
        "ece_after": expected_calibration_error(y_true, softmax(logits / temperature)),
    }


# --- the full set for metrics.json ------------------------------------------------------------


def roc_auc_per_class(y_true: np.ndarray, probs: np.ndarray) -> list[tuple[float | None, str]]:
    """One-vs-rest ROC-AUC of each class, or ``None`` and the reason it is undefined."""
    out: list[tuple[float | None, str]] = []
    for k in range(probs.shape[1]):
        positives = int((y_true == k).sum())
        if positives == 0:
            out.append((None, "class absent from the split"))
        elif positives == len(y_true):
            out.append((None, "every image of the split is of this class"))
        else:
            out.append((float(skm.roc_auc_score(y_true == k, probs[:, k])), ""))
    return out


def _averages(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    out = {}
    for avg in ("macro", "weighted", "micro"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=idx, average=avg, zero_division=0
        )
        out |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    return out


def _defined(value: float, name: str, reason: str, undefined: dict[str, str]) -> float | None:
    """``value``, or None with ``reason`` recorded when it is NaN or infinite."""
    if math.isfinite(value):
        return float(value)
    undefined[name] = reason
    return None


def most_confused(cm: np.ndarray, labels: list[str], top: int = 20) -> list[dict]:
    """The ``top`` most frequent off-diagonal (true, predicted) pairs of a confusion matrix."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    support = cm.sum(axis=1)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = []
    for flat in order:
        i, j = np.unravel_index(flat, off.shape)
        if off[i, j] == 0:
            break
        count = int(off[i, j])
        pairs.append(
            {"true": labels[i], "pred": labels[j], "count": count, "rate": count / int(support[i])}
        )
    return pairs


def _summary(
    y_true: np.ndarray, probs: np.ndarray, aucs: list, undefined: dict[str, str]
) -> dict[str, float | None]:
    k = probs.shape[1]
    idx = np.arange(k)
    y_pred = probs.argmax(axis=1)
    summary: dict[str, float | None] = dict(core_metrics(y_true, probs))
    with warnings.catch_warnings():
        # A predicted class absent from the split: sklearn warns, then averages the others.
        warnings.simplefilter("ignore", UserWarning)
        summary["balanced_acc"] = float(skm.balanced_accuracy_score(y_true, y_pred))
    summary |= _averages(y_true, y_pred, idx)
    with warnings.catch_warnings():
        # One class only: sklearn warns and returns NaN, recorded below as undefined.
        warnings.simplefilter("ignore", UserWarning)
        kappa = skm.cohen_kappa_score(y_true, y_pred, labels=idx)
    summary["cohen_kappa"] = _defined(
        kappa, "cohen_kappa", "chance agreement is 1 (one class only)", undefined
    )
    summary["mcc"] = float(skm.matthews_corrcoef(y_true, y_pred))
    summary["jaccard_macro"] = float(
        skm.jaccard_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)
    )
    summary["hamming_loss"] = float(skm.hamming_loss(y_true, y_pred))
    summary["log_loss"] = float(skm.log_loss(y_true, probs, labels=idx))
    defined = [a for a, _ in aucs if a is not None]
    summary["roc_auc_ovr_macro"] = (
        float(np.mean(defined))
        if defined
        else _defined(math.nan, "roc_auc_ovr_macro", "no class has a defined AUC", undefined)
    )
    onehot = label_binarize(y_true, classes=idx) if k > 2 else np.eye(k)[y_true]
    summary["roc_auc_ovr_micro"] = (
        float(skm.roc_auc_score(onehot, probs, average="micro"))
        if k > 1
        else _defined(math.nan, "roc_auc_ovr_micro", "one class only", undefined)
    )
    summary["ece"] = expected_calibration_error(y_true, probs)
    return summary


def full_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """Every figure of ``metrics.json`` (schema in this module's docstring).

    Args:
        y_true: true label indices, shape ``[N]``.
        probs: class probabilities, shape ``[N, K]``, ``K == len(labels)``.
        labels: class names in index order.
    """
    y_true = np.asarray(y_true)
    idx = np.arange(len(labels))
    y_pred = probs.argmax(axis=1)
    undefined: dict[str, str] = {}
    aucs = roc_auc_per_class(y_true, probs)
    summary = _summary(y_true, probs, aucs, undefined)
    report = skm.classification_report(
        y_true, y_pred, labels=idx, target_names=labels, output_dict=True, zero_division=0
    )
    predicted = np.bincount(y_pred, minlength=len(labels))
    per_class = {}
    for i, name in enumerate(labels):
        row = dict(report[name]) | {"predicted": int(predicted[i]), "roc_auc": aucs[i][0]}
        if aucs[i][0] is None:
            row["roc_auc_undefined"] = aucs[i][1]
        per_class[name] = row
    cm = confusion(y_true, y_pred, len(labels))
    return {
        "schema_version": SCHEMA_VERSION,
        "n": len(y_true),
        "labels": list(labels),
        "summary": summary,
        "undefined": undefined,
        "per_class": per_class,
        "absent_classes": [labels[i] for i in idx if cm[i].sum() == 0],
        "never_predicted": [labels[i] for i in idx if predicted[i] == 0],
        "most_confused": most_confused(cm, labels),
        "calibration": reliability(y_true, probs),
    }
