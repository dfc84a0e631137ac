"""Scoring a split: batched logits over image paths and the temperature fitted on validation.

Export (the bundle's temperature and its test metrics, with onnxruntime) and evaluation (a
bundle's or a run's logits) score a manifest's records with these functions, so both batch,
decode and calibrate the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from carclf.data.transforms import Preprocess, eval_transform, load_image
from carclf.inference import onnx_session
from carclf.metrics import fit_temperature

BATCH = 64
Records = Sequence[tuple[str, int]]
LogitsFn = Callable[[list[str]], np.ndarray]  # image paths → the model's own logits [N, K]


def paths_of(records: Records) -> list[str]:
    """The image paths of manifest records."""
    return [path for path, _ in records]


def targets_of(records: Records) -> np.ndarray:
    """The label indices of manifest records."""
    return np.array([label for _, label in records])


def load_batch(paths: Sequence[str], transform: Callable) -> torch.Tensor:
    """Decode and transform images into one ``[N, C, H, W]`` batch."""
    return torch.stack([transform(load_image(p)) for p in paths])


def score(paths: Sequence[str], logits: LogitsFn, batch: int = BATCH) -> np.ndarray:
    """``logits`` over ``paths`` in batches of ``batch``, concatenated."""
    return np.concatenate([logits(list(paths[i : i + batch])) for i in range(0, len(paths), batch)])


def onnx_logits(onnx_path: str, pre: Preprocess) -> LogitsFn:
    """Image paths → logits of an ONNX model, with the eval transform of ``pre``."""
    session, _ = onnx_session(onnx_path, threads=torch.get_num_threads())
    transform = eval_transform(pre)

    def logits(paths: list[str]) -> np.ndarray:
        return session.run(["logits"], {"input": load_batch(paths, transform).numpy()})[0]

    return logits


def torch_logits(model: torch.nn.Module, pre: Preprocess) -> LogitsFn:
    """Image paths → logits of a PyTorch model in eval mode, with the eval transform of ``pre``."""
    transform = eval_transform(pre)

    def logits(paths: list[str]) -> np.ndarray:
        with torch.no_grad():
            return model(load_batch(paths, transform)).numpy()

    return logits


def validation_temperature(logits: LogitsFn, val: Records) -> float | None:
    """The softmax temperature fitted on the validation records; None when there are none."""
    if not val:
        return None
    return fit_temperature(score(paths_of(val), logits), targets_of(val))
