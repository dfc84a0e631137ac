"""The linear probe: logistic regression on a frozen backbone's features.

Two users. ``carclf baseline`` scores the probe on a split, the figure every fine-tune must
beat; and ``train.head_init: linear_probe`` starts a fine-tune from it (LP-FT, Kumar et al.
2022): the head is solved on the frozen features before the backbone is unfrozen, so
fine-tuning starts where the probe ends instead of from a random head, whose first large
gradients would damage the pretrained features.

:func:`backbone_features` reads what the classifier head sees; :func:`fit_probe` fits
scikit-learn's ``StandardScaler`` + ``LogisticRegression`` with C chosen on validation;
:func:`load_probe_into_head` folds both into the model's linear head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from carclf import weights
from carclf.data.transforms import Preprocess, eval_transform
from carclf.errors import UserInputError
from carclf.scoring import BATCH, load_batch

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
MAX_ITER = 3000


@dataclass
class Probe:
    """A fitted probe and how its C was chosen."""

    pipeline: Pipeline
    c: float
    val_acc_by_c: dict[float, float] = field(default_factory=dict)


def classifier_head(model: nn.Module) -> nn.Module:
    """The model's classifier head (``get_classifier()``), whatever it is."""
    head = weights.classifier_head(model)
    if head is None:
        raise UserInputError(f"{type(model).__name__} has no classifier head to probe")
    return head


@torch.no_grad()
def backbone_features(
    model: nn.Module, paths: Sequence[str], pre: Preprocess, batch: int = BATCH
) -> np.ndarray:
    """The input of the classifier head for each image (eval mode, eval transform), ``[N, D]``."""
    captured: list[torch.Tensor] = []
    hook = classifier_head(model).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].flatten(1).float().cpu())
    )
    was_training = model.training
    model.eval()
    transform = eval_transform(pre)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(paths), batch):
            model(load_batch(paths[i : i + batch], transform).to(device))
    finally:
        hook.remove()
        model.train(was_training)
    if not captured:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(captured).numpy()


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    seed: int,
    grid: Sequence[float] = C_GRID,
) -> Probe:
    """Standardise, then logistic regression; C by validation accuracy (ties: the smaller C).

    Fits on the training features only; validation only chooses C.
    """
    if len(np.unique(train_y)) < 2:
        raise UserInputError("the linear probe needs at least two classes in the training split")
    pipes = {
        c: make_pipeline(
            StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)
        ).fit(train_x, train_y)
        for c in sorted(grid)
    }
    scores = {c: float(p.score(val_x, val_y)) if len(val_y) else 0.0 for c, p in pipes.items()}
    chosen = next(c for c in pipes if scores[c] == max(scores.values()))
    return Probe(pipeline=pipes[chosen], c=chosen, val_acc_by_c=scores)


def probe_linear(probe: Probe, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe as one linear layer's ``(weight [K, D], bias [K])``: the scaler folded in.

    Classes the training split lacks get a zero row and a bias far below the others.
    """
    scaler, lr = probe.pipeline[0], probe.pipeline[-1]
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row, for class 1 against class 0
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-1, 1]) * intercept / 2
    scale = scaler.scale_
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, intercept.min() - 20.0)
    weight[lr.classes_] = coef / scale
    bias[lr.classes_] = intercept - (coef / scale) @ scaler.mean_
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


def load_probe_into_head(model: nn.Module, probe: Probe, num_classes: int) -> None:
    """Set the model's linear classifier to the probe, in place (the optimizer keeps it)."""
    head = classifier_head(model)
    if not isinstance(head, nn.Linear):
        raise UserInputError(
            f"train.head_init: linear_probe needs a linear classifier, not {type(head).__name__}"
        )
    weight, bias = probe_linear(probe, num_classes)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
