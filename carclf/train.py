"""Ray Train fine-tuning: the driver (`run_training`) and the per-worker loop it launches.

The worker step is plain PyTorch (``train_one_epoch``, ``predict_loader``) so it runs without Ray
in unit tests and on a lent GPU. Ray adds the data-parallel wrapping, the reporting and the
checkpoints. A rerun with the same ``output_dir`` resumes from the last checkpoint.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from carclf import runs
from carclf.config import Config, save_config
from carclf.data.dataset import ManifestDataset, cache_bytes
from carclf.data.manifest import Manifest
from carclf.data.sampling import BalancedDistributedSampler
from carclf.data.transforms import Preprocess, cache_resize, eval_transform, train_transform_of
from carclf.errors import UserInputError
from carclf.metrics import best_of, core_metrics, metric_mode, softmax
from carclf.models import build_model, check_model_name, model_preprocess, preflight_pretrained
from carclf.paths import ExperimentPaths
from carclf.probe import backbone_features, fit_probe, load_probe_into_head
from carclf.recipes import (
    EarlyStopping,
    StepTools,
    build_optimizer,
    build_step_tools,
    freeze_norm_statistics,
    set_trainable,
    trainable_names,
)
from carclf.runtime import ensure_ray
from carclf.session import (
    KEEP_CHECKPOINTS,
    EpochWriter,
    LocalSession,
    RayTrainSession,
    Session,
)
from carclf.storage import Storage, open_storage

# --- plain PyTorch: one epoch of training, predictions over a loader -------------------------


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    tools: StepTools,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Train for one pass over ``loader``; return loss, accuracy and images/s of this worker.

    Accuracy is against the true labels, also under mixup/cutmix, where the loss is against the
    mixed targets.
    """
    model.train()
    bare = getattr(model, "module", model)
    freeze_norm_statistics(bare, tools.freeze_bn_stats)
    params = [p for p in model.parameters() if p.requires_grad]
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        targets = labels
        if tools.mixup is not None:
            images, targets = tools.mixup(images, labels)
        optimizer.zero_grad(set_to_none=True)
        with tools.autocast():
            logits = model(images)
            loss = tools.criterion(logits, targets)
        _backward_and_step(loss, optimizer, params, tools)
        if tools.ema is not None:
            tools.ema.update(bare)
        if tools.schedule is not None:
            tools.schedule.step_batch()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "images_per_s": seen / max(elapsed, 1e-9),
    }


def _backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list, tools: StepTools
) -> None:
    """Backward (scaled under fp16), optional gradient clipping, optimizer step."""
    if tools.scaler is None:
        loss.backward()
        if tools.grad_clip:
            nn.utils.clip_grad_norm_(params, tools.grad_clip)
        optimizer.step()
        return
    tools.scaler.scale(loss).backward()
    if tools.grad_clip:
        tools.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(params, tools.grad_clip)
    tools.scaler.step(optimizer)
    tools.scaler.update()


