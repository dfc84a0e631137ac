"""The evaluation's figures as PNG files (matplotlib, Agg backend: no display needed).

Each function takes plain arrays or the dicts of :mod:`carclf.metrics`, writes one file and
returns its path. Figures stay readable from a handful of classes up to a few hundred: past
:data:`CELL_TEXT_MAX` classes the confusion matrix drops per-cell numbers and orders the classes
so that classes confused with each other sit side by side.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on headless workers
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.ticker import MaxNLocator
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from sklearn import metrics as skm

CELL_TEXT_MAX = 30
DPI = 110


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _tick_size(n: int) -> float:
    return float(np.clip(500 / max(n, 1), 3, 9))


# --- training curves -------------------------------------------------------------------------


def read_epochs(path: Path) -> dict[str, np.ndarray]:
    """The columns of a run's ``epochs.csv`` as float arrays."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {key: np.array([float(r[key]) for r in rows]) for key in (rows[0] if rows else {})}


def plot_training_curves(epochs_csv: Path, path: Path) -> Path:
    """Loss, accuracy, macro-F1 and learning rate per epoch, train and validation."""
    cols = read_epochs(epochs_csv)
    epoch = cols.get("epoch", np.arange(len(next(iter(cols.values()), []))))
    panels = [
        ("loss", ["train_loss", "val_loss"]),
        ("accuracy", ["train_acc", "val_acc"]),
        ("macro F1", ["val_f1_macro"]),
        ("learning rate", ["lr"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            if key in cols:
                ax.plot(epoch, cols[key], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


# --- confusion matrix ------------------------------------------------------------------------


def confusion_order(cm: np.ndarray) -> np.ndarray:
    """A class order that puts mutually confused classes next to each other.

    Hierarchical clustering (average linkage, optimal leaf order) with the distance
    ``1 - c_ij / max c`` where ``c_ij`` is the row-normalised confusion between ``i`` and ``j``
    in both directions, so a cluster of look-alikes forms a block near the diagonal.
    """
    k = len(cm)
    if k < 3:
        return np.arange(k)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    sym = norm + norm.T
    np.fill_diagonal(sym, 0)
    dist = 1.0 - sym / (sym.max() or 1.0)
    np.fill_diagonal(dist, 0)
    return leaves_list(linkage(squareform(dist, checks=False), "average", optimal_ordering=True))


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, normalise: bool) -> Path:
    """The confusion matrix (rows true, columns predicted), raw counts or row-normalised.

    Classes are ordered by :func:`confusion_order`; cells carry numbers up to
    :data:`CELL_TEXT_MAX` classes.
    """
    order = confusion_order(cm)
    m = cm[np.ix_(order, order)]
    names = [labels[i] for i in order]
    shown = m / np.maximum(m.sum(axis=1, keepdims=True), 1) if normalise else m
    k = len(labels)
    side = float(np.clip(0.08 * k + 4, 6, 18))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    # Log-like colour scale for counts keeps rare confusions visible next to a full diagonal.
    norm = None if normalise else PowerNorm(0.5, vmin=0, vmax=max(m.max(), 1))
    im = ax.imshow(
        shown, cmap="Blues", norm=norm, vmin=0 if normalise else None, vmax=1 if normalise else None
    )
    size = _tick_size(k)
    ax.set_xticks(range(k), names, rotation=90, fontsize=size)
    ax.set_yticks(range(k), names, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= CELL_TEXT_MAX:
        top = shown.max() or 1
        for i, j in np.ndindex(m.shape):
            text = f"{shown[i, j]:.2f}" if normalise else str(int(m[i, j]))
            colour = "white" if shown[i, j] > 0.5 * top else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    kind = "row-normalised" if normalise else "counts"
    ax.set_title(f"Confusion matrix ({kind}, classes ordered by confusion)")
    return _save(fig, path)


# --- ROC, per-class F1, reliability ----------------------------------------------------------


def plot_roc(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    aucs: list[float | None],
    path: Path,
    worst: int = 5,
) -> Path:
    """One-vs-rest ROC: the micro and macro average curves and the ``worst`` classes' curves.

    Args:
        aucs: per-class AUC from :func:`carclf.metrics.roc_auc_per_class`, None where undefined.
    """
    k = probs.shape[1]
    onehot = np.eye(k)[y_true]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    fpr, tpr, _ = skm.roc_curve(onehot.ravel(), probs.ravel())
    ax.plot(fpr, tpr, lw=2, label=f"micro (AUC {skm.auc(fpr, tpr):.3f})")
    grid = np.linspace(0, 1, 201)
    defined = [i for i in range(k) if aucs[i] is not None]
    curves = {i: skm.roc_curve(onehot[:, i], probs[:, i])[:2] for i in defined}
    if defined:
        mean_tpr = np.mean([np.interp(grid, *curves[i]) for i in defined], axis=0)
        macro = float(np.mean([aucs[i] for i in defined]))
        ax.plot(grid, mean_tpr, lw=2, label=f"macro (AUC {macro:.3f}, {len(defined)} classes)")
    for i in sorted(defined, key=lambda i: aucs[i])[:worst]:
        ax.plot(*curves[i], lw=1, alpha=0.8, label=f"{labels[i]} (AUC {aucs[i]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC one-vs-rest: averages and worst classes")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_f1_bars(f1: dict[str, float], path: Path, n: int = 20) -> Path:
    """Per-class F1: the ``n`` best and ``n`` worst classes (all of them when few)."""
    ranked = sorted(f1.items(), key=lambda kv: kv[1])
    groups = (
        [("all classes", ranked)]
        if len(ranked) <= 2 * n
        else [
            (f"worst {n}", ranked[:n]),
            (f"best {n}", ranked[-n:]),
        ]
    )
    rows = max(len(g) for _, g in groups)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 0.28 * rows + 1.5))
    for ax, (title, group) in zip(np.atleast_1d(axes), groups, strict=True):
        names, values = zip(*group, strict=True)
        bars = ax.barh(range(len(group)), values, color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)  # a zero bar still shows its value
        ax.set_yticks(range(len(group)), names, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("F1")
        ax.set_title(f"Per-class F1: {title}")
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _accuracy(bins: dict) -> np.ndarray:
    return np.array([a if a is not None else 0.0 for a in bins["accuracy"]])


def plot_reliability(bins: dict, path: Path, after: dict | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per bin, and how many images each holds.

    Args:
        bins: :func:`carclf.metrics.reliability` of the predictions.
        after: the same after temperature scaling, drawn on top when given.
    """
    lower, upper = np.array(bins["lower"]), np.array(bins["upper"])
    centre, width = (lower + upper) / 2, upper - lower
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    ax.bar(
        centre,
        _accuracy(bins),
        width=width,
        alpha=0.6,
        color="tab:blue",
        edgecolor="k",
        label="accuracy per bin",
    )
    hist.bar(centre, bins["count"], width=width, alpha=0.6, color="tab:blue", edgecolor="k")
    if after is not None:
        shown = np.array(after["count"]) > 0
        ax.plot(
            centre[shown],
            _accuracy(after)[shown],
            "o-",
            color="tab:orange",
            label="after temperature scaling",
        )
        hist.step(centre, after["count"], where="mid", color="tab:orange")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Reliability diagram (top-1 confidence)")
    ax.legend(fontsize=8, loc="upper left")
    hist.set_xlabel("confidence")
    hist.set_ylabel("images")
    hist.set_xlim(0, 1)
    return _save(fig, path)


# --- searches (carclf tune) ------------------------------------------------------------------


def plot_search_trials(rows: list[dict], metric: str, path: Path) -> Path:
    """The best ``metric`` of every trial in the order trials started, one line per study;
    collapsed trials as red crosses, trials without a value at the bottom edge."""
    fig, ax = plt.subplots(figsize=(7, 4))
    studies = list(dict.fromkeys(r["study"] for r in rows))
    for study in studies:
        mine = [r for r in rows if r["study"] == study]
        x = np.array([r["order"] for r in mine])
        y = np.array([np.nan if r[metric] is None else r[metric] for r in mine], dtype=float)
        ax.plot(x, y, "o-", label=study, alpha=0.8)
        bad = np.array([r["collapsed"] for r in mine], dtype=bool)
        if bad.any():
            ax.plot(x[bad], np.nan_to_num(y[bad]), "x", color="red", ms=10, mew=2)
    ax.plot([], [], "x", color="red", ms=10, mew=2, label="collapsed")
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_param_importances(importances: dict[str, dict[str, float]], path: Path) -> Path:
    """Horizontal bars of parameter importance, one panel per study."""
    fig, axes = plt.subplots(1, len(importances), figsize=(5 * len(importances), 3), squeeze=False)
    for ax, (study, values) in zip(axes[0], importances.items(), strict=True):
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="tab:blue")
        ax.set_title(study)
        ax.set_xlabel("importance (Optuna)")
        ax.tick_params(axis="y", labelsize=8)
    return _save(fig, path)
