"""Preprocessing: the one place that decodes images and builds the train and eval transforms.

The eval transform is a function of :class:`Preprocess` alone, which travels inside the bundle
(``bundle.json``), so evaluation in training and serving build the very same transform.

timm, torch and torchvision are imported where a transform is built, not at the top: a process
that only reads a bundle's preprocessing (the ONNX classifier replica of ``serve/``) starts
without them, and ``import timm`` alone takes about 10 s on 2 busy cores, time a replica that
autoscaling or a restart adds would spend before it serves.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict

from carclf.errors import UserInputError

if TYPE_CHECKING:
    import torch
    from torchvision import transforms as T

    from carclf.config import DataConfig


class Preprocess(BaseModel):
    """How an image becomes the model's input tensor (timm's data config, made explicit)."""

    model_config = ConfigDict(extra="forbid")

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    # timm's crop modes: "center" keeps the aspect ratio and crops the long side (a 2:1 photo
    # loses its ends); "squash" resizes each side on its own and keeps the whole image.
    crop_mode: Literal["center", "squash"] = "center"


def preprocess_for(
    model: torch.nn.Module,
    img_size: int | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> Preprocess:
    """Resolve the model's preprocessing (timm's ``pretrained_cfg``), with optional overrides."""
    import timm.data

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
        crop_mode=crop_mode or cfg.get("crop_mode") or "center",
    )


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file or encoded bytes into an upright RGB image (EXIF rotation applied)."""
    return upright_rgb(Image.open(io.BytesIO(source) if isinstance(source, bytes) else source))


def upright_rgb(img: Image.Image) -> Image.Image:
    """Decode an opened image into upright RGB (EXIF rotation applied, 16-bit scaled to 8).

    Apart from :func:`load_image` so that a caller that opened the image itself, with its own
    format allow-list and header checks (the Serve ingress), decodes that very image instead
    of opening the bytes a second time without them.
    """
    # In place, and no convert of an RGB image: both would copy every decoded image once more.
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode == "I;16" or img.mode == "I":  # 16-bit grayscale: scale to 8 bits before RGB
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    img.load()  # decode now: a broken file fails here, not in a later transform
    return img


def eval_transform(pre: Preprocess) -> T.Compose:
    """Resize, centre-crop, to tensor, normalise: used by evaluation, export and serving."""
    import timm.data

    return timm.data.create_transform(
        input_size=pre.input_size,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=pre.crop_pct,
        crop_mode=pre.crop_mode,
        is_training=False,
    )


