"""The fine-tuning recipes, as plain PyTorch: optimizers, schedules, freezing, mixup, AMP, EMA.

Everything here works on a bare ``nn.Module`` without Ray, so the per-worker step can be unit
tested and checked on a lent GPU; :mod:`carclf.train` wires it into Ray Train.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from carclf.config import Config
from carclf.metrics import Mode, metric_mode, rank_key
from carclf.weights import classifier_head


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9) over every parameter, with optional layer-wise LR decay.

    Built before any freezing, so that parameters unfrozen later are already in it; no weight
    decay on biases and norm weights (timm's convention). The classifier head's parameters get
    groups of their own at ``train.head_lr_scale`` times the rate: a head solved by the linear
    probe needs less than a fresh one, a fresh head on a slow backbone more.
    """
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.train.optimizer,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        momentum=0.9,
        layer_decay=cfg.train.layer_decay,
    )
    if cfg.train.head_lr_scale != 1.0:
        _split_head_groups(optimizer, model, cfg.train.head_lr_scale)
    # timm records layer decay as ``lr_scale`` for its own schedulers; torch's read ``lr``.
    for group in optimizer.param_groups:
        group["lr"] = cfg.train.lr * group.get("lr_scale", 1.0)
    return optimizer


def _split_head_groups(optimizer: torch.optim.Optimizer, model: nn.Module, scale: float) -> None:
    """Move the head's parameters of every group into a copy of that group scaled by ``scale``."""
    head = {id(p) for p in (classifier_head(model) or nn.Module()).parameters()}
    groups = []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in head]
        rest = [p for p in group["params"] if id(p) not in head]
        if rest:
            groups.append({**group, "params": rest})
        if mine:
            groups.append({**group, "params": mine, "lr_scale": group.get("lr_scale", 1.0) * scale})
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)


