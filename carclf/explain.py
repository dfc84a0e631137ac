"""Explanations over pytorch-grad-cam: class-activation maps on the bundle's PyTorch weights.

A CAM object keeps per-call state (hooks, activations, gradients), so :class:`Explainer` builds
a fresh one for every call and releases it afterwards. A fresh CAM is not enough under
concurrency: every CAM hooks the same module of the same model, and ``backward`` writes the
model's shared ``.grad`` tensors, so two calls at once mix their activations and gradients (a
heatmap that belongs to another request, or a crash inside torch). :meth:`Explainer.explain`
therefore runs one call at a time per :class:`Explainer` (a lock around the forward and backward
passes); threads that share an explainer get exactly the heatmaps they would get one by one.

The hooked layer is found per model (:func:`target_layer_for`) and can be overridden by name;
token-shaped activations of ViT-style models and channels-last ones (Swin) are turned into
``[N, C, H, W]`` maps by :func:`reshape_transform_for`.

A heatmap covers the model's input, which is the image resized and cropped by the bundle's
preprocessing (:func:`carclf.data.transforms.eval_resize_crop`: a centre crop of
``crop_pct``, or the whole image squashed), so the overlay is drawn over that very crop, pixel
for pixel: drawn over the whole image, it would lie beside what it explains.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from safetensors.torch import load_file
from torch import nn

from carclf.bundle import Bundle
from carclf.config import ModelConfig
from carclf.data.transforms import Preprocess, eval_resize_crop, to_model_input
from carclf.errors import UserInputError
from carclf.explain_request import METHOD_NAMES, check_method, class_index
from carclf.models import cam_target_layer, create_model

# The names are carclf.explain_request's (checked there without torch); the classes in that order.
METHODS = dict(
    zip(
        METHOD_NAMES,
        (GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, EigenCAM),
        strict=True,
    )
)


ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


def _is_vit(model: nn.Module) -> bool:
    """A ViT-style model: patch tokens (plus class/register tokens) through ``blocks``."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks") and grid is not None


def target_layer_for(model: nn.Module) -> str:
    """The module Grad-CAM hooks by default.

    ViT-style models: the first norm of the last block, since only the class token of the last
    block's output reaches the head and its patch tokens get no gradient. Others: the last
    feature stage (:func:`carclf.models.cam_target_layer`).
    """
    if _is_vit(model):
        return f"blocks.{len(model.blocks) - 1}.norm1"
    return cam_target_layer(model)


def reshape_transform_for(model: nn.Module) -> ReshapeTransform | None:
    """Turn the hooked activations into ``[N, C, H, W]``, or None when they already are."""
    if _is_vit(model):
        prefix = int(model.num_prefix_tokens)
        h, w = model.patch_embed.grid_size

        def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
            grid = tokens[:, prefix:, :].reshape(tokens.size(0), h, w, tokens.size(2))
            return grid.permute(0, 3, 1, 2)

        return tokens_to_map
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return lambda x: x.permute(0, 3, 1, 2)
    return None


@dataclass
class Explanation:
    """One explained image: the class explained, its score, the heatmap and the overlay."""

    label: str
    score: float
    target: int
    method: str
    heatmap: np.ndarray  # float32 in [0, 1], the model's input size
    overlay: Image.Image  # the heatmap over the crop the model saw, the same size

    def heatmap_image(self) -> Image.Image:
        """The heatmap as an 8-bit grayscale image."""
        return Image.fromarray((self.heatmap * 255).astype(np.uint8), mode="L")


