"""The Grad-CAM overlay lies on the pixels it explains (issue #30, item 8), for a non-square
image, centre crops that cut its sides and the squash mode. No Ray.

The model's CAM is known by construction: its hooked layer is a 1x1 convolution that measures
brightness and its class 0 is the mean of that map, so Grad-CAM for class 0 is the brightness
of the model's input, peaked on the one bright square of a black photo. Where that square lies
in the crop is computed here from the preprocessing's geometry alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from carclf.data.transforms import Preprocess
from carclf.explain import Explainer

SIDE = 64  # the model's input is SIDE x SIDE
PHOTO = (256, 128)  # 2:1, width x height
OBJECT = (168, 40, 184, 72)  # left, top, right, bottom of the bright square, in the photo


class Brightness(nn.Module):
    """``features``: the channel mean (a 1x1 convolution); class 0 its spatial mean, class 1
    minus it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 1, kernel_size=1, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1 / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.features(x).mean(dim=(2, 3))
        return torch.cat([mean, -mean], dim=1)


def _photo() -> Image.Image:
    pixels = np.zeros((PHOTO[1], PHOTO[0], 3), np.uint8)
    left, top, right, bottom = OBJECT
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels)


def _expected_box(pre: Preprocess) -> tuple[float, float, float, float]:
    """The bright square in crop coordinates: scale as the eval resize does, then shift by the
    centre crop's offset."""
    target = math.floor(SIDE / pre.crop_pct)
    width, height = PHOTO
    if pre.crop_mode == "squash":
        sx, sy = target / width, target / height
    else:
        sx = sy = target / min(width, height)
    left = round((width * sx - SIDE) / 2)
    top = round((height * sy - SIDE) / 2)
    x0, y0, x1, y1 = OBJECT
    return x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_the_overlays_hot_spot_lies_on_the_object(crop_mode: str, crop_pct: float) -> None:
    pre = Preprocess(
        input_size=(3, SIDE, SIDE),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
    )
    explainer = Explainer(Brightness(), pre, ["bright", "dark"], target_layer="features")
    (exp,) = explainer.explain([_photo()], target=0)
    x0, y0, x1, y1 = _expected_box(pre)
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    assert exp.overlay.size == (SIDE, SIDE) and exp.heatmap.shape == (SIDE, SIDE)

    hot = exp.heatmap >= 0.5
    hx, hy = _centroid(hot)
    assert abs(hx - centre[0]) <= 1.0 and abs(hy - centre[1]) <= 1.0, "heatmap off the object"
    ys, xs = np.nonzero(hot)
    assert xs.min() >= x0 - 1 and xs.max() < x1 + 1 and ys.min() >= y0 - 1 and ys.max() < y1 + 1

    # The overlay is half JET colour, half image. Where the heat is near 0 or 1, JET has no
    # green, so the green channel shows the image beneath alone: the white square must be drawn
    # exactly where the heat is hot (drawn over the whole photo squashed, it lies beside it).
    green = np.asarray(exp.overlay, np.float32)[..., 1]
    extreme = (exp.heatmap <= 0.05) | (exp.heatmap >= 0.95)
    drawn = green >= 100
    misplaced = (drawn != (exp.heatmap >= 0.95)) & extreme
    assert (exp.heatmap >= 0.95).sum() >= 0.4 * (x1 - x0) * (y1 - y0)  # its resampled edges aside
    assert not misplaced.any(), f"{misplaced.sum()} pixels of the overlay show the wrong thing"


def test_a_crop_of_another_size_is_a_callers_bug() -> None:
    pre = Preprocess(input_size=(3, SIDE, SIDE), mean=(0.5,) * 3, std=(0.5,) * 3)
    explainer = Explainer(Brightness(), pre, ["bright", "dark"], target_layer="features")
    with pytest.raises(ValueError, match="the model takes 64x64"):
        explainer.explain_crops([_photo()])
