"""The pipeline: data audit → search → final training → export (parity-gated bundle) → evaluation.

``run_pipeline`` is the part after the data stage (Ray Train → bundle → evaluation), shared by
``carclf demo`` and the cluster job. ``run_job`` is the whole pipeline that ``jobs.pipeline``
submits: it checks the data set first (a missing one fails in seconds, before Ray starts), audits
``data.root``, runs the ``tune`` studies and trains the winner. Outputs sit beside the final run
directory: for ``output_dir: runs/x/train`` the manifest is ``runs/x/manifest.parquet``, the search
``runs/x/tune``, the bundle ``runs/x/bundle`` and the evaluation ``runs/x/eval``. A URI
``output_dir`` (``s3://…``) gets the same layout there: Ray Train writes its checkpoints straight
to it and the rest is written to a local staging directory and copied up (:mod:`carclf.storage`).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyarrow import fs as pafs

from carclf.config import Config, load_config
from carclf.errors import UserInputError
from carclf.storage import Storage, open_storage

# The stages import torch, timm and Ray (half a minute on a busy 2-core node): they are imported
# where they run, so that a job with a missing data set fails before that.
if TYPE_CHECKING:
    from carclf.bundle import Bundle
    from carclf.evaluate import EvalResult
    from carclf.train import TrainResult


@dataclass
class PipelineResult:
    trained: TrainResult
    bundle: Bundle
    evaluation: EvalResult


def progress(text: str) -> None:
    """One progress line on stderr."""
    print(f"[carclf] {text}", file=sys.stderr, flush=True)


def run_pipeline(
    cfg: Config, bundle_name: str | None = None, storage: Storage | None = None
) -> PipelineResult:
    """Train ``cfg``, export its best checkpoint and evaluate the bundle on the test split.

    ``storage`` receives Ray Train's checkpoints (default: ``cfg.output_dir`` itself).
    """
    from carclf.evaluate import evaluate
    from carclf.export import export_run
    from carclf.train import run_training

    base = Path(cfg.output_dir).resolve().parent
    progress(
        f"Ray Train: {cfg.model.name}, {cfg.scaling.num_workers} workers, "
        f"{cfg.train.epochs} epochs → {cfg.output_dir}"
    )
    trained = run_training(cfg, storage=storage)
    progress("export: ONNX + safetensors, parity check against PyTorch")
    bundle = export_run(trained.run_dir, base / "bundle", name=bundle_name)
    progress("evaluate the bundle on the test split")
    evaluation = evaluate(bundle.path, trained.manifest, "test", base / "eval")
    return PipelineResult(trained, bundle, evaluation)


@dataclass
class JobResult:
    """What the whole pipeline produced; ``bundle_uri`` is where the bundle now lives."""

    pipeline: PipelineResult
    experiment: Path | None
    bundle_uri: str


def check_data(cfg: Config) -> None:
    """Refuse a missing data set in a second, before anything heavy is imported or started."""
    if cfg.data.manifest:
        if not Path(cfg.data.manifest).is_file():
            raise UserInputError(f"data.manifest: no such file: {cfg.data.manifest}")
    elif not Path(cfg.data.root).is_dir():
        raise UserInputError(f"data.root: no such directory: {cfg.data.root}")


def _with(cfg: Config, **update: object) -> Config:
    """A copy of ``cfg`` with top-level keys or a new ``data.manifest`` replaced."""
    if "manifest" in update:
        data = cfg.data.model_copy(update={"manifest": str(update.pop("manifest"))})
        update["data"] = data
    return cfg.model_copy(update=update)


def winner_config(experiment: Path, output_dir: Path) -> Config:
    """The search's ``best_config.yaml``, retargeted to the final run directory."""
    best = experiment / "best_config.yaml"
    if not best.is_file():
        raise RuntimeError(f"{experiment}: the search found no healthy trial (no {best.name})")
    return load_config(best, [f"output_dir={output_dir}"])


def run_job(
    cfg: Config,
    staging: Path | None = None,
    filesystem: pafs.FileSystem | None = None,
    bundle_name: str | None = None,
) -> JobResult:
    """Audit → search (when ``cfg.tune``) → final training → export → evaluation → upload.

    Args:
        cfg: the job's config; ``output_dir`` (the final run directory) may be a URI.
        staging: local directory for what carclf writes when ``output_dir`` is not on the local
            filesystem (default: a new temporary directory).
        filesystem: a pyarrow filesystem that ``output_dir`` is a path inside (instead of a URI).
        bundle_name: the model's name in the bundle (default: the config's task).
    """
    check_data(cfg)
    from carclf.data.audit import write_audit
    from carclf.tune import run_tune

    storage = open_storage(cfg.output_dir, filesystem)
    if storage.is_local:
        run_dir = Path(storage.path)
    else:
        run_dir = Path(staging or tempfile.mkdtemp(prefix="carclf-staging-")) / storage.name
        progress(f"outputs → {storage.path} on {storage.filesystem.type_name}, staged in {run_dir}")
    base = run_dir.parent
    cfg = _with(cfg, output_dir=str(run_dir))
    if not cfg.data.manifest:
        progress(f"audit {cfg.data.root}")
        cfg = _with(
            cfg, manifest=write_audit(cfg.data.root, base / "manifest.parquet", seed=cfg.seed)
        )
    experiment = None
    if cfg.tune is not None:
        progress(f"search: studies {', '.join(cfg.tune.studies)} → {base / 'tune'}")
        experiment = run_tune(_with(cfg, output_dir=str(base / "tune")))
        cfg = winner_config(experiment, run_dir)
        progress(f"winner: {cfg.model.name}, lr {cfg.train.lr:.2e}")
    result = run_pipeline(cfg, bundle_name=bundle_name, storage=storage)
    if not storage.is_local:
        progress(f"copy the outputs up to {storage.parent().uri}")
        storage.parent().upload(base)
    return JobResult(result, experiment, storage.sibling("bundle").uri)
