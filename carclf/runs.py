"""The run directory and checkpoint format: the one module that knows where a run keeps what.

A run directory (``output_dir`` of ``carclf train``) holds::

    config.yaml            the resolved config (carclf.config.save_config)
    epochs.csv             one row of metrics per epoch (EPOCHS_FILE)
    tensorboard/           the same scalars for TensorBoard
    checkpoint_*/          Ray Train's checkpoints, each:
        model.safetensors  the weights (the EMA weights when train.ema_decay is set)
        raw_model.safetensors  with train.ema_decay: the raw weights training resumes from
        train_state.pt     optimizer, schedule and AMP scaler state: tensors and numbers only
        train_state.json   epoch and early-stopping state
        meta.json          config, label order, preprocessing, metrics, manifest path
    run.json               written last: names the best checkpoint and its metrics

A run without ``run.json`` is unfinished (still training, or stopped by Tune). When the data
comes as ``data.root``, its audited manifest is ``manifest.parquet`` beside the run directory
(:attr:`carclf.paths.ExperimentPaths.manifest`), whichever command audits it. The trainer writes
this format; export, evaluation and the search's report read it through the functions here.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from carclf.config import Config
from carclf.data.audit import write_audit
from carclf.data.manifest import Manifest, read_manifest
from carclf.data.reuse import check_unchanged
from carclf.data.transforms import Preprocess
from carclf.errors import UserInputError
from carclf.metrics import Mode, best_of
from carclf.models import create_model
from carclf.paths import ExperimentPaths
from carclf.weights import WeightsReport, load_safetensors

CHECKPOINT_WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"  # read with torch's weights_only unpickler: it runs no code
PROGRESS_FILE = "train_state.json"
RAW_WEIGHTS_FILE = "raw_model.safetensors"
RESUME_KEYS = ("epoch", "optimizer", "schedule", "stopper")
META_FILE = "meta.json"
RUN_FILE = "run.json"
EPOCHS_FILE = "epochs.csv"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"  # the run's MLflow store and run id (tracking.mlflow)
CHECKPOINT_GLOB = "checkpoint_*"
INIT_CHECKPOINT = "checkpoint_init"  # the one checkpoint of a run written without training
BEST_CHECKPOINT_DIR = "best_checkpoint"  # local copy of the best one when storage is remote


def training_manifest(path: str | Path, cfg: Config) -> Manifest:
    """The manifest a run trains on: ``data.train_per_class`` applied (seeded by ``seed``)."""
    manifest = read_manifest(path)
    if cfg.data.train_per_class is None:
        return manifest
    return manifest.limit_per_class("train", cfg.data.train_per_class, cfg.seed)


def resolve_manifest(cfg: Config) -> Path:
    """The manifest a config trains on: ``data.manifest``, or ``data.root`` audited into
    :attr:`~carclf.paths.ExperimentPaths.manifest`, beside the run directory (for ``output_dir:
    runs/x/train``, ``runs/x/manifest.parquet``; an earlier audit of the same tree is reused, a
    different one refused, a changed tree audited again). A ``data.manifest`` whose tree has
    changed since its audit is refused (:func:`carclf.data.reuse.check_unchanged`): it is the
    user's file, never rewritten, and never silently stale.

    The one place where ``data.root`` becomes a manifest, for every command.
    """
    if cfg.data.manifest:
        check_unchanged(cfg.data.manifest)
        return Path(cfg.data.manifest).resolve()
    return write_audit(cfg.data.root, ExperimentPaths.of(cfg).manifest, seed=cfg.seed).resolve()


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_meta(
    cfg: Config,
    manifest: Manifest,
    pre: Preprocess,
    metrics: dict[str, Any],
    weights: WeightsReport | None = None,
) -> dict[str, Any]:
    """What a checkpoint carries beside its weights: config, label order, preprocessing.

    ``pretrained_weights`` records where the initial weights came from when they were a file
    (path, sha256, how names were mapped), so a run can be traced to the exact file.
    """
    return {
        "config": cfg.model_dump(mode="json"),
        "labels": manifest.labels,
        "preprocess": pre.model_dump(mode="json"),
        "metrics": metrics,
        "manifest": str(manifest.path),
        "pretrained_weights": weights.as_dict() if weights is not None else None,
    }


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    meta: dict[str, Any],
    progress: dict[str, Any],
    state: dict[str, Any] | None = None,
    raw_model: nn.Module | None = None,
) -> None:
    """Write a checkpoint into ``directory``; nothing in it needs a code-running unpickler.

    Args:
        directory: the checkpoint directory.
        model: the weights to export (the EMA copy under ``train.ema_decay``).
        meta: config, labels, preprocessing, metrics (:func:`checkpoint_meta`).
        progress: plain bookkeeping, as JSON: the epoch, early-stopping state.
        state: optimizer, schedule and scaler state dicts (tensors, numbers, lists, dicts).
        raw_model: under EMA, the raw weights training resumes from.
    """
    save_file(_tensors(model), str(directory / CHECKPOINT_WEIGHTS_FILE))
    if raw_model is not None:
        save_file(_tensors(raw_model), str(directory / RAW_WEIGHTS_FILE))
    if state is not None:
        torch.save(state, directory / STATE_FILE)
    (directory / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def load_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a checkpoint directory's weights into ``model`` (strict).

    Raises:
        UserInputError: the weights file is unreadable, or its tensors do not fit ``model``.
    """
    path = Path(directory) / CHECKPOINT_WEIGHTS_FILE
    try:
        model.load_state_dict(load_safetensors(path))
    except RuntimeError as exc:  # torch's missing, unexpected or mis-shaped keys
        # torch's first line only names the model class; the next says which keys.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
        why = lines[1] if len(lines) > 1 else lines[0]
        raise UserInputError(
            f"{path}: does not fit the model its run describes ({why[:160]})"
        ) from None
    return model


