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


def _kill_a_worker_after_first_epoch(epochs_csv: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if epochs_csv.exists() and len(epochs_csv.read_text().splitlines()) >= 2:
            for proc in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.2)


def test_killed_worker_is_replaced_and_the_run_resumes(
    ray_session, toy_manifest: Path, tmp_path: Path
) -> None:
    cfg = _cfg(tmp_path / "run", toy_manifest, 2, epochs=6, max_failures=2)
    killed: list[int] = []
    watcher = threading.Thread(
        target=_kill_a_worker_after_first_epoch, args=(tmp_path / "run" / "epochs.csv", killed)
    )
    watcher.start()
    result = run_training(cfg)
    watcher.join()
    assert killed, "no worker was killed"
    with (tmp_path / "run" / "epochs.csv").open() as fh:
        epochs = [int(row["epoch"]) for row in csv.DictReader(fh)]
    assert epochs[-1] == 5 and result.metrics["epoch"] <= 5
    # Resumed from a checkpoint, not from scratch: epoch 0 ran once.
    assert epochs.count(0) == 1, epochs
