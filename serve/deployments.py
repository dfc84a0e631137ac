"""The model deployments: one ONNX classifier and one Grad-CAM explainer per bundle.

Both load the same bundle (verified hashes). The ingress decodes each image once; the classifier
gets it already preprocessed (the bundle's own eval transform, applied in the ingress, so decoding
and resizing run beside onnxruntime instead of before it). The explainer gets the very crops
the classifier gets (the bundle's ``eval_resize_crop``, applied in the ingress) and explains
them as they are (:meth:`carclf.explain.Explainer.explain_crops`): the heatmap covers that crop
and the overlay is drawn over it, the pixels the model saw, at the model's input size. The
original images never leave the ingress: a request's 40 MP images would otherwise cross the
object store at full size, and again when a dead replica's call is retried.

The classifier never imports torch (onnxruntime only; the explainer imports :mod:`carclf.explain`
in its own replicas), so a classifier replica that autoscaling or a restart adds serves within
seconds rather than after torch's and timm's imports.

The explainer is its own bounded pool: Grad-CAM's forward and backward passes on one torch model
run one at a time per replica (:class:`carclf.explain.Explainer` holds the lock), a replica takes
at most ``EXPLAINER_MAX_ONGOING`` requests and each caller queues at most
``EXPLAINER_MAX_QUEUED`` more; past that the handle raises ``BackPressureError`` at once (the
ingress answers 503), so a flood of explanations never holds the ingress or the classifiers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from PIL import Image
from ray import serve

from carclf.bundle import load_ref
from carclf.data.transforms import to_model_input
from carclf.inference import OnnxClassifier
from serve.metrics import ModelMetrics
from serve.settings import (
    BATCH_WAIT_TIMEOUT_S,
    CLASSIFIER_MAX_ONGOING,
    CLASSIFIER_MAX_QUEUED,
    EXPLAINER_MAX_ONGOING,
    EXPLAINER_MAX_QUEUED,
    MAX_BATCH_SIZE,
)

if TYPE_CHECKING:
    from carclf.explain import Explanation

log = logging.getLogger("ray.serve")


def _replica_cpus() -> int:
    """CPUs this replica was given: onnxruntime and torch get that many threads, no more."""
    # Outside a replica (unit tests) there is no Ray to ask, and asking would start one.
    if not ray.is_initialized():
        return 1
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # a driver, not a replica
        cpus = 1
    return max(int(cpus), 1)


# Images explained in one pass: a request's images (at most the ingress's per-request cap) go
# in chunks of this many, so one request's activations and gradients stay small.
EXPLAIN_CHUNK = 8


@serve.deployment(
    max_ongoing_requests=CLASSIFIER_MAX_ONGOING, max_queued_requests=CLASSIFIER_MAX_QUEUED
)
class ClassifierDeployment:
    """onnxruntime inference with dynamic batching (``@serve.batch``).

    Records the size of every batch and the top-1 probability of every image it classifies
    (:class:`serve.metrics.ModelMetrics`).

    Args:
        bundle_path: the bundle directory, or ``path@sha256:<hex>`` (checked against the pin).
        use_gpu: use the CUDA provider when the replica has a GPU.
    """

    def __init__(self, bundle_path: str, use_gpu: bool = False) -> None:
        bundle = load_ref(bundle_path)
        self.clf = OnnxClassifier(bundle, threads=_replica_cpus(), use_gpu=use_gpu)
        self.info = bundle.info
        self.metrics = ModelMetrics(self.info.name)  # once per replica: batch sizes, top-1
        log.info("classifier %s on %s", self.info.name, self.clf.provider)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch size and wait change at runtime through ``user_config``."""
        size = user_config.get("max_batch_size", MAX_BATCH_SIZE)
        device = "gpu" if self.clf.provider == "CUDAExecutionProvider" else "cpu"
        wait = user_config.get("batch_wait_timeout_s", BATCH_WAIT_TIMEOUT_S[device])
        self._batched.set_max_batch_size(int(size))
        self._batched.set_batch_wait_timeout_s(float(wait))

    def metadata(self) -> dict[str, Any]:
        """Name, labels, input shape, the active execution provider and the temperature."""
        return {
            "name": self.info.name,
            "labels": self.info.labels,
            "input_size": list(self.info.input_size),
            "arch": self.info.arch,
            "provider": self.clf.provider,
            "temperature": self.clf.temperature,
        }

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S["cpu"])
    async def _batched(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.metrics.batch(len(inputs))
        # The model's own logits; each caller calibrates what it serves as probabilities.
        return list(self.clf.raw_logits(np.stack(inputs)))

    def batching(self) -> dict[str, Any]:
        """The batch size and wait in force (they follow ``user_config``)."""
        return {
            # Serve exposes the getters only with a leading underscore.
            "max_batch_size": self._batched._get_max_batch_size(),
            "batch_wait_timeout_s": self._batched._get_batch_wait_timeout_s(),
        }

    def _model_input(self, batch: np.ndarray) -> np.ndarray:
        """The float32 ``[N, C, H, W]`` input of a batch of cropped uint8 ``[N, H, W, C]`` pixels
        (what the ingress sends), or of a batch that is already one (a V2 FP32 tensor)."""
        if batch.dtype == np.uint8:
            return to_model_input(batch, self.info.preprocess)
        return batch

    async def predict(self, x: np.ndarray, top_k: int = 5) -> dict:
        """Top-k prediction for one image, cropped uint8 ``[H, W, C]`` pixels or a preprocessed
        ``[C, H, W]`` tensor (batched with others)."""
        logits = await self._batched(self._model_input(x[None])[0])
        probs = self.clf.probabilities_of(logits[None])
        self.metrics.top1(probs)
        return self.clf.top_k(probs, top_k)[0]

    async def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Logits and probabilities for a batch (KServe V2): cropped uint8 ``[N, H, W, C]``
        pixels or a preprocessed ``[N, C, H, W]`` tensor.

        ``logits`` are the model's own, exactly what ``model.onnx`` computes (what Triton would
        return); ``probabilities`` are calibrated, the ones every endpoint serves. Each image
        joins the dynamic batch, so V2 clients share batches with V1 ones.
        """
        batch = self._model_input(batch)
        logits = np.stack(await asyncio.gather(*(self._batched(x) for x in batch)))
        probs = self.clf.probabilities_of(logits)
        self.metrics.top1(probs)
        return {"logits": logits, "probabilities": probs}

    def check_health(self) -> None:
        """A real inference on a blank input: a replica that cannot infer is unhealthy."""
        self.clf.raw_logits(np.zeros((1, *self.info.input_size), np.float32))


@serve.deployment(
    max_ongoing_requests=EXPLAINER_MAX_ONGOING, max_queued_requests=EXPLAINER_MAX_QUEUED
)
class ExplainerDeployment:
    """Grad-CAM explanations on the bundle's PyTorch weights, one pass at a time per replica.

    Args:
        bundle_path: the bundle directory, or ``path@sha256:<hex>`` (checked against the pin).
    """

    def __init__(self, bundle_path: str) -> None:
        import torch

        from carclf.explain import Explainer

        torch.set_num_threads(_replica_cpus())
        self.explainer = Explainer.from_bundle(load_ref(bundle_path))

    async def explain(
        self, crops: np.ndarray, method: str = "gradcam", target: Any = None
    ) -> list[dict]:
        """Explanations of one request's images as JSON-ready fields with base64 PNGs.

        Args:
            crops: the images as the ingress cropped them for the classifier, uint8
                ``[N, H, W, C]`` at the model's input size (:class:`serve.images.Crops`).
            method: an explanation method's name.
            target: the class to explain (name or index); None explains each predicted class.

        Runs in a worker thread, so the replica's event loop keeps answering health checks
        while torch works; the explainer's lock keeps the passes one at a time.
        """
        return await asyncio.to_thread(self._explain, crops, method, target)

    def _explain(self, crops: np.ndarray, method: str, target: Any) -> list[dict]:
        out = []
        for start in range(0, len(crops), EXPLAIN_CHUNK):
            chunk = [Image.fromarray(c) for c in crops[start : start + EXPLAIN_CHUNK]]
            out += [_as_json(e) for e in self.explainer.explain_crops(chunk, method, target)]
        return out


def _as_json(exp: Explanation) -> dict[str, Any]:
    from carclf.explain import png_bytes

    return {
        "label": exp.label,
        "score": exp.score,
        "target": exp.target,
        "method": exp.method,
        "heatmap_png_b64": base64.b64encode(png_bytes(exp.heatmap_image())).decode(),
        "overlay_png_b64": base64.b64encode(png_bytes(exp.overlay)).decode(),
    }
