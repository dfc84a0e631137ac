"""The pipeline after the data stage: Ray Train → export (parity-gated bundle) → evaluation.

Shared by ``carclf demo`` and ``jobs.pipeline``. Outputs sit beside the run directory: for
``output_dir: runs/x/train`` the bundle is ``runs/x/bundle`` and the evaluation ``runs/x/eval``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from carclf.bundle import Bundle
from carclf.config import Config
from carclf.evaluate import EvalResult, evaluate
from carclf.export import export_run
from carclf.train import TrainResult, run_training


@dataclass
class PipelineResult:
    trained: TrainResult
    bundle: Bundle
    evaluation: EvalResult


def progress(text: str) -> None:
    """One progress line on stderr."""
    print(f"[carclf] {text}", file=sys.stderr, flush=True)


def run_pipeline(cfg: Config, bundle_name: str | None = None) -> PipelineResult:
    """Train ``cfg``, export its best checkpoint and evaluate the bundle on the test split."""
    base = Path(cfg.output_dir).resolve().parent
    progress(
        f"Ray Train: {cfg.model.name}, {cfg.scaling.num_workers} workers, "
        f"{cfg.train.epochs} epochs → {cfg.output_dir}"
    )
    trained = run_training(cfg)
    progress("export: ONNX + safetensors, parity check against PyTorch")
    bundle = export_run(trained.run_dir, base / "bundle", name=bundle_name)
    progress("evaluate the bundle on the test split")
    evaluation = evaluate(bundle.path, trained.manifest, "test", base / "eval")
    return PipelineResult(trained, bundle, evaluation)