@torch.no_grad()
def predict_loader(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch of ``loader``, in order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        all_logits.append(model(images.to(device)).float().cpu())
        all_labels.append(labels.cpu())
    if not all_logits:  # an empty shard (Ray Data's unequal validation split)
        return np.empty((0, 0), np.float32), np.empty(0, np.int64)
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's generators."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- the Ray Train worker --------------------------------------------------------------------


def _gather(array: np.ndarray) -> np.ndarray:
    """Concatenate an array across all workers (identity without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return array
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, array)
    return np.concatenate([part for part in parts if len(part)] or parts[:1])


def build_loaders(
    cfg: Config, manifest: Manifest, pre: Preprocess, rank: int, world: int
) -> tuple[DataLoader, DataLoader]:
    """Train and validation DataLoaders over this worker's shard (``data.loader: torch``).

    The training sampler is seeded for every world size, so the global batch holds the same
    images whether it is split over one worker or several (1 worker and N workers with the same
    global batch take the same steps): a ``DistributedSampler``, or with
    ``data.balanced_sampling`` a ``BalancedDistributedSampler``. Validation takes every
    ``world``-th image from ``rank`` on, unpadded, so gathered metrics count each image once.
    """
    per_worker = max(cfg.train.batch_size // world, 1)
    resize = cache_resize(pre) if cfg.data.cache else None
    records = manifest.split("train")
    train_set = ManifestDataset(records, train_transform_of(pre, cfg.data), resize)
    val_records = manifest.split("val")[rank::world]
    val_set = ManifestDataset(val_records, eval_transform(pre), resize)
    if cfg.data.balanced_sampling:
        labels = [label for _, label in records]
        sampler = BalancedDistributedSampler(labels, world, rank, seed=cfg.seed)
    else:
        sampler = DistributedSampler(
            train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    common = {"num_workers": cfg.data.num_workers, "persistent_workers": cfg.data.num_workers > 0}
    # drop_last: mixup pairs samples within a batch, and a ragged last batch skews BatchNorm.
    train = DataLoader(train_set, per_worker, sampler=sampler, drop_last=True, **common)
    val = DataLoader(val_set, per_worker, shuffle=False, **common)
    return train, val


def _worker_loaders(
    cfg: Config, manifest: Manifest, pre: Preprocess, session: Session
) -> tuple[Iterable, Iterable]:
    """This worker's batches: its Ray Data shards, or DataLoaders prepared by the session."""
    if cfg.data.loader == "ray":
        from carclf.data.raydata import shard_loaders

        return shard_loaders(cfg, len(manifest.split("train")), session.world)
    train_loader, val_loader = build_loaders(cfg, manifest, pre, session.rank, session.world)
    return session.prepare_loader(train_loader), session.prepare_loader(val_loader)


def _set_epoch(loader: Iterable, epoch: int) -> None:
    """Reseed a DataLoader's sampler for ``epoch`` (Ray Data reshuffles on its own)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: :func:`run_loop` in Ray Train's session."""
    run_loop(config, RayTrainSession())


def run_loop(config: dict[str, Any], session: Session) -> None:
    """Re-validate the config, train, report each epoch with its checkpoint to ``session``."""
    cfg = Config.model_validate(config["cfg"])
    pre = Preprocess.model_validate(config["preprocess"])  # resolved once, on the driver
    torch.set_num_threads(max(int(cfg.scaling.cpus_per_worker), 1))
    seed_everything(cfg.seed)
    device = session.device
    manifest = runs.training_manifest(config["manifest"], cfg)
    bare, weights = build_model(cfg.model, len(manifest.labels))
    bare = bare.to(device)
    if cfg.train.head_init == "linear_probe" and session.checkpoint is None:
        _probe_head(bare, cfg, manifest, pre, session)  # before the optimizer and EMA copy it
    train_loader, val_loader = _worker_loaders(cfg, manifest, pre, session)
    optimizer = build_optimizer(bare, cfg)  # every parameter, before any freezing
    tools = build_step_tools(bare, optimizer, cfg, len(manifest.labels), len(train_loader), device)
    stopper = EarlyStopping(cfg.train.early_stopping_patience, metric_mode(cfg.train.monitor))
    start_epoch = _resume(session.checkpoint, bare, optimizer, tools, stopper)
    model = None
    for epoch in range(start_epoch, cfg.train.epochs):
        # (Re)wrap in DDP whenever the set of trainable parameters changes (unfreezing).
        if set_trainable(bare, trainable_names(bare, cfg, epoch)) or model is None:
            model = session.prepare_model(bare)
        _set_epoch(train_loader, epoch)
        started = time.perf_counter()
        stats = train_one_epoch(model, train_loader, optimizer, tools, device)
        scored = tools.ema.module if tools.ema is not None else model
        metrics = {
            "epoch": epoch,
            **stats,
            **validate(scored, val_loader, device),
            "lr": max(g["lr"] for g in optimizer.param_groups),
            "images_per_s": stats["images_per_s"] * session.world,
            "trainable_params": sum(p.numel() for p in bare.parameters() if p.requires_grad),
            "epoch_s": time.perf_counter() - started,
        }
        tools.schedule.step_epoch(metrics, cfg.train.monitor)
        stop = stopper.update(metrics[cfg.train.monitor])
        progress = {"epoch": epoch, "stopper": vars(stopper)}
        meta = runs.checkpoint_meta(cfg, manifest, pre, metrics, weights)
        _report(metrics, bare, optimizer, tools, progress, meta, session)
        if stop:
            break


def _probe_head(
    model: nn.Module, cfg: Config, manifest: Manifest, pre: Preprocess, session: Session
) -> None:
    """Solve the head on the frozen backbone's features (``train.head_init: linear_probe``).

    Each worker extracts the features of its share of train and val, all of them gather the
    whole, and each fits the same probe; DDP would broadcast rank 0's head anyway.
    """
    rank, world = session.rank, session.world
    start = time.perf_counter()
    parts = {}
    for split in ("train", "val"):
        records = manifest.split(split)[rank::world]
        x = backbone_features(model, [p for p, _ in records], pre)
        parts[split] = (x, np.array([y for _, y in records]))
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, parts)
        parts = {
            s: tuple(np.concatenate([g[s][i] for g in gathered]) for i in (0, 1)) for s in parts
        }
    probe = fit_probe(*parts["train"], *parts["val"], seed=cfg.seed)
    load_probe_into_head(model, probe, len(manifest.labels))
    if rank == 0:
        print(
            f"[carclf] head_init: linear probe on {len(parts['train'][1])} frozen features, "
            f"C={probe.c}, val acc {probe.val_acc_by_c[probe.c]:.3f} "
            f"({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )


def validate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Validation loss and metrics over every worker's shard (gathered, so equal on all ranks)."""
    logits, labels = predict_loader(model, loader, device)
    logits, labels = _gather(logits), _gather(labels)
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    # The largest share of predictions any one class takes: near 1.0 means collapse.
    share = np.bincount(logits.argmax(1), minlength=logits.shape[1]).max() / max(len(labels), 1)
    return {
        "val_loss": loss,
        **{f"val_{k}": v for k, v in core_metrics(labels, softmax(logits)).items()},
        "val_top_class_share": float(share),
        "val_images": len(labels),
    }


def _resume(
    checkpoint: Any,
    bare: nn.Module,
    optimizer: torch.optim.Optimizer,
    tools: StepTools,
    stopper: EarlyStopping,
) -> int:
    """Restore weights, optimizer, schedule, scaler, EMA and early-stopping state; the next epoch.

    Every file is read without running pickled code (``runs.load_state``); a checkpoint that
    would need it is refused with a one-line error.
    """
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as d:
        runs.load_weights(bare, d)
        state = runs.load_state(d)
    if tools.ema is not None:  # the checkpoint's weights are the EMA weights; the raw ones are here
        if "raw_model" not in state:
            raise UserInputError(f"{d}: train.ema_decay is set but it holds no raw weights")
        tools.ema.module.load_state_dict(bare.state_dict())
        bare.load_state_dict(state["raw_model"])
    optimizer.load_state_dict(state["optimizer"])
    tools.schedule.load_state_dict(state["schedule"])
    if tools.scaler is not None and state.get("scaler"):
        tools.scaler.load_state_dict(state["scaler"])
    vars(stopper).update(state["stopper"])
    return state["epoch"] + 1


def _report(
    metrics: dict,
    bare: nn.Module,
    optimizer: torch.optim.Optimizer,
    tools: StepTools,
    progress: dict,
    meta: dict,
    session: Session,
) -> None:
    """Report the epoch on every worker; the chief (rank 0) also writes the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if session.rank == 0:
            state = {"optimizer": optimizer.state_dict(), "schedule": tools.schedule.state_dict()}
            if tools.scaler is not None:
                state["scaler"] = tools.scaler.state_dict()
            # Under EMA the exported weights are the EMA ones; training resumes from both.
            weights, raw = (tools.ema.module, bare) if tools.ema is not None else (bare, None)
            runs.save_checkpoint(Path(tmp), weights, meta, progress, state, raw_model=raw)
            ckpt = Path(tmp)
        session.report(metrics, ckpt)


# --- the driver ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """Where a run wrote its outputs and how its best epoch scored."""

    run_dir: Path
    best_checkpoint: Path
    metrics: dict[str, Any]
    labels: list[str]
    manifest: Path
    mlflow_run_id: str | None = None  # with tracking.mlflow


@dataclass
class PreparedRun:
    """What the driver resolves once and hands to every worker: the manifest, preprocessing."""

    run_dir: Path
    manifest: Manifest
    preprocess: Preprocess


def _epoch_logger() -> Any:
    import ray.train

    class EpochLog(ray.train.UserCallback):
        """On the controller: ``epochs.csv``, TensorBoard scalars and one line per epoch."""

        def __init__(self, run_dir: Path) -> None:
            self.log = EpochWriter(run_dir)

        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            self.log.write(metrics[0])

    return EpochLog


def check_training_input(cfg: Config, manifest: Manifest) -> None:
    """Refuse bad configuration before any worker starts."""
    for split in ("train", "val"):
        if not manifest.split(split):
            raise UserInputError(f"{manifest.path}: split {split!r} is empty")
    n_train = len(manifest.split("train"))
    if cfg.train.batch_size > n_train:
        raise UserInputError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {n_train} training images"
        )
    if cfg.train.batch_size < cfg.scaling.num_workers:
        raise UserInputError("train.batch_size: smaller than scaling.num_workers")
    if cfg.train.head_init == "linear_probe" and cfg.model.head_hidden:
        raise UserInputError("train.head_init: linear_probe needs model.head_hidden: 0")


def check_resume_state(run_dir: Path) -> None:
    """Read the state a rerun resumes from, here on the driver: a checkpoint that would need a
    code-running unpickler is refused with a one-line error (exit 2) before any worker starts,
    where the same refusal would surface wrapped in Ray's error."""
    latest = runs.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is not None:
        runs.load_state(latest)


def prepare_run(cfg: Config) -> PreparedRun:
    """Validate everything a run needs before any worker starts, and resolve it once."""
    check_model_name(cfg.model.name)  # before any audit or worker: fail in a second
    run_dir = ExperimentPaths.of(cfg).output_dir
    manifest = runs.training_manifest(runs.resolve_manifest(cfg), cfg)
    check_training_input(cfg, manifest)
    check_resume_state(run_dir)
    weights = preflight_pretrained(cfg.model, len(manifest.labels))
    if weights is not None:
        print(f"[carclf] {weights.line()}", file=sys.stderr)
    save_config(cfg, run_dir)
    return PreparedRun(run_dir, manifest, model_preprocess(cfg.model))


def _run_config(cfg: Config, storage: Storage, callbacks: Sequence[Any]) -> Any:
    """Ray Train's ``RunConfig``: where checkpoints go, how many are kept, who sees reports."""
    import ray.train

    run_dir = ExperimentPaths.of(cfg).output_dir
    threads = str(max(int(cfg.scaling.cpus_per_worker), 1))
    return ray.train.RunConfig(
        name=run_dir.name,
        **storage.ray_storage(),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=KEEP_CHECKPOINTS,
            checkpoint_score_attribute=cfg.train.monitor,
            checkpoint_score_order=metric_mode(cfg.train.monitor),
        ),
        callbacks=[_epoch_logger()(run_dir), *callbacks],
        worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}},
        # Train's INFO lines (one per report and rank) would drown carclf's epoch line.
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )


def fit_run(
    cfg: Config, run: PreparedRun, callbacks: Sequence[Any] = (), storage: Storage | None = None
) -> TrainResult:
    """Run Ray Train for a prepared run; extra ``callbacks`` see every report (Tune's, say).

    Checkpoints go to ``storage`` (a directory named like the run directory, on any pyarrow
    filesystem), by default the run directory itself. With ``tracking.mlflow`` the run is an
    MLflow run too (``carclf/tracking.py``).
    """
    storage = storage or open_storage(str(run.run_dir))
    if not cfg.tracking.mlflow:
        return _fit(cfg, run, callbacks, storage)
    from carclf import tracking

    run_id = tracking.start_run(cfg, run.run_dir)
    try:
        result = _fit(cfg, run, [*callbacks, tracking.epoch_callback(cfg, run_id)], storage)
    except BaseException:
        tracking.finish_run(cfg, run_id, None)
        raise
    tracking.finish_run(cfg, run_id, result.metrics)
    result.mlflow_run_id = run_id
    return result


def _fit(cfg: Config, run: PreparedRun, callbacks: Sequence[Any], storage: Storage) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_loop_config(cfg, run),
        **_ray_datasets(cfg, run),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=_run_config(cfg, storage, callbacks),
    )
    result = trainer.fit()
    if not result.best_checkpoints:
        raise RuntimeError(f"{run.run_dir}: training reported no checkpoint (already finished?)")
    monitor = cfg.train.monitor
    best_ckpt, best_metrics = best_of(
        result.best_checkpoints, lambda c: c[1][monitor], metric_mode(monitor)
    )
    best_dir = Path(best_ckpt.path)
    if not storage.is_local:  # export and evaluation read the checkpoint from local disk
        best_dir = Path(best_ckpt.to_directory(str(run.run_dir / runs.BEST_CHECKPOINT_DIR)))
    runs.write_run_file(run.run_dir, best_dir, best_metrics)
    return TrainResult(run.run_dir, best_dir, best_metrics, run.manifest.labels, run.manifest.path)