# timm's interpolation names → Pillow's filters (torchvision's ``pil_modes_mapping``).
PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class EvalResizeCrop:
    """The image half of :func:`eval_transform` in Pillow alone: resize, then centre-crop.

    With :func:`to_model_input` it gives the very same tensor as :func:`eval_transform` (a
    test holds it to timm's transform, bit for bit), without torch, torchvision or timm: a
    server's ingress ships a crop's uint8 pixels, a quarter of the float tensor's bytes, and
    does not load 700 MB of libraries for a resize.

    Args:
        pre: the model's preprocessing (timm's ``center`` or ``squash`` crop mode, as the
            bundle records it).

    Raises:
        UserInputError: an interpolation Pillow has no filter for.
    """

    def __init__(self, pre: Preprocess) -> None:
        if pre.interpolation not in PIL_RESAMPLE:
            raise UserInputError(
                f"preprocess.interpolation: {pre.interpolation!r} is not one of "
                f"{', '.join(PIL_RESAMPLE)}"
            )
        self.pre = pre
        self.resample = PIL_RESAMPLE[pre.interpolation]
        self.height, self.width = pre.input_size[1:]

    def __call__(self, img: Image.Image) -> Image.Image:
        size = resized_size(img.width, img.height, self.pre)
        if size != img.size:  # torchvision returns an image of the asked size unchanged
            img = img.resize(size, self.resample)
        return self._centre_crop(img)

    def _centre_crop(self, img: Image.Image) -> Image.Image:
        """torchvision's ``center_crop``: zero padding where the image is smaller, then the
        crop box rounded as it rounds it."""
        w, h = img.size
        if self.width > w or self.height > h:
            pad_w, pad_h = max(self.width - w, 0), max(self.height - h, 0)
            padded = Image.new(img.mode, (w + pad_w, h + pad_h))
            padded.paste(img, (pad_w // 2, pad_h // 2))
            img, (w, h) = padded, padded.size
        top = round((h - self.height) / 2.0)
        left = round((w - self.width) / 2.0)
        return img.crop((left, top, left + self.width, top + self.height))


def eval_resize_crop(pre: Preprocess) -> EvalResizeCrop:
    """The image half of :func:`eval_transform` (:class:`EvalResizeCrop`), still a PIL image."""
    return EvalResizeCrop(pre)


def to_model_input(pixels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Cropped uint8 ``[N, H, W, C]`` pixels → the normalised float32 ``[N, C, H, W]`` batch.

    The tensor half of :func:`eval_transform` (to-tensor, then normalise) in numpy, in the
    same float32 steps, so the ONNX classifier replica needs no torch.
    """
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std)


AUGMENT_POLICIES = ("none", "basic", "randaugment", "trivialaugment")
# timm's RandAugment at data.augment_magnitude (9 of 10 in timm's ImageNet recipes), with
# magnitude noise 0.5.
RANDAUGMENT = "rand-m{}-mstd0.5"
ROTATION_DEGREES = 10.0
COLOR_JITTER = 0.2


def train_transform(
    pre: Preprocess,
    augment: str = "basic",
    *,
    magnitude: int = 9,
    random_erasing: float = 0.0,
    crop_scale: tuple[float, float] = (0.6, 1.0),
) -> T.Compose:
    """The training transform for an augmentation policy (``AUGMENT_POLICIES``).

    Every policy starts with timm's random-resized crop (``crop_scale`` of the area) and
    horizontal flip and ends with timm's to-tensor, normalisation and random erasing (with
    probability ``random_erasing``); they differ in between:

    * ``none``: the eval transform (no randomness at all, no erasing);
    * ``basic``: random rotation and colour jitter (the seeds' augmentations);
    * ``randaugment``: timm's RandAugment at ``magnitude`` (``RANDAUGMENT``), which replaces the
      colour jitter;
    * ``trivialaugment``: torchvision's ``TrivialAugmentWide``.
    """
    if augment not in AUGMENT_POLICIES:
        raise ValueError(f"augment policy {augment!r} is not one of {AUGMENT_POLICIES}")
    if augment == "none":
        return eval_transform(pre)
    import timm.data
    from torchvision import transforms as T

    crop_flip, middle, to_tensor = timm.data.create_transform(
        input_size=pre.input_size,
        is_training=True,
        scale=crop_scale,
        hflip=0.5,
        color_jitter=COLOR_JITTER if augment == "basic" else None,
        auto_augment=RANDAUGMENT.format(magnitude) if augment == "randaugment" else None,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        re_prob=random_erasing,
        re_mode="pixel",
        separate=True,
    )
    steps = list(middle.transforms)
    if pre.crop_mode == "squash":  # the random crops are then taken from the whole image
        squash = T.Resize(resized_size(1, 1, pre)[::-1], interpolation=_interpolation(pre))
        crop_flip.transforms.insert(0, squash)
    if augment == "basic":
        steps.insert(0, T.RandomRotation(ROTATION_DEGREES, interpolation=_interpolation(pre)))
    elif augment == "trivialaugment":
        steps.append(T.TrivialAugmentWide(interpolation=_interpolation(pre)))
    return T.Compose([*crop_flip.transforms, *steps, *to_tensor.transforms])


def train_transform_of(pre: Preprocess, data: DataConfig) -> T.Compose:
    """:func:`train_transform` with the options of a config's ``data`` section."""
    return train_transform(
        pre,
        data.augment,
        magnitude=data.augment_magnitude,
        random_erasing=data.random_erasing,
        crop_scale=tuple(data.crop_scale),
    )


def _interpolation(pre: Preprocess) -> T.InterpolationMode:
    import timm.data.transforms

    return timm.data.transforms.str_to_interp_mode(pre.interpolation)


def cache_resize(pre: Preprocess) -> Callable[[Image.Image], Image.Image]:
    """The eval transform's first step (shortest side to ``input / crop_pct``), for caching.

    An image cached after this step goes through the eval transform unchanged (a resize to the
    size an image already has is a no-op), and the random crop of the train transform starts
    from it.
    """
    return eval_transform(pre).transforms[0]


def resized_size(width: int, height: int, pre: Preprocess) -> tuple[int, int]:
    """``(width, height)`` of an image after :func:`cache_resize`, without decoding it.

    Follows the resize timm's eval transform picks: in ``squash`` mode both sides to their
    target; else torchvision's shortest-side ``Resize`` for a square input, timm's
    ``ResizeKeepRatio`` otherwise.
    """
    target_h, target_w = (math.floor(side / pre.crop_pct) for side in pre.input_size[1:])
    if pre.crop_mode == "squash":
        return target_w, target_h
    if target_h == target_w:
        short = target_h
        if width <= height:
            return short, int(short * height / width)
        return int(short * width / height), short
    ratio = min(height / target_h, width / target_w)
    return round(width / ratio), round(height / ratio)
