"""The model deployments: one ONNX classifier and one Grad-CAM explainer per bundle.

Both load the same bundle (verified hashes). The ingress decodes each image once; the classifier
gets it already preprocessed (the bundle's own eval transform, applied in the ingress, so decoding
and resizing run beside onnxruntime instead of before it), the explainer gets the decoded RGB image
it draws its overlay on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import numpy as np
import ray
from PIL import Image
from ray import serve

from carclf.bundle import load_bundle
from carclf.explain import Explainer, png_bytes
from carclf.inference import OnnxClassifier
from carclf.metrics import softmax

log = logging.getLogger("ray.serve")


def _replica_cpus() -> int:
    """CPUs this replica was given: onnxruntime and torch get that many threads, no more."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # outside a replica (unit tests)
        cpus = 1
    return max(int(cpus), 1)


# Dynamic batching defaults: the app's arguments and ``user_config`` start from these. On a CPU
# replica the batch does not wait: onnxruntime at one thread runs a batch of 8 no faster per
# image than 8 batches of 1, so waiting only idles the core (bench/results/serve.md); requests
# that queue while a batch runs still go together. A GPU runs a batch nearly as fast as one
# image, so there it waits a little for company.
MAX_BATCH_SIZE = 8
BATCH_WAIT_TIMEOUT_S = {"cpu": 0.0, "gpu": 0.01}


@serve.deployment(max_ongoing_requests=32)
class ClassifierDeployment:
    """onnxruntime inference with dynamic batching (``@serve.batch``).

    Args:
        bundle_path: the bundle directory.
        use_gpu: use the CUDA provider when the replica has a GPU.
    """

    def __init__(self, bundle_path: str, use_gpu: bool = False) -> None:
        bundle = load_bundle(bundle_path)
        self.clf = OnnxClassifier(bundle, threads=_replica_cpus(), use_gpu=use_gpu)
        self.info = bundle.info
        log.info("classifier %s on %s", self.info.name, self.clf.provider)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch size and wait change at runtime through ``user_config``."""
        size = user_config.get("max_batch_size", MAX_BATCH_SIZE)
        device = "gpu" if self.clf.provider == "CUDAExecutionProvider" else "cpu"
        wait = user_config.get("batch_wait_timeout_s", BATCH_WAIT_TIMEOUT_S[device])
        self._batched.set_max_batch_size(int(size))
        self._batched.set_batch_wait_timeout_s(float(wait))

    def metadata(self) -> dict[str, Any]:
        """Name, labels, input shape and the active execution provider."""
        return {
            "name": self.info.name,
            "labels": self.info.labels,
            "input_size": list(self.info.input_size),
            "arch": self.info.arch,
            "provider": self.clf.provider,
        }

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S["cpu"])
    async def _batched(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.clf.logits(np.stack(inputs)))

    def batching(self) -> dict[str, Any]:
        """The batch size and wait in force (they follow ``user_config``)."""
        return {
            # Serve exposes the getters only with a leading underscore.
            "max_batch_size": self._batched._get_max_batch_size(),
            "batch_wait_timeout_s": self._batched._get_batch_wait_timeout_s(),
        }

    async def predict(self, x: np.ndarray, top_k: int = 5) -> dict:
        """Top-k prediction for one preprocessed ``[C, H, W]`` image (batched with others)."""
        logits = await self._batched(x)
        return self.clf.top_k(softmax(logits[None]), top_k)[0]

    async def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Logits and probabilities for a preprocessed ``[N, C, H, W]`` batch (KServe V2).

        Each image joins the dynamic batch, so V2 clients share batches with V1 ones.
        """
        logits = np.stack(await asyncio.gather(*(self._batched(x) for x in batch)))
        return {"logits": logits, "probabilities": softmax(logits)}

    def check_health(self) -> None:
        """A real inference on a blank image: a replica that cannot infer is unhealthy."""
        self.clf.probabilities([Image.new("RGB", tuple(self.info.input_size[1:]))])


@serve.deployment(max_ongoing_requests=4)
class ExplainerDeployment:
    """Grad-CAM explanations on the bundle's PyTorch weights; a new CAM object per request."""

    def __init__(self, bundle_path: str) -> None:
        import torch

        torch.set_num_threads(_replica_cpus())
        self.explainer = Explainer.from_bundle(load_bundle(bundle_path))

    def explain(self, image: Image.Image, method: str = "gradcam", target: Any = None) -> dict:
        """One explanation as JSON-ready fields with base64 PNGs."""
        exp = self.explainer.explain([image], method=method, target=target)[0]
        return {
            "label": exp.label,
            "score": exp.score,
            "target": exp.target,
            "method": exp.method,
            "heatmap_png_b64": base64.b64encode(png_bytes(exp.heatmap_image())).decode(),
            "overlay_png_b64": base64.b64encode(png_bytes(exp.overlay)).decode(),
        }
