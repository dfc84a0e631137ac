"""Evaluate a run or a bundle on one split of a manifest: predictions, metrics, plots, report."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on headless workers
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn import metrics as skm

from carclf.bundle import BUNDLE_FILE, load_bundle
from carclf.data.manifest import read_manifest
from carclf.data.transforms import eval_transform, load_image
from carclf.errors import UserInputError
from carclf.inference import OnnxClassifier
from carclf.metrics import confusion, core_metrics, softmax
from carclf.train import load_run

Scorer = Callable[[list[str]], np.ndarray]  # image paths → probabilities [N, K]


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    report: Path


def _scorer(source: Path) -> tuple[Scorer, list[str]]:
    """Probabilities from a bundle (onnxruntime) or a run's best checkpoint (PyTorch)."""
    if (source / BUNDLE_FILE).is_file():
        clf = OnnxClassifier(load_bundle(source), threads=torch.get_num_threads())
        return lambda paths: clf.probabilities([load_image(p) for p in paths]), clf.labels
    trained = load_run(source)
    transform = eval_transform(trained.preprocess)

    def score(paths: list[str]) -> np.ndarray:
        batch = torch.stack([transform(load_image(p)) for p in paths])
        with torch.no_grad():
            return softmax(trained.model(batch).numpy())

    return score, trained.labels


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """The metrics of ``metrics.json``: summary figures plus the per-class report."""
    y_pred = probs.argmax(1)
    idx = np.arange(len(labels))
    summary = core_metrics(y_true, probs)
    summary["balanced_acc"] = float(skm.balanced_accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=idx, average=avg, zero_division=0
        )
        summary |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    per_class = skm.classification_report(
        y_true, y_pred, labels=idx, target_names=labels, output_dict=True, zero_division=0
    )
    return {"n": len(y_true), "summary": summary, "per_class": {k: per_class[k] for k in labels}}


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix with counts, readable for a handful of classes."""
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 30:
        for i, j in np.ndindex(cm.shape):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("Confusion matrix (row-normalised, counts shown)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _report(metrics: dict, source: Path, split: str, out: Path) -> Path:
    s = metrics["summary"]
    lines = [f"# Evaluation of `{source}` on `{split}`", "", f"{metrics['n']} images.", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in s.items()]
    lines += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | "
            f"{row['f1-score']:.3f} | {int(row['support'])} |"
        )
    lines += ["", "![confusion matrix](confusion_matrix.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def evaluate(source: str | Path, manifest: str | Path, split: str, out: str | Path) -> EvalResult:
    """Score every image of ``split`` and write predictions, metrics, plots and a report.

    Args:
        source: a run directory or a bundle directory.
        manifest: the Parquet manifest to read the split from.
        split: ``train``, ``val`` or ``test``.
        out: directory for ``predictions.parquet``, ``metrics.json``, PNGs and ``report.md``.
    """
    source, out = Path(source), Path(out)
    data = read_manifest(manifest)
    score, labels = _scorer(source)
    if labels != data.labels:
        differ = sorted(set(labels) ^ set(data.labels)) or ["(same names, different order)"]
        raise UserInputError(f"{manifest}: labels differ from the model's: {', '.join(differ)}")
    records = data.split(split)
    if not records:
        raise UserInputError(f"{manifest}: split {split!r} is empty")
    paths = [p for p, _ in records]
    y_true = np.array([y for _, y in records])
    probs = np.concatenate([score(paths[i : i + 64]) for i in range(0, len(paths), 64)])
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "path": paths,
                "true_label": [labels[i] for i in y_true],
                "pred_label": [labels[i] for i in probs.argmax(1)],
                "probabilities": [row.tolist() for row in probs.astype(np.float32)],
            }
        ),
        out / "predictions.parquet",
    )
    metrics = compute_metrics(y_true, probs, labels)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_confusion(
        confusion(y_true, probs.argmax(1), len(labels)), labels, out / "confusion_matrix.png"
    )
    return EvalResult(out, metrics, _report(metrics, source, split, out))
