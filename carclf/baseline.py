"""``carclf baseline``: the linear probe on a config's frozen backbone, the figure to beat.

A fine-tune is worth its cost only if it beats logistic regression on the features the
pretrained backbone already gives. The story, top-down (:func:`run_baseline`):

1. The config's data becomes a manifest as for every command (``runs.resolve_manifest``:
   ``data.manifest`` as it is, ``data.root`` audited beside ``output_dir``; no Ray). The train,
   val and evaluated splits must have images, and train at least two classes.
2. The config's model is built with its pretrained weights (:func:`frozen_model`), in eval mode,
   frozen, on the CPU; its features are what its classifier head sees
   (:func:`carclf.probe.backbone_features`, through the model's eval preprocessing).
3. :func:`carclf.probe.fit_probe` standardises them and fits logistic regression on train, C
   chosen by validation accuracy; validation never trains it.
4. The output directory gets what ``carclf evaluate`` writes for metrics —
   ``predictions.parquet`` and ``metrics.json`` computed from it alone, same keys — plus
   ``config.yaml`` and, last, ``baseline.json`` (:data:`carclf.evaluate.BASELINE_FILE`): the model,
   its weights, the C grid, the manifest and split, timings. ``carclf compare`` reads such a
   directory as one more row beside runs and bundles.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carclf import __version__
from carclf.config import Config, save_config
from carclf.data.manifest import Manifest
from carclf.data.transforms import Preprocess
from carclf.errors import UserInputError
from carclf.evaluate import (
    BASELINE_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    read_predictions,
    write_predictions,
)
from carclf.metrics import full_metrics, temperature_effect
from carclf.models import build_model, model_preprocess
from carclf.paths import ExperimentPaths
from carclf.probe import C_GRID, MAX_ITER, Probe, backbone_features, fit_probe
from carclf.runs import resolve_manifest, training_manifest
from carclf.scoring import BATCH, Records, paths_of, targets_of
from carclf.storage import is_uri
from carclf.weights import WeightsReport

# The probe's probabilities are what it serves: no temperature is fitted on top of them.
NO_TEMPERATURE = "linear probe: logistic regression probabilities, no temperature"
# Classes absent from train get probability 0; their log is floored so logits stay finite.
LOG_FLOOR = np.finfo(np.float64).tiny


@dataclass
class BaselineResult:
    """Where the baseline wrote its files, its metrics and its ``baseline.json`` record."""

    out_dir: Path
    metrics: dict
    record: dict

    def summary_line(self) -> str:
        """One line for the command's output: model, features, C and accuracy."""
        r = self.record
        return (
            f"linear probe of {r['model']} ({r['feature_dim']} features, C={r['chosen_C']:g}): "
            f"{r['split']} acc {self.metrics['summary']['acc']:.4f}, written to {self.out_dir}"
        )


def default_out(cfg: Config) -> Path:
    """``baseline/`` beside the config's ``output_dir`` (for ``runs/x/train``: ``runs/x/baseline``).

    Raises:
        UserInputError: ``output_dir`` is a URI; the baseline is written locally only.
    """
    if is_uri(cfg.output_dir):
        raise UserInputError(
            f"output_dir {cfg.output_dir} is a URI: give the baseline a local --out directory"
        )
    return ExperimentPaths.of(cfg).baseline


def probe_splits(data: Manifest, split: str) -> dict[str, Records]:
    """The records of train, val (which chooses C) and ``split``, refused when unusable.

    Raises:
        UserInputError: one of them has no images (or does not exist), or train has one class.
    """
    manifest = data.path
    parts = {"train": data.split("train"), "val": data.split("val"), split: data.split(split)}
    for name, records in parts.items():
        if not records:
            have = ", ".join(data.splits) or "none"
            raise UserInputError(f"{manifest}: split {name!r} has no images (its splits: {have})")
    if len(set(targets_of(parts["train"]).tolist())) < 2:
        raise UserInputError(
            f"{manifest}: the train split has one class only; a linear probe needs two or more"
        )
    return parts


def frozen_model(cfg: Config, num_classes: int) -> tuple[nn.Module, WeightsReport | None]:
    """The config's model with its pretrained weights, in eval mode, frozen, on the CPU.

    The seed is fixed around the build, so a random-init model (``pretrained: false``) gives
    the same features every time without touching the caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, weights = build_model(cfg.model, num_classes)
    return model.cpu().eval().requires_grad_(False), weights


def extract_features(
    model: nn.Module, pre: Preprocess, parts: dict[str, Records], batch: int = BATCH
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split name → (the classifier head's input ``[N, D]``, the label indices ``[N]``).

    In float64: scikit-learn keeps float32 inputs float32, and its float32 probabilities miss
    summing to one by more than the metrics' log loss accepts without a warning.
    """
    with torch.inference_mode():
        return {
            name: (
                backbone_features(model, paths_of(records), pre, batch).astype(np.float64),
                targets_of(records),
            )
            for name, records in parts.items()
        }


