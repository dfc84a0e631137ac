"""Collapse detection: is a model stuck at chance, on one class, or on a flat loss?

A collapsed run (the classic from-scratch failure: accuracy ≈ 1/K, every prediction the same
class, loss stuck at ln K) wastes its whole budget. :func:`detect_collapse` looks at a run's
per-epoch validation history and names the symptom, so searches can stop such trials early
and reports can label them, without anyone reading confusion matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class CollapseRule(BaseModel):
    """When a run counts as collapsed (the ``collapse`` section of a tune config).

    A symptom must hold in each of the last ``window`` epochs, and only from epoch
    ``min_epochs`` on, so a healthy slow starter that is still climbing is not flagged.
    """

    model_config = ConfigDict(extra="forbid")

    min_epochs: int = Field(3, ge=1, description="epochs seen before any verdict but NaN")
    window: int = Field(2, ge=1, description="consecutive epochs a symptom must last")
    chance_margin: float = Field(0.05, ge=0.0, description="val_acc ≤ 1/K + margin is chance")
    max_class_share: float = Field(
        0.9, gt=0.0, le=1.0, description="one class's share of predictions"
    )
    loss_margin: float = Field(0.05, ge=0.0, description="|val_loss − ln K| ≤ margin·ln K is flat")


def _non_finite(row: dict[str, Any]) -> str | None:
    for key in ("train_loss", "val_loss", "val_acc"):
        value = row.get(key)
        if value is not None and not math.isfinite(float(value)):
            return f"{key} is {value}"
    return None


def _symptoms(row: dict[str, Any], num_classes: int, rule: CollapseRule) -> list[str]:
    chance = 1.0 / num_classes
    found = []
    if row["val_acc"] <= chance + rule.chance_margin:
        found.append(f"validation accuracy {row['val_acc']:.3f} at chance (1/{num_classes})")
    share = row.get("val_top_class_share")
    if share is not None and share > rule.max_class_share:
        found.append(f"{share:.0%} of predictions are one class")
    ln_k = math.log(num_classes)
    if abs(row["val_loss"] - ln_k) <= rule.loss_margin * ln_k:
        found.append(f"validation loss {row['val_loss']:.3f} stuck near ln {num_classes}")
    return found


def detect_collapse(
    history: Sequence[dict[str, Any]], num_classes: int, rule: CollapseRule | None = None
) -> str | None:
    """The reason a run has collapsed, or None while it looks healthy.

    Args:
        history: per-epoch metrics in order, each with ``val_acc`` and ``val_loss`` (and, when
            available, ``train_loss`` and ``val_top_class_share``).
        num_classes: K, for chance (1/K) and the uniform-prediction loss (ln K).
        rule: thresholds; the defaults suit most runs.

    Returns:
        A one-line reason (the symptoms of the last epoch), or None.
    """
    rule = rule or CollapseRule()
    if not history:
        return None
    bad = _non_finite(history[-1])
    if bad:
        return f"non-finite metric: {bad}"
    if len(history) < max(rule.min_epochs, rule.window):
        return None
    recent = [_symptoms(row, num_classes, rule) for row in history[-rule.window :]]
    if all(recent):
        return "; ".join(recent[-1])
    return None


def collapse_label(
    history: Sequence[dict[str, Any]], num_classes: int, rule: CollapseRule | None = None
) -> str | None:
    """A finished run's collapse label: the reason at the first epoch the detector fired, or
    None when the run ended healthy (it never fired, or it trained on past the symptoms and
    recovered, as in a search that labels collapsed trials without stopping them).

    Args:
        history: the run's per-epoch metrics, as for :func:`detect_collapse`.
        num_classes: K.
        rule: thresholds; the defaults suit most runs.
    """
    if detect_collapse(history, num_classes, rule) is None:
        return None
    for n in range(1, len(history) + 1):
        reason = detect_collapse(history[:n], num_classes, rule)
        if reason:
            return reason
    return None  # unreachable: the whole history fired


def confusion_pattern(cm: np.ndarray, labels: Sequence[str], max_class_share: float = 0.5) -> str:
    """Name the shape of a confusion matrix (rows true, columns predicted), as a reader would.

    Args:
        cm: the ``K × K`` confusion matrix (:func:`carclf.metrics.confusion`).
        labels: class names in index order.
        max_class_share: above this share of all predictions in one column, the model has
            collapsed onto that class (1/K would be an even spread).

    Returns:
        ``"collapsed onto <class>"`` when one class takes more than ``max_class_share`` of the
        predictions; ``"diagonal"`` when every class that occurs is predicted most often as
        itself; ``"mixed"`` otherwise (also for an empty matrix).
    """
    cm = np.asarray(cm)
    total = cm.sum()
    if total == 0:
        return "mixed"
    predicted = cm.sum(axis=0)
    top = int(predicted.argmax())
    if len(labels) > 1 and predicted[top] / total > max_class_share:
        return f"collapsed onto {labels[top]}"
    present = cm.sum(axis=1) > 0
    rows = np.flatnonzero(present)
    if all(cm[i, i] == cm[i].max() and cm[i, i] > 0 for i in rows):
        return "diagonal"
    return "mixed"
