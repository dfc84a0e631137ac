"""Preprocessing: the one place that decodes images and builds the train and eval transforms.

The eval transform is a function of :class:`Preprocess` alone, which travels inside the bundle
(``bundle.json``), so evaluation in training and serving build the very same transform.
"""

from __future__ import annotations

import io
from pathlib import Path

import timm.data
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict
from torchvision import transforms as T


class Preprocess(BaseModel):
    """How an image becomes the model's input tensor (timm's data config, made explicit)."""

    model_config = ConfigDict(extra="forbid")

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0


def preprocess_for(
    model: torch.nn.Module, img_size: int | None = None, crop_pct: float | None = None
) -> Preprocess:
    """Resolve the model's preprocessing (timm's ``pretrained_cfg``), with optional overrides."""
    args: dict = {}
    if img_size:
        args["input_size"] = (3, img_size, img_size)
    if crop_pct:
        args["crop_pct"] = crop_pct
    cfg = timm.data.resolve_data_config(args, model=model)
    return Preprocess(
        input_size=tuple(cfg["input_size"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bilinear"),
        crop_pct=float(cfg.get("crop_pct", 1.0)),
    )


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file or encoded bytes into an upright RGB image (EXIF rotation applied)."""
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img = ImageOps.exif_transpose(img)
    if img.mode == "I;16" or img.mode == "I":  # 16-bit grayscale: scale to 8 bits before RGB
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def eval_transform(pre: Preprocess) -> T.Compose:
    """Resize, centre-crop, to tensor, normalise: used by evaluation, export and serving."""
    return timm.data.create_transform(
        input_size=pre.input_size,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=pre.crop_pct,
        is_training=False,
    )


def train_transform(pre: Preprocess, augment: bool = True) -> T.Compose:
    """The training transform: timm's random-resized-crop pipeline, or the eval one without aug."""
    if not augment:
        return eval_transform(pre)
    return timm.data.create_transform(
        input_size=pre.input_size,
        is_training=True,
        scale=(0.6, 1.0),
        hflip=0.5,
        color_jitter=0.2,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
    )
