"""Ray Train behaviour: gradient synchronisation across workers, and recovery from a lost worker."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from carclf.train import run_training

from .conftest import tiny_config

pytestmark = pytest.mark.integration


def _cfg(out: Path, manifest: Path, workers: int, **train: object):
    # No BatchNorm, no dropout, no augmentation: the only difference between the runs is how
    # the global batch is split, so equal weights prove the gradients are averaged.
    return tiny_config(
        out,
        manifest,
        model={"name": "scratch_cnn", "kwargs": {"filters": [8, 16]}},
        train={"epochs": 2, "batch_size": 16, "lr": 1e-2, **train},
        scaling={"num_workers": workers},
    )


def test_two_workers_end_with_the_same_weights_as_one(
    ray_session, toy_manifest: Path, tmp_path: Path
) -> None:
    one = run_training(_cfg(tmp_path / "one", toy_manifest, 1))
    two = run_training(_cfg(tmp_path / "two", toy_manifest, 2))
    w1 = load_file(str(one.best_checkpoint / "model.safetensors"))
    w2 = load_file(str(two.best_checkpoint / "model.safetensors"))
    assert one.metrics["epoch"] == two.metrics["epoch"]
    diffs = {k: (w1[k] - w2[k]).abs().max().item() for k in w1}
    # Tolerance: float32 sums in another order, over 2 epochs of AdamW steps.
    assert max(diffs.values()) < 1e-4, diffs
    moved = max((w1[k] - torch.zeros_like(w1[k])).abs().max().item() for k in w1)
    assert moved > 0


def _kill_a_worker_after_a_pruning(run_dir: Path, killed: list[int], seen: list[int]) -> None:
    """Kill one Train worker once four epochs are reported: with ``num_to_keep=2`` Ray Train's
    checkpoint manager has deleted at least one of the four checkpoints by then (the worst two
    go, less the latest); issue 15's failure came after such a pruning."""
    deadline = time.monotonic() + 600  # a bound, on a busy machine the run starts slowly
    epochs_csv = run_dir / "epochs.csv"
    while time.monotonic() < deadline:
        reported = epochs_csv.exists() and len(epochs_csv.read_text().splitlines()) >= 5
        # The epoch line is written before Ray's checkpoint manager prunes: wait for the prune.
        if reported and len(list(run_dir.glob("checkpoint_*"))) <= 3:
            seen.append(len(list(run_dir.glob("checkpoint_*"))))
            for proc in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.1)


def test_killed_worker_after_pruning_is_replaced_and_the_run_resumes(
    ray_session, toy_manifest: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, toy_manifest, 2, epochs=6, max_failures=2)
    killed: list[int] = []
    seen: list[int] = []
    watcher = threading.Thread(target=_kill_a_worker_after_a_pruning, args=(run_dir, killed, seen))
    watcher.start()
    result = run_training(cfg)
    watcher.join()
    assert killed, "no worker was killed"
    # Four checkpoints were written before the kill: three or fewer on disk means a pruning.
    assert seen and seen[0] <= 3, seen
    with (run_dir / "epochs.csv").open() as fh:
        epochs = [int(row["epoch"]) for row in csv.DictReader(fh)]
    assert epochs[-1] == 5 and result.metrics["epoch"] <= 5
    # Resumed from a checkpoint, not from scratch: epoch 0 ran once.
    assert epochs.count(0) == 1, epochs
    assert len(list(run_dir.glob("checkpoint_*"))) <= 3