def probe_probabilities(probe: Probe, features: np.ndarray, num_classes: int) -> np.ndarray:
    """``[N, K]`` probabilities over every label; classes absent from train get 0."""
    probs = np.zeros((len(features), num_classes))
    probs[:, probe.pipeline.classes_] = probe.pipeline.predict_proba(features)
    return probs


def write_outputs(
    out: Path, paths: list[str], y_true: np.ndarray, probs: np.ndarray, labels: list[str]
) -> dict:
    """``predictions.parquet`` and ``metrics.json`` as ``carclf evaluate`` writes them.

    As there, every figure is computed from the saved predictions alone, so anyone can
    recompute them; ``temperature_scaling`` records temperature 1 (none fitted).
    """
    out.mkdir(parents=True, exist_ok=True)
    logits = np.log(np.maximum(probs, LOG_FLOOR))
    write_predictions(paths, y_true, probs, labels, out / PREDICTIONS_FILE, logits)
    _, y_true, probs, labels = read_predictions(out / PREDICTIONS_FILE)
    metrics = full_metrics(y_true, probs, labels)
    metrics["temperature_scaling"] = temperature_effect(logits, y_true, 1.0, NO_TEMPERATURE)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def baseline_record(
    cfg: Config,
    data: Manifest,
    split: str,
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    probe: Probe,
    weights: WeightsReport | None,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """What ``baseline.json`` holds: model and weights, data, the C grid, timings."""
    trained = set(probe.pipeline.classes_.tolist())
    return {
        "kind": "linear probe",
        "model": cfg.model.name,
        "pretrained": cfg.model.pretrained,
        "pretrained_file": cfg.model.pretrained_file,
        "weights": weights.as_dict() if weights else None,
        "head_hidden": cfg.model.head_hidden,
        "feature_dim": int(features["train"][0].shape[1]),
        "n": {name: len(y) for name, (_, y) in features.items()},
        "manifest": str(data.path),
        "split": split,
        "classifier": "StandardScaler + LogisticRegression (lbfgs)",
        "max_iter": MAX_ITER,
        "seed": cfg.seed,
        "C_grid": [{"C": c, "val_acc": acc} for c, acc in sorted(probe.val_acc_by_c.items())],
        "chosen_C": probe.c,
        "labels_absent_from_train": [x for i, x in enumerate(data.labels) if i not in trained],
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "carclf_version": __version__,
    }


def run_baseline(cfg: Config, split: str = "test", out: str | Path | None = None) -> BaselineResult:
    """Fit the linear probe on the config's frozen backbone and score it on ``split``.

    Args:
        cfg: the config whose data and model (with its pretrained weights) are probed.
        split: the manifest split to score (train and val are always read).
        out: output directory; default :func:`default_out`.

    Raises:
        UserInputError: an unusable split, a URI ``output_dir`` without ``out``, or whatever
            the model's build refuses (name, weights).
    """
    out = Path(out) if out is not None else default_out(cfg)
    data = training_manifest(resolve_manifest(cfg), cfg)
    parts = probe_splits(data, split)
    clock = time.perf_counter()
    model, weights = frozen_model(cfg, len(data.labels))
    pre = model_preprocess(cfg.model)
    seconds = {"model": time.perf_counter() - clock}
    clock = time.perf_counter()
    features = extract_features(model, pre, parts)
    seconds["features"] = time.perf_counter() - clock
    clock = time.perf_counter()
    probe = fit_probe(*features["train"], *features["val"], seed=cfg.seed, grid=C_GRID)
    seconds["fit"] = time.perf_counter() - clock
    probs = probe_probabilities(probe, features[split][0], len(data.labels))
    # An earlier baseline's record must not vouch for files this one is about to replace.
    (out / BASELINE_FILE).unlink(missing_ok=True)
    metrics = write_outputs(out, paths_of(parts[split]), features[split][1], probs, data.labels)
    record = baseline_record(cfg, data, split, features, probe, weights, seconds)
    record["acc"] = metrics["summary"]["acc"]
    save_config(cfg, out)
    # Written last: a directory with baseline.json is a finished baseline (compare reads it).
    (out / BASELINE_FILE).write_text(json.dumps(record, indent=2))
    return BaselineResult(out, metrics, record)