def _loop_config(cfg: Config, run: PreparedRun) -> dict[str, Any]:
    """What every worker is given: plain data (it crosses into Ray's processes)."""
    return {
        "cfg": cfg.model_dump(mode="json"),
        "manifest": str(run.manifest.path),
        "preprocess": run.preprocess.model_dump(mode="json"),
    }


def runs_in_process(cfg: Config) -> bool:
    """Whether a search trial trains inside its own Tune trial (:func:`fit_local`) rather than
    through a ``TorchTrainer``: one CPU worker, the torch loader, no worker restarts."""
    s = cfg.scaling
    return (
        s.num_workers == 1
        and not s.use_gpu
        and cfg.data.loader == "torch"
        and cfg.train.max_failures == 0
    )


def fit_local(
    cfg: Config, run: PreparedRun, on_epoch: Callable[[dict[str, Any]], None]
) -> TrainResult:
    """Train one worker in this process, writing the run directory as :func:`fit_run` does.

    A rerun resumes from the run directory's latest checkpoint. ``on_epoch`` sees every
    epoch's metrics (``tune.report`` inside a trial).
    """
    _ray_datasets(cfg, run)  # nothing for the torch loader but the cache's size line
    session = LocalSession(run.run_dir, cfg.train.monitor, metric_mode(cfg.train.monitor), on_epoch)
    run_loop(_loop_config(cfg, run), session)
    best_dir, best_metrics = session.best()
    runs.write_run_file(run.run_dir, best_dir, best_metrics)
    return TrainResult(run.run_dir, best_dir, best_metrics, run.manifest.labels, run.manifest.path)


