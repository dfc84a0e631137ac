"""Evaluate a run or a bundle on one split of a manifest: predictions, metrics, plots, report.

``evaluate`` scores every image of the split, saves ``predictions.parquet`` (path, true label,
predicted label, probabilities), then computes every figure of ``metrics.json`` from that file
alone (:func:`carclf.metrics.full_metrics`), so anyone can recompute them from it. Plots,
Grad-CAM galleries of correct and wrong predictions and one self-contained ``report.html``
go beside them. ``compare`` evaluates several models on the same split and tabulates them,
beside already-evaluated directories of ``carclf baseline`` (``metrics.json`` + ``baseline.json``)
made on that split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from carclf.bundle import BUNDLE_FILE, load_bundle
from carclf.data.audit_report import read_report
from carclf.data.manifest import read_manifest
from carclf.data.transforms import load_image
from carclf.errors import UserInputError
from carclf.explain import Explainer
from carclf.inference import OnnxClassifier
from carclf.metrics import (
    confusion,
    full_metrics,
    reliability,
    roc_auc_per_class,
    softmax,
    temperature_effect,
)
from carclf.models import with_tta
from carclf.plots import (
    plot_confusion,
    plot_f1_bars,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)
from carclf.report import write_html_report
from carclf.runs import EPOCHS_FILE, load_run
from carclf.scoring import (
    LogitsFn,
    Records,
    paths_of,
    score,
    targets_of,
    torch_logits,
    validation_temperature,
)
from carclf.tables import markdown_table, number_cell, write_csv

PREDICTIONS_FILE = "predictions.parquet"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


@dataclass
class Model:
    """What evaluation needs from a run or a bundle."""

    source: Path
    kind: str  # "run" or "bundle"
    labels: list[str]
    logits: LogitsFn  # image paths → the model's own logits [N, K]
    temperature: float | None  # the bundle's softmax temperature; None: fit on validation
    explainer: Callable[[], Explainer]
    config: dict
    epochs_csv: Path | None


@dataclass
class EvalResult:
    """Where an evaluation wrote its files, and its metrics."""

    out_dir: Path
    metrics: dict
    report: Path


def load_model(source: str | Path, tta: str | None = None) -> Model:
    """A bundle (scored by onnxruntime) or a run's best checkpoint (scored by PyTorch).

    Args:
        source: a run or a bundle directory.
        tta: test-time augmentation (``export.tta``) of a run; default the run's own config's.
            A bundle's is part of its ONNX graph: asking for another is refused.
    """
    source = Path(source)
    if (source / BUNDLE_FILE).is_file():
        bundle = load_bundle(source)
        baked = bundle.info.tta
        if tta is not None and tta != baked:
            raise UserInputError(
                f"{source}: the bundle's model runs tta={baked} (in its ONNX graph); "
                f"export the run with --tta {tta} for another"
            )
        clf = OnnxClassifier(bundle, threads=torch.get_num_threads())
        return Model(
            source=source,
            kind="bundle",
            labels=clf.labels,
            logits=lambda paths: clf.raw_logits(clf.preprocess([load_image(p) for p in paths])),
            temperature=bundle.info.temperature,
            explainer=lambda: Explainer.from_bundle(bundle),
            config=bundle.info.model_dump(mode="json", exclude={"files"}),
            epochs_csv=None,
        )
    trained = load_run(source)
    epochs = source / EPOCHS_FILE
    tested = with_tta(trained.model, tta or trained.cfg.export.tta)
    return Model(
        source=source,
        kind="run",
        labels=trained.labels,
        logits=torch_logits(tested, trained.preprocess),
        temperature=None,
        explainer=lambda: Explainer(trained.model, trained.preprocess, trained.labels),
        config=trained.cfg.model_dump(mode="json"),
        epochs_csv=epochs if epochs.is_file() else None,
    )


def _temperature(model: Model, val: Records) -> tuple[float, str]:
    """The bundle's temperature, or one fitted on the manifest's validation split for a run."""
    if model.temperature is not None:
        return model.temperature, "bundle.json"
    fitted = validation_temperature(model.logits, val)
    if fitted is None:
        return 1.0, "no validation images: not fitted"
    return fitted, "fitted on the validation split"


def check_labels(model_labels: list[str], data_labels: list[str], manifest: str | Path) -> None:
    """Refuse a manifest whose label map is not the model's; the message names the difference."""
    if model_labels == data_labels:
        return
    only_model = sorted(set(model_labels) - set(data_labels))
    only_data = sorted(set(data_labels) - set(model_labels))
    parts = [f"only in the model: {', '.join(only_model)}"] if only_model else []
    parts += [f"only in the manifest: {', '.join(only_data)}"] if only_data else []
    reason = "; ".join(parts) or "same names, different order"
    raise UserInputError(f"{manifest}: labels differ from the model's ({reason})")


