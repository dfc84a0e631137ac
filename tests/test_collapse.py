"""The collapse detector on crafted metric histories."""

import math

import numpy as np
import pytest

from carclf.collapse import CollapseRule, confusion_pattern, detect_collapse

K = 33
LN_K = math.log(K)


def _hist(accs: list[float], losses: list[float], shares: list[float] | None = None) -> list[dict]:
    shares = shares or [0.2] * len(accs)
    return [
        {"epoch": i, "val_acc": a, "val_loss": lo, "train_loss": lo, "val_top_class_share": s}
        for i, (a, lo, s) in enumerate(zip(accs, losses, shares, strict=True))
    ]


def test_stuck_at_chance_with_loss_at_ln_k_is_collapsed() -> None:
    reason = detect_collapse(_hist([1 / K] * 3, [LN_K] * 3, [1.0] * 3), K)
    assert reason and "chance" in reason and "one class" in reason and "ln 33" in reason


def test_one_class_predicted_is_collapsed_even_above_chance() -> None:
    hist = _hist([0.4, 0.41, 0.4], [1.9, 1.9, 1.9], [0.95, 0.97, 0.99])
    assert "one class" in detect_collapse(hist, 3)


def test_nan_is_collapsed_at_once() -> None:
    assert "non-finite" in detect_collapse(_hist([0.5], [float("nan")]), K)
    assert "non-finite" in detect_collapse(_hist([0.5], [float("inf")]), K)


def test_healthy_slow_starter_is_not_flagged() -> None:
    # Chance-level for one epoch, then climbing: the window keeps it alive.
    accs = [0.03, 0.05, 0.12, 0.25, 0.4]
    losses = [LN_K, LN_K * 0.99, 3.0, 2.5, 2.0]
    for n in range(1, len(accs) + 1):
        assert detect_collapse(_hist(accs[:n], losses[:n]), K) is None, n


def test_no_verdict_before_min_epochs() -> None:
    assert detect_collapse(_hist([1 / K], [LN_K]), K) is None
    assert detect_collapse([], K) is None
    rule = CollapseRule(min_epochs=1, window=1)
    assert detect_collapse(_hist([1 / K], [LN_K]), K, rule)


def test_healthy_run_is_not_flagged() -> None:
    assert detect_collapse(_hist([0.5, 0.7, 0.9], [1.2, 0.8, 0.3]), 7) is None


def test_rule_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError):
        CollapseRule(patience=3)


LABELS = ["coupe", "sedan", "suv"]


@pytest.mark.parametrize(
    ("cm", "pattern"),
    [
        ([[4, 0, 0], [0, 3, 1], [1, 0, 3]], "diagonal"),
        ([[0, 4, 0], [0, 4, 0], [0, 3, 1]], "collapsed onto sedan"),
        ([[2, 2, 0], [3, 1, 0], [0, 1, 3]], "mixed"),  # sedan is mostly read as coupe
        ([[4, 0, 0], [0, 4, 0], [0, 0, 0]], "diagonal"),  # a class absent from the split
        ([[0, 0, 0], [0, 0, 0], [0, 0, 0]], "mixed"),
    ],
)
def test_confusion_pattern(cm: list[list[int]], pattern: str) -> None:
    assert confusion_pattern(np.array(cm), LABELS) == pattern


def test_confusion_pattern_share_is_configurable() -> None:
    cm = np.array([[3, 1, 0], [0, 3, 1], [0, 0, 4]])  # suv: 5 of 12 predictions
    assert confusion_pattern(cm, LABELS, max_class_share=0.4) == "collapsed onto suv"
