"""Every figure renders, from a handful of classes to Stanford Cars' 196, on fake predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carclf.metrics import confusion, full_metrics, roc_auc_per_class
from carclf.plots import (
    confusion_order,
    plot_confusion,
    plot_f1_bars,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)


def fake_predictions(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 2.5 * np.eye(k)[y]
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def assert_image(path: Path, min_side: int = 300) -> None:
    assert path.stat().st_size > 10_000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert min(img.size) >= min_side
        assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas


@pytest.mark.parametrize("k", [7, 196])
def test_every_plot_renders(k: int, tmp_path: Path) -> None:
    y, p = fake_predictions(k, n=4 * k)
    labels = [f"class_{i:03d}" for i in range(k)]
    metrics = full_metrics(y, p, labels)
    cm = confusion(y, p.argmax(1), k)
    aucs = [a for a, _ in roc_auc_per_class(y, p)]
    f1 = {n: r["f1-score"] for n, r in metrics["per_class"].items()}
    epochs = tmp_path / "epochs.csv"
    epochs.write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,val_f1_macro,lr\n"
        + "\n".join(
            f"{e},{2 / (e + 1)},{e / 5},{2.1 / (e + 1)},{e / 6},{e / 7},{1e-3 / (e + 1)}"
            for e in range(5)
        )
    )
    for path in (
        plot_confusion(cm, labels, tmp_path / "cm.png", normalise=False),
        plot_confusion(cm, labels, tmp_path / "cm_norm.png", normalise=True),
        plot_roc(y, p, labels, aucs, tmp_path / "roc.png"),
        plot_f1_bars(f1, tmp_path / "f1.png"),
        plot_reliability(
            metrics["calibration"], tmp_path / "rel.png", after=metrics["calibration"]
        ),
        plot_training_curves(epochs, tmp_path / "train.png"),
    ):
        assert_image(path)


def test_confusion_order_puts_confused_classes_together() -> None:
    k = 12
    cm = np.eye(k, dtype=int) * 10
    cm[0, 11] = cm[11, 0] = 6  # 0 and 11 are look-alikes
    cm[3, 7] = cm[7, 3] = 5
    order = list(confusion_order(cm))
    assert sorted(order) == list(range(k))
    assert abs(order.index(0) - order.index(11)) == 1
    assert abs(order.index(3) - order.index(7)) == 1
