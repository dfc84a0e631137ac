"""Inference on a bundle: ONNX Runtime for predictions, the bundle's own preprocessing.

Used by ``carclf predict``, by evaluation of a bundle, by the export parity check and by the
Serve classifier deployment, so all of them score an image the same way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from carclf.bundle import Bundle
from carclf.data.transforms import eval_transform
from carclf.metrics import softmax

log = logging.getLogger(__name__)


def onnx_session(
    path: str, threads: int = 1, use_gpu: bool = False
) -> tuple[ort.InferenceSession, str]:
    """An onnxruntime session and the provider actually active (checked, not assumed).

    Args:
        path: the ``.onnx`` file.
        threads: ``intra_op_num_threads``; onnxruntime ignores ``OMP_NUM_THREADS``.
        use_gpu: ask for the CUDA provider; the CPU provider is the fallback.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(int(threads), 1)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    wanted = ["CPUExecutionProvider"]
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        wanted.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(path, sess_options=opts, providers=wanted)
    active = session.get_providers()[0]
    log.info("onnxruntime session on %s with %d threads: %s", active, threads, path)
    return session, active


class OnnxClassifier:
    """Preprocess images and run the bundle's ONNX model.

    Args:
        bundle: a loaded, verified bundle.
        threads: onnxruntime intra-op threads (the replica's CPUs).
        use_gpu: use the CUDA provider where one is available.
    """

    def __init__(self, bundle: Bundle, threads: int = 1, use_gpu: bool = False) -> None:
        self.bundle = bundle
        self.labels = bundle.info.labels
        self.session, self.provider = onnx_session(str(bundle.onnx_path), threads, use_gpu)
        out_shape = self.session.get_outputs()[0].shape
        if isinstance(out_shape[-1], int) and out_shape[-1] != len(self.labels):
            raise ValueError(
                f"{bundle.path}: model.onnx has {out_shape[-1]} outputs but bundle.json has "
                f"{len(self.labels)} labels"
            )

    @functools.cached_property
    def transform(self) -> Callable[[Image.Image], Any]:
        """The bundle's eval transform, built on first use: the Serve classifier gets its
        images preprocessed and so never imports torch."""
        return eval_transform(self.bundle.info.preprocess)

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded RGB images → the float32 NCHW batch the model takes."""
        import torch

        return torch.stack([self.transform(img) for img in images]).numpy()

    def raw_logits(self, batch: np.ndarray) -> np.ndarray:
        """The ONNX model's own logits for a preprocessed batch."""
        return self.session.run(["logits"], {"input": batch.astype(np.float32, copy=False)})[0]

    @property
    def temperature(self) -> float:
        """The bundle's softmax temperature (calibration)."""
        return float(self.bundle.info.temperature)

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated logits: the model's own ``raw`` logits divided by the ``temperature``.

        The one place the temperature is applied, so every probability served is calibrated.
        """
        return raw / np.float32(self.temperature)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated logits of a preprocessed batch (:meth:`calibrate` of :meth:`raw_logits`)."""
        return self.calibrate(self.raw_logits(batch))

    def probabilities_of(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities from the model's own logits, shape ``[N, K]``."""
        return softmax(self.calibrate(raw))

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Class probabilities for decoded images, shape ``[N, K]``."""
        return self.probabilities_of(self.raw_logits(self.preprocess(images)))

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[dict]:
        """Each row of ``probs`` as ``{"label", "score", "top_k": [{"label", "score"}]}``."""
        k = max(1, min(k, len(self.labels)))
        out = []
        for row in probs:
            order = np.argsort(-row)[:k]
            top = [{"label": self.labels[i], "score": float(row[i])} for i in order]
            out.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top})
        return out