def _safe_torch_load(path: Path) -> dict[str, Any]:
    """``torch.load`` that accepts tensors, dicts, lists and numbers, and refuses any other
    object: a pickle can run code while it loads, and a run directory may be shared."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = next((ln for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        raise UserInputError(
            f"{path}: refused, it holds objects other than tensors and plain data "
            f"(loading it could run code){': ' + why.strip() if why else ''}"
        ) from None
    if not isinstance(state, dict):
        raise UserInputError(f"{path}: not a training state (a {type(state).__name__})")
    return state


def load_state(directory: str | Path) -> dict[str, Any]:
    """The resume state of a checkpoint: epoch, optimizer, schedule, early stopping (and
    ``raw_model`` weights and ``scaler`` where saved), read without running any pickled code.

    Checkpoints from before ``train_state.json`` keep everything in ``train_state.pt``; the
    same safe unpickler reads them.
    """
    directory = Path(directory)
    state: dict[str, Any] = {}
    if (directory / STATE_FILE).is_file():
        state.update(_safe_torch_load(directory / STATE_FILE))
    if (directory / PROGRESS_FILE).is_file():
        state.update(json.loads((directory / PROGRESS_FILE).read_text()))
    if (directory / RAW_WEIGHTS_FILE).is_file():
        state["raw_model"] = load_safetensors(directory / RAW_WEIGHTS_FILE)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise UserInputError(f"{directory}: not a resumable checkpoint (no {', '.join(missing)})")
    return state


def latest_of(found: list[tuple[Path, dict[str, Any]]]) -> Path | None:
    """Of ``(checkpoint, metrics)`` pairs (:func:`checkpoints`), the last reported epoch's."""
    with_epoch = [c for c in found if "epoch" in c[1]]
    return max(with_epoch, key=lambda c: c[1]["epoch"])[0] if with_epoch else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the run's last reported epoch (the one a rerun resumes from)."""
    return latest_of(list(checkpoints(run_dir)))


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint: config, labels, preprocessing, metrics, manifest."""
    return json.loads((Path(directory) / META_FILE).read_text())


def checkpoints(run_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every checkpoint of a run with its epoch's metrics."""
    for meta in run_dir.glob(f"{CHECKPOINT_GLOB}/{META_FILE}"):
        yield meta.parent, json.loads(meta.read_text())["metrics"]


def best_checkpoint(run_dir: Path, metric: str, mode: Mode) -> tuple[Path, dict[str, Any]]:
    """The checkpoint with the best ``metric``, and that epoch's metrics.

    For a run that has no ``run.json``: a trial stopped by Tune (ASHA, a collapse) never
    returns from its Ray Train run.
    """
    found = list(checkpoints(run_dir))
    if not found:
        raise RuntimeError(f"{run_dir}: the run wrote no checkpoint")
    return best_of(found, lambda c: c[1][metric], mode)


# --- the run as a whole --------------------------------------------------------------------


def write_run_file(run_dir: Path, best_checkpoint: Path, metrics: dict[str, Any]) -> Path:
    """Mark a run finished: ``run.json`` names its best checkpoint and that epoch's metrics.

    Written whole or not at all (a temp file beside it, then one rename): its presence is what
    marks the run finished, so a half-written one would pass for a finished run and not read.
    """
    run = {"best_checkpoint": str(best_checkpoint), "metrics": metrics}
    path = run_dir / RUN_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_FILE}.", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(run, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_finished(run_dir: Path) -> bool:
    """Whether the run wrote ``run.json``."""
    return (run_dir / RUN_FILE).is_file()


def finish_unfinished(run_dir: Path, metric: str, mode: Mode) -> None:
    """Give a run that Tune stopped a ``run.json`` naming its best checkpoint by ``metric``."""
    if not is_finished(run_dir):
        write_run_file(run_dir, *best_checkpoint(run_dir, metric, mode))


def append_epoch(run_dir: Path, row: dict[str, Any]) -> None:
    """Add one epoch's metrics to ``epochs.csv`` (the header comes with the first row)."""
    path = run_dir / EPOCHS_FILE
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return float(text)


def read_epochs(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``epochs.csv`` as numbers; empty when the run has none yet."""
    path = run_dir / EPOCHS_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


@dataclass
class TrainedModel:
    """The best checkpoint of a run, loaded back into PyTorch."""

    model: nn.Module
    cfg: Config
    labels: list[str]
    preprocess: Preprocess
    metrics: dict[str, Any]
    manifest: str


def _best_dir(run_dir: str | Path) -> Path:
    """The best checkpoint that ``run.json`` names; refuses an unfinished run."""
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise UserInputError(f"{run_dir}: not a finished training run (no {RUN_FILE})")
    return Path(json.loads(run_file.read_text())["best_checkpoint"])


def load_run_config(run_dir: str | Path) -> Config:
    """The config a finished run trained with (from its best checkpoint)."""
    return Config.model_validate(read_meta(_best_dir(run_dir))["config"])


def load_run(run_dir: str | Path) -> TrainedModel:
    """Load the best checkpoint of a finished run (``run.json`` names it), in eval mode."""
    ckpt = _best_dir(run_dir)
    meta = read_meta(ckpt)
    cfg = Config.model_validate(meta["config"])
    model = create_model(cfg.model, len(meta["labels"]), pretrained=False)
    load_weights(model, ckpt).eval()
    return TrainedModel(
        model=model,
        cfg=cfg,
        labels=meta["labels"],
        preprocess=Preprocess.model_validate(meta["preprocess"]),
        metrics=meta["metrics"],
        manifest=meta["manifest"],
    )
