"""A trial's training in its own process (carclf/session.py's LocalSession): the run directory
as Ray Train writes it, the best checkpoints kept, a rerun resuming; no Ray involved."""

from __future__ import annotations

import json
from pathlib import Path

from carclf import runs
from carclf.session import KEEP_CHECKPOINTS
from carclf.train import fit_local, prepare_run, runs_in_process

from .conftest import tiny_config


def test_local_run_writes_the_run_directory_and_resumes(tmp_path: Path, toy_manifest: Path):
    cfg = tiny_config(tmp_path / "run", toy_manifest, train={"epochs": 4})
    assert runs_in_process(cfg)
    seen: list[dict] = []
    result = fit_local(cfg, prepare_run(cfg), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [0, 1, 2, 3]
    assert len(runs.read_epochs(result.run_dir)) == 4
    kept = list(runs.checkpoints(result.run_dir))
    assert len(kept) <= KEEP_CHECKPOINTS + 1
    assert max(m["epoch"] for _, m in kept) == 3  # the latest stays, to resume from
    best = max(m["val_acc"] for m in seen)
    assert result.metrics["val_acc"] == best
    assert json.loads((result.run_dir / runs.RUN_FILE).read_text())["metrics"]["val_acc"] == best
    assert not list(result.run_dir.glob(".incoming_*"))

    more = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 6})})
    seen.clear()
    fit_local(more, prepare_run(more), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [4, 5]  # resumed after the last checkpoint


def test_only_one_cpu_worker_trains_in_process(tmp_path: Path, toy_manifest: Path) -> None:
    two = tiny_config(tmp_path / "r", toy_manifest, scaling={"num_workers": 2})
    gpu = tiny_config(tmp_path / "r", toy_manifest, scaling={"use_gpu": True})
    retries = tiny_config(tmp_path / "r", toy_manifest, train={"max_failures": 2})
    assert not any(runs_in_process(c) for c in (two, gpu, retries))