def _ray_datasets(cfg: Config, run: PreparedRun) -> dict[str, Any]:
    """The trainer's ``datasets`` and ``dataset_config`` for ``data.loader: ray``, else none.

    Prints the decoded-image cache's size when ``data.cache`` is on.
    """
    if cfg.data.cache:
        size = cache_bytes(run.manifest, run.preprocess, ("train", "val"))
        where = "the object store" if cfg.data.loader == "ray" else "each data-loading process"
        print(f"[carclf] data.cache: {size / 2**20:.1f} MiB in {where}", file=sys.stderr)
    if cfg.data.loader != "ray":
        return {}
    from carclf.data.raydata import ValidationKeptWhole, build_datasets

    return {
        "datasets": build_datasets(cfg, run.manifest, run.preprocess),
        "dataset_config": ValidationKeptWhole(),
    }


def run_training(cfg: Config, storage: Storage | None = None) -> TrainResult:
    """Fine-tune ``cfg.model`` on Ray Train; the run directory is ``cfg.output_dir``.

    Rerunning with the same ``output_dir`` resumes from the last checkpoint there. ``storage``
    puts the checkpoints elsewhere (see :meth:`fit_run`).
    """
    from carclf.tracking import with_store

    cfg = with_store(cfg, ExperimentPaths.of(cfg).base)
    run = prepare_run(cfg)
    ensure_ray()
    return fit_run(cfg, run, storage=storage)


def init_run(cfg: Config) -> Path:
    """A finished run of the model as built (untrained, or pretrained weights), without Ray.

    For what needs a bundle but no training: serving benchmarks, smoke tests of a new backbone.
    """
    run = prepare_run(cfg)
    model, weights = build_model(cfg.model, len(run.manifest.labels))
    ckpt = run.run_dir / runs.INIT_CHECKPOINT
    ckpt.mkdir(parents=True, exist_ok=True)
    meta = runs.checkpoint_meta(cfg, run.manifest, run.preprocess, {}, weights)
    runs.save_checkpoint(ckpt, model, meta, progress={"epoch": -1})
    runs.write_run_file(run.run_dir, ckpt, {})
    return run.run_dir