class Schedule:
    """One interface over per-step (cosine with warmup, one-cycle) and per-epoch (plateau) LR.

    Args:
        optimizer: the optimizer whose learning rates it drives.
        cfg: ``train.scheduler``, ``train.epochs``, ``train.warmup_epochs``, ``train.monitor``.
        steps_per_epoch: batches per epoch on one worker.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int) -> None:
        kind, t = cfg.train.scheduler, cfg.train
        total = max(t.epochs * steps_per_epoch, 1)
        warmup = t.warmup_epochs * steps_per_epoch
        self.per_step: torch.optim.lr_scheduler.LRScheduler | None = None
        self.plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self.mode = metric_mode(t.monitor)  # the plateau below maximises its rank_key score
        if kind == "cosine":

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = min((step - warmup) / max(total - warmup, 1), 1.0)
                return 0.5 * (1.0 + math.cos(math.pi * progress))

            self.per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        elif kind == "onecycle":
            max_lr = [g["lr"] for g in optimizer.param_groups]
            self.per_step = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=max_lr, total_steps=total, pct_start=max(warmup / total, 0.05)
            )
        elif kind == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=0.5, patience=t.plateau_patience
            )

    def step_batch(self) -> None:
        if self.per_step is not None:
            self.per_step.step()

    def step_epoch(self, metrics: dict[str, float], monitor: str) -> None:
        if self.plateau is not None:
            # Ranked as checkpoints are (metrics.rank_key): a NaN epoch is the worst there is,
            # a bad epoch that can never become the best a later epoch must beat.
            ranked, score = rank_key(metrics[monitor], self.mode)
            self.plateau.step(score if ranked else -math.inf)

    def state_dict(self) -> dict:
        sched = self.per_step or self.plateau
        return sched.state_dict() if sched is not None else {}

    def load_state_dict(self, state: dict) -> None:
        sched = self.per_step or self.plateau
        if sched is not None and state:
            sched.load_state_dict(state)


# --- freezing ------------------------------------------------------------------------------


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names from input to output in blocks; the classifier head is the last group.

    timm models describe their blocks with ``group_matcher``; other models fall back to one
    group per top-level child module.
    """
    if hasattr(model, "group_matcher"):
        groups = group_parameters(model, model.group_matcher(coarse=True))
        return [list(groups[k]) for k in sorted(groups)]
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(name.split(".")[0], []).append(name)
    return list(groups.values())


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier head's parameters (``get_classifier()``), trained from epoch 0."""
    head = classifier_head(model)
    if head is None or not list(head.parameters()):
        return set(parameter_groups(model)[-1])
    ids = {id(p) for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def trainable_names(model: nn.Module, cfg: Config, epoch: int) -> set[str]:
    """Which parameters train in ``epoch``: the head while frozen, then all or the last K blocks.

    With ``train.unfreeze_step`` the blocks come back progressively from the top, that many
    more each epoch after the frozen phase (ULMFiT's gradual unfreezing), up to
    ``train.unfreeze_blocks`` or every block.
    """
    t = cfg.train
    head = head_parameter_names(model)
    if epoch < t.freeze_epochs:
        return head
    blocks = [g for g in parameter_groups(model) if not set(g) <= head]
    k = len(blocks) if t.unfreeze_blocks is None else min(t.unfreeze_blocks, len(blocks))
    if t.unfreeze_step is not None:
        k = min(k, t.unfreeze_step * (epoch - t.freeze_epochs + 1))
    if k >= len(blocks):
        return {name for name, _ in model.named_parameters()}
    return head | {name for group in blocks[len(blocks) - k :] for name in group}


def freeze_norm_statistics(model: nn.Module, every: bool = False) -> None:
    """Put BatchNorm layers in eval mode (call after ``train()``): frozen ones, or ``every`` one.

    A frozen layer keeps its pretrained statistics too: otherwise the frozen backbone's features
    drift with every batch (small ones above all) while the head learns to read them, and the
    head is then scored on features it was not trained on. ``every`` (``train.freeze_bn_stats``)
    keeps them after unfreezing as well: batch statistics of a few images per worker differ
    from ImageNet's, and a head fitted on the pretrained features would see other ones.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if every or (params and not any(p.requires_grad for p in params)):
                module.eval()


def set_trainable(model: nn.Module, names: set[str]) -> bool:
    """Set ``requires_grad``; returns whether anything changed (DDP must then be rebuilt)."""
    changed = False
    for name, param in model.named_parameters():
        want = name in names
        changed |= param.requires_grad != want
        param.requires_grad_(want)
    return changed


# --- the per-step tools --------------------------------------------------------------------


@dataclass
class StepTools:
    """What one training step needs besides the model and the optimizer."""

    criterion: nn.Module
    schedule: Schedule | None = None
    mixup: Mixup | None = None
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float | None = None
    ema: ModelEmaV3 | None = None
    device_type: str = "cpu"
    freeze_bn_stats: bool = False

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision where configured (bf16/fp16 on GPU), a no-op otherwise."""
        if self.amp_dtype is None:
            yield
        else:
            with torch.autocast(self.device_type, dtype=self.amp_dtype):
                yield


def amp_dtype(amp: str, device_type: str) -> torch.dtype | None:
    """``train.amp`` → the autocast dtype: AMP only on GPU; ``auto`` picks bf16 where supported."""
    if device_type != "cuda" or amp == "off":
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def build_step_tools(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    num_classes: int,
    steps_per_epoch: int,
    device: torch.device,
) -> StepTools:
    """Criterion, schedule, mixup/cutmix, AMP, gradient clipping and EMA from ``cfg.train``."""
    t = cfg.train
    mixup = None
    if t.mixup > 0 or t.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=t.mixup,
            cutmix_alpha=t.cutmix,
            label_smoothing=t.label_smoothing,
            num_classes=num_classes,
        )
    criterion = (
        SoftTargetCrossEntropy()
        if mixup
        else nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    )
    dtype = amp_dtype(t.amp, device.type)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=t.ema_decay, device=device) if t.ema_decay else None
    return StepTools(
        criterion=criterion,
        schedule=Schedule(optimizer, cfg, steps_per_epoch),
        mixup=mixup,
        amp_dtype=dtype,
        scaler=scaler,
        grad_clip=t.grad_clip,
        ema=ema,
        device_type=device.type,
        freeze_bn_stats=t.freeze_bn_stats,
    )


class EarlyStopping:
    """Stop when the monitored metric has not improved for ``patience`` epochs.

    Epochs are compared as checkpoints are ranked (:func:`carclf.metrics.rank_key`): a NaN
    epoch (a diverged one) is never an improvement. Compared raw, a NaN first epoch would be the
    best for good (every comparison with NaN is false) and stop a run that still improves.

    Args:
        patience: epochs without improvement before stopping; None never stops.
        mode: ``max`` for accuracy-like metrics, ``min`` for losses.
    """

    def __init__(self, patience: int | None, mode: Mode = "max") -> None:
        self.patience = patience
        self.mode: Mode = mode
        self.best: float | None = None  # the best epoch's rank_key score; None before a number
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        """Record one epoch's value; returns True when training should stop."""
        key = rank_key(value, self.mode)
        if key > self._best_key():
            self.best, self.bad_epochs = key[1], 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def _best_key(self) -> tuple[bool, float]:
        # A checkpoint written before NaN ranked last may hold a NaN best: it is no best.
        if self.best is None or math.isnan(self.best):
            return False, 0.0
        return True, self.best