def png_bytes(img: Image.Image) -> bytes:
    """Encode an image as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Explainer:
    """Grad-CAM family explanations for one model.

    Args:
        model: the classifier, in eval mode.
        preprocess: its preprocessing (the bundle's).
        labels: class names in index order.
        target_layer: dotted name of the module to hook; default :func:`target_layer_for`.
        reshape_transform: activations → ``[N, C, H, W]``; default :func:`reshape_transform_for`.
        temperature: the bundle's softmax temperature, so scores match the served ones.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess,
        labels: list[str],
        target_layer: str | None = None,
        reshape_transform: ReshapeTransform | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.labels = labels
        self.crop = eval_resize_crop(preprocess)
        self.target_layer_name = target_layer or target_layer_for(model)
        modules = dict(model.named_modules())
        if self.target_layer_name not in modules:
            raise UserInputError(
                f"target layer: {self.target_layer_name!r} is not a module of the model"
            )
        self.target_layer = modules[self.target_layer_name]
        self.reshape_transform = reshape_transform or reshape_transform_for(model)
        self.temperature = temperature
        # One forward/backward pass at a time on this model (see the module docstring).
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: Bundle, target_layer: str | None = None) -> Explainer:
        """Rebuild the PyTorch model from ``weights.safetensors`` (never a pickle).

        Args:
            bundle: a loaded bundle.
            target_layer: overrides the bundle's ``cam_target_layer``.
        """
        info = bundle.info
        model = create_model(ModelConfig(**info.model_spec), info.num_classes, pretrained=False)
        model.load_state_dict(load_file(str(bundle.weights_path)))
        layer = target_layer or info.cam_target_layer
        return cls(model, info.preprocess, info.labels, layer, temperature=info.temperature)

    def resolve_target(self, target: int | str | None, default: int) -> int:
        """A class index from an index, a class name or None (``default``, the predicted class).

        Raises:
            UserInputError: a target the model does not have (:func:`class_index`).
        """
        index = class_index(target, self.labels)
        return default if index is None else index

    def explain(
        self, images: list[Image.Image], method: str = "gradcam", target: int | str | None = None
    ) -> list[Explanation]:
        """Explain a batch of decoded RGB images, each cropped as the model's eval transform does.

        Safe to call from several threads: the passes through the model run one call at a time.

        Args:
            images: the images, any size.
            method: a key of :data:`METHODS`.
            target: class to explain (name or index); None explains each predicted class.
        """
        check_method(method)
        class_index(target, self.labels)  # refused before any work
        rgb = [img if img.mode == "RGB" else img.convert("RGB") for img in images]
        return self.explain_crops([self.crop(img) for img in rgb], method, target)

    def explain_crops(
        self, crops: list[Image.Image], method: str = "gradcam", target: int | str | None = None
    ) -> list[Explanation]:
        """Explain images already resized and cropped (:func:`eval_resize_crop` of the bundle).

        Args:
            crops: RGB images of exactly the model's input size.
            method: a key of :data:`METHODS`.
            target: class to explain (name or index); None explains each predicted class.

        Raises:
            ValueError: a crop of another size (a caller's bug: it skipped the crop).
        """
        check_method(method)
        index = class_index(target, self.labels)  # refused before any work
        pixels = np.stack([self._pixels(crop) for crop in crops])
        batch = torch.from_numpy(to_model_input(pixels, self.preprocess))
        with self._lock:
            with torch.no_grad():
                probs = torch.softmax(self.model(batch) / self.temperature, dim=1).numpy()
            targets = [int(p.argmax()) if index is None else index for p in probs]
            with METHODS[method](
                model=self.model,
                target_layers=[self.target_layer],
                reshape_transform=self.reshape_transform,
            ) as cam:
                maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(t) for t in targets])
        out = []
        for rgb, heat, t, p in zip(pixels, maps, targets, probs, strict=True):
            heat = np.nan_to_num(heat.astype(np.float32)).clip(0.0, 1.0)
            out.append(
                Explanation(
                    label=self.labels[t],
                    score=float(p[t]),
                    target=t,
                    method=method,
                    heatmap=heat,
                    overlay=overlay_on(rgb, heat),
                )
            )
        return out

    def _pixels(self, crop: Image.Image) -> np.ndarray:
        """A crop's uint8 ``[H, W, 3]`` pixels, checked to be the model's input size."""
        h, w = self.preprocess.input_size[1:]
        if crop.size != (w, h):
            raise ValueError(f"a crop of {crop.size[0]}x{crop.size[1]}, the model takes {w}x{h}")
        return np.asarray(crop.convert("RGB"), dtype=np.uint8)


def overlay_on(pixels: np.ndarray, heat: np.ndarray) -> Image.Image:
    """The heatmap drawn over the uint8 ``[H, W, 3]`` pixels it was computed on (same size)."""
    rgb = pixels.astype(np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, heat, use_rgb=True))


def save_explanations(explanations: list[Explanation], names: list[str], out: Path) -> list[Path]:
    """Write ``<name>.overlay.png`` and ``<name>.heatmap.png`` for each explanation."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for exp, name in zip(explanations, names, strict=True):
        overlay = out / f"{name}.overlay.png"
        exp.overlay.save(overlay)
        exp.heatmap_image().save(out / f"{name}.heatmap.png")
        written.append(overlay)
    return written
