"""Where the per-worker training loop reports to: Ray Train, or one process inside a Tune trial.

The loop in :mod:`carclf.train` asks a session for its rank, device and checkpoint to resume
from, and hands it each epoch's metrics and checkpoint. :class:`RayTrainSession` is Ray Train's
own API (a ``TorchTrainer`` worker). :class:`LocalSession` runs the same loop in the calling
process: a search trial that needs one CPU worker trains inside its Tune trial instead of
starting a Train controller, a worker group and their actors (tens of seconds per trial on a
small machine). It writes the run directory exactly as a Ray Train run does (checkpoints, the
best two by ``train.monitor`` kept with the latest, ``epochs.csv``, TensorBoard scalars) and
forwards each epoch to a callback (``tune.report``).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carclf import runs
from carclf.metrics import Mode, rank_key

KEEP_CHECKPOINTS = 2  # by train.monitor; a local run also keeps its latest, to resume from


def epoch_line(row: dict[str, Any]) -> str:
    """The one progress line of an epoch."""
    return (
        f"[carclf] epoch {row['epoch']}: train_loss {row['train_loss']:.3f} "
        f"val_loss {row['val_loss']:.3f} val_acc {row['val_acc']:.3f} "
        f"val_f1 {row['val_f1_macro']:.3f} lr {row['lr']:.2e} "
        f"{row['images_per_s']:.0f} img/s"
    )


class EpochWriter:
    """A run's record of its epochs: ``epochs.csv``, TensorBoard scalars, one line each."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        runs.append_epoch(self.run_dir, row)
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / runs.TENSORBOARD_DIR))
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()
        print(epoch_line(row), file=sys.stderr, flush=True)


class RayTrainSession:
    """Ray Train's per-worker API (inside a ``TorchTrainer`` worker)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self.ctx = ray.train.get_context()
        self.device = ray.train.torch.get_device()
        self.checkpoint = ray.train.get_checkpoint()

    @property
    def rank(self) -> int:
        return self.ctx.get_world_rank()

    @property
    def world(self) -> int:
        return self.ctx.get_world_size()

    def prepare_loader(self, loader: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


class _DirCheckpoint:
    """A checkpoint directory with ``as_directory()``, as Ray's ``Checkpoint`` has."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield str(self.path)


class LocalSession:
    """One worker in this process, writing its run directory as Ray Train would.

    Args:
        run_dir: the run directory (its checkpoints are resumed from).
        monitor: the metric that ranks checkpoints (``train.monitor``).
        mode: whether higher or lower ``monitor`` is better.
        on_epoch: called with each epoch's metrics after its checkpoint is on disk.
    """

    rank = 0
    world = 1
    device = torch.device("cpu")

    def __init__(
        self, run_dir: Path, monitor: str, mode: Mode, on_epoch: Callable[[dict], None]
    ) -> None:
        self.run_dir, self.monitor, self.mode, self.on_epoch = run_dir, monitor, mode, on_epoch
        self.log = EpochWriter(run_dir)
        latest = self.latest()
        self.checkpoint = _DirCheckpoint(latest) if latest else None

    def latest(self) -> Path | None:
        """The checkpoint of the last epoch reported, or None."""
        return runs.latest_checkpoint(self.run_dir)

    def prepare_loader(self, loader: Any) -> Any:
        return loader

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            name = f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
            # Copied under a temporary name first: a trial killed mid-copy leaves no half
            # checkpoint for a resume or the search's report to read.
            tmp = Path(tempfile.mkdtemp(prefix=".incoming_", dir=self.run_dir))
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
            tmp.rename(self.run_dir / name)
            self.prune()
        self.log.write(metrics)
        self.on_epoch(metrics)

    def prune(self) -> None:
        """Keep the best ``KEEP_CHECKPOINTS`` by ``monitor``, and the latest."""
        found = list(runs.checkpoints(self.run_dir))
        # By rank, not the raw value: a NaN epoch sorts as the worst instead of scrambling the
        # order (every comparison with NaN is false), which could prune the real best.
        ranked = sorted(
            found, key=lambda c: rank_key(c[1].get(self.monitor), self.mode), reverse=True
        )
        keep = {runs.latest_of(found), *(path for path, _ in ranked[:KEEP_CHECKPOINTS])}
        for path, _ in found:
            if path not in keep:
                shutil.rmtree(path)

    def best(self) -> tuple[Path, dict[str, Any]]:
        """The best checkpoint by ``monitor`` and its epoch's metrics."""
        return runs.best_checkpoint(self.run_dir, self.monitor, self.mode)


# What the training loop is given: Ray Train's session or the local one (same members).
Session = RayTrainSession | LocalSession