# --- predictions.parquet -------------------------------------------------------------------------


def write_predictions(
    paths: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    out: Path,
    logits: np.ndarray | None = None,
) -> Path:
    """Save one row per image; the label map rides in the metadata for :func:`read_predictions`.

    ``probabilities`` are what the model serves (temperature applied); ``logits`` (optional)
    are the model's own, before the temperature.
    """
    columns = {
        "path": paths,
        "true_label": [labels[i] for i in y_true],
        "pred_label": [labels[i] for i in probs.argmax(1)],
        "probabilities": [row.tolist() for row in probs.astype(np.float64)],
    }
    if logits is not None:
        columns["logits"] = [row.tolist() for row in logits.astype(np.float64)]
    table = pa.table(columns).replace_schema_metadata(
        {b"carclf.labels": json.dumps(labels).encode()}
    )
    pq.write_table(table, out)
    return out


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Paths, true label indices, probabilities ``[N, K]`` and label map of a predictions file."""
    table = pq.read_table(path)
    labels = json.loads(table.schema.metadata[b"carclf.labels"])
    index = {name: i for i, name in enumerate(labels)}
    y_true = np.array([index[name] for name in table["true_label"].to_pylist()])
    probs = np.array(table["probabilities"].to_pylist(), dtype=np.float64)
    return table["path"].to_pylist(), y_true, probs, labels


# --- plots and galleries ------------------------------------------------------------------------


def write_plots(
    y_true: np.ndarray,
    logits: np.ndarray,
    probs: np.ndarray,
    metrics: dict,
    model: Model,
    out: Path,
) -> dict[str, Path]:
    """Every figure of the report, by title (the reliability diagram before and after scaling)."""
    labels = metrics["labels"]
    cm = confusion(y_true, probs.argmax(1), len(labels))
    aucs = [a for a, _ in roc_auc_per_class(y_true, probs)]
    f1 = {name: row["f1-score"] for name, row in metrics["per_class"].items()}
    plots = {
        "Confusion matrix (counts)": plot_confusion(
            cm, labels, out / "confusion_matrix.png", False
        ),
        "Confusion matrix (row-normalised)": plot_confusion(
            cm, labels, out / "confusion_matrix_normalised.png", True
        ),
        "ROC curves": plot_roc(y_true, probs, labels, aucs, out / "roc.png"),
        "Per-class F1": plot_f1_bars(f1, out / "f1_per_class.png"),
        "Reliability diagram": plot_reliability(
            reliability(y_true, softmax(logits)), out / "reliability.png", metrics["calibration"]
        ),
    }
    if model.epochs_csv is not None:
        plots["Training curves"] = plot_training_curves(model.epochs_csv, out / "training.png")
    return plots


def write_galleries(
    paths: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    model: Model,
    out: Path,
    per_group: int,
    seed: int = 0,
) -> dict[str, dict]:
    """Grad-CAM overlays for a random sample of correct and of wrong predictions.

    Returns:
        ``{"correct"|"wrong": {"total": int, "items": [{"image", "true", "pred", "score"}]}}``.
    """
    y_pred = probs.argmax(1)
    rng = random.Random(seed)
    groups = {
        "correct": np.flatnonzero(y_pred == y_true),
        "wrong": np.flatnonzero(y_pred != y_true),
    }
    chosen = {g: sorted(rng.sample(list(ix), min(per_group, len(ix)))) for g, ix in groups.items()}
    explainer = model.explainer() if any(chosen.values()) else None
    galleries = {}
    for group, indices in chosen.items():
        items = []
        for start in range(0, len(indices), 16):
            batch = indices[start : start + 16]
            exps = explainer.explain([load_image(paths[i]) for i in batch])
            for i, exp in zip(batch, exps, strict=True):
                file = out / "gallery" / group / f"{i:05d}_{Path(paths[i]).stem}.png"
                file.parent.mkdir(parents=True, exist_ok=True)
                exp.overlay.save(file)
                items.append(
                    {
                        "image": str(file.relative_to(out)),
                        "path": paths[i],
                        "true": model.labels[y_true[i]],
                        "pred": model.labels[y_pred[i]],
                        "score": float(probs[i, y_pred[i]]),
                    }
                )
        galleries[group] = {"total": len(groups[group]), "items": items}
    return galleries


# --- the command --------------------------------------------------------------------------------


def evaluate(
    source: str | Path,
    manifest: str | Path,
    split: str,
    out: str | Path,
    gallery_size: int = 12,
    tta: str | None = None,
) -> EvalResult:
    """Score every image of ``split`` and write predictions, metrics, plots and a report.

    Args:
        source: a run directory or a bundle directory.
        manifest: the Parquet manifest to read the split from.
        split: ``train``, ``val`` or ``test``.
        out: directory for ``predictions.parquet``, ``metrics.json``, PNGs and ``report.html``.
        gallery_size: Grad-CAM overlays per gallery (correct and wrong); 0 for none.
        tta: a run's test-time augmentation (:func:`load_model`); default its config's.
    """
    out = Path(out)
    data = read_manifest(manifest)
    model = load_model(source, tta)
    check_labels(model.labels, data.labels, manifest)
    records = data.split(split)
    if not records:
        raise UserInputError(f"{manifest}: split {split!r} is empty")
    paths = paths_of(records)
    y_true = targets_of(records)
    temperature, how = _temperature(model, data.split("val"))
    logits = score(paths, model.logits).astype(np.float64)
    probs = softmax(logits / temperature)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(paths, y_true, probs, model.labels, out / PREDICTIONS_FILE, logits)
    paths, y_true, probs, labels = read_predictions(out / PREDICTIONS_FILE)
    metrics = full_metrics(y_true, probs, labels)
    metrics["temperature_scaling"] = temperature_effect(logits, y_true, temperature, how)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    plots = write_plots(y_true, logits, probs, metrics, model, out)
    galleries = write_galleries(paths, y_true, probs, model, out, gallery_size)
    report = write_html_report(
        out / REPORT_FILE,
        title=f"Evaluation of {model.source.name} ({model.kind}) on {split}",
        metrics=metrics,
        plots=plots,
        galleries=galleries,
        config=model.config,
        audit=read_report(Path(manifest)),
        facts={"source": str(model.source), "manifest": str(manifest), "split": split},
        calibration=metrics["temperature_scaling"],
    )
    return EvalResult(out, metrics, report)


COMPARE_COLUMNS = (
    "acc",
    "balanced_acc",
    "f1_macro",
    "f1_weighted",
    "top3",
    "top5",
    "cohen_kappa",
    "mcc",
    "log_loss",
    "roc_auc_ovr_macro",
    "ece",
)


BASELINE_FILE = "baseline.json"  # written last by ``carclf baseline`` (carclf/baseline.py)


def is_evaluated(source: str | Path) -> bool:
    """Whether ``source`` is a finished baseline: ``metrics.json`` beside ``baseline.json``."""
    return (Path(source) / METRICS_FILE).is_file() and (Path(source) / BASELINE_FILE).is_file()


def _row(model: str, metrics: dict) -> dict:
    """One line of the comparison table."""
    return {"model": model, "n": metrics["n"]} | {k: metrics["summary"][k] for k in COMPARE_COLUMNS}


def evaluated_row(source: str | Path, manifest: str | Path, split: str) -> dict:
    """The comparison row of a baseline directory, made on the same manifest and split only.

    Raises:
        UserInputError: it was made on another manifest or split (both named), or is unreadable.
    """
    source = Path(source)
    try:
        record = json.loads((source / BASELINE_FILE).read_text())
        made_on = (Path(record["manifest"]).resolve(), record["split"])
        metrics = json.loads((source / METRICS_FILE).read_text())
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserInputError(f"{source}: not a readable baseline ({exc!r})") from None
    wanted = (Path(manifest).resolve(), split)
    if made_on != wanted:
        raise UserInputError(
            f"{source}: made on split {made_on[1]!r} of {made_on[0]}, but this comparison is "
            f"on split {wanted[1]!r} of {wanted[0]}"
        )
    return _row(f"{record.get('kind', 'linear probe')}: {source}", metrics)


def compare(sources: list[str | Path], manifest: str | Path, split: str, out: str | Path) -> Path:
    """Evaluate each run or bundle on the same split; write ``comparison.csv`` and ``.md``.

    Each model's full evaluation goes to ``out/<index>_<name>/``. A baseline directory
    (:func:`is_evaluated`) is not evaluated again: its row is read from its ``metrics.json``.

    Returns:
        The Markdown table's path.
    """
    out = Path(out)
    # Baselines first, so a mismatched one is refused before the others are evaluated.
    ready = {i: evaluated_row(s, manifest, split) for i, s in enumerate(sources) if is_evaluated(s)}
    rows = []
    for i, source in enumerate(sources):
        if i in ready:
            rows.append(ready[i])
            continue
        result = evaluate(source, manifest, split, out / f"{i}_{Path(source).name}", gallery_size=0)
        rows.append(_row(str(source), result.metrics))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "comparison.csv")
    lines = markdown_table(rows, number_cell(digits=4, missing="n/a"))
    md = out / "comparison.md"
    md.write_text(f"# Comparison on `{split}` of `{manifest}`\n\n" + "\n".join(lines) + "\n")
    return md
