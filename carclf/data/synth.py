"""The embedded toy data set: seeded side-view car silhouettes in the seven body types.

Each body type is drawn from a side profile that differs in what really tells body types apart:
the roof line (fastback coupe, notchback sedan, open convertible), the number of volumes
(three for a sedan, two for a hatchback or SUV, one for a van), an open bed behind the cab
(pick-up), length, height and ground clearance. Colour, scale, position, background, mirroring,
JPEG quality and noise vary at random, so a model has to learn the shape, and Grad-CAM has a
shape to point at. The same seed always draws the same pixels.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BODY_TYPES: tuple[str, ...] = (
    "convertible",
    "coupe",
    "hatchback",
    "pickup",
    "sedan",
    "suv",
    "van",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")

Point = tuple[float, float]
# A profile: (body outline, window outlines, wheel centres x, wheel radius, clearance, length).
# Coordinates are in car lengths: x from the front bumper (0) to the rear (1), y up from the road.
Profile = tuple[list[Point], list[list[Point]], tuple[float, float], float, float, float]


def _sedan(j: Callable[[float], float]) -> Profile:
    roof = 0.36 + j(0.02)
    body = [(0, 0.07), (0, 0.2), (0.24, 0.24), (0.34, roof), (0.64, roof), (0.76, 0.25)]
    body += [(1, 0.23), (1, 0.07)]
    windows = [[(0.36, 0.25), (0.43, roof - 0.02), (0.62, roof - 0.02), (0.72, 0.25)]]
    return body, windows, (0.17, 0.82), 0.07, 0.07, 1.0


def _coupe(j: Callable[[float], float]) -> Profile:
    roof = 0.33 + j(0.02)
    body = [(0, 0.06), (0, 0.18), (0.3, 0.22), (0.42, roof), (0.54, roof), (0.97, 0.2)]
    body += [(1, 0.17), (1, 0.06)]
    windows = [[(0.44, 0.23), (0.49, roof - 0.02), (0.55, roof - 0.02), (0.75, 0.23)]]
    return body, windows, (0.18, 0.8), 0.07, 0.06, 0.92


def _hatchback(j: Callable[[float], float]) -> Profile:
    roof = 0.44 + j(0.02)
    body = [(0, 0.08), (0, 0.24), (0.22, 0.29), (0.4, roof), (0.9, roof), (0.98, 0.32)]
    body += [(1, 0.2), (1, 0.08)]
    windows = [[(0.42, 0.3), (0.5, roof - 0.03), (0.88, roof - 0.03), (0.92, 0.3)]]
    return body, windows, (0.17, 0.82), 0.08, 0.08, 0.78


def _suv(j: Callable[[float], float]) -> Profile:
    roof = 0.52 + j(0.02)
    body = [(0, 0.12), (0, 0.32), (0.18, 0.35), (0.3, roof), (0.97, roof), (1, 0.45)]
    body += [(1, 0.12)]
    windows = [[(0.32, 0.37), (0.38, roof - 0.04), (0.94, roof - 0.04), (0.95, 0.37)]]
    return body, windows, (0.18, 0.8), 0.1, 0.12, 0.95


def _pickup(j: Callable[[float], float]) -> Profile:
    roof = 0.52 + j(0.02)
    wall = 0.34 + j(0.01)
    body = [(0, 0.12), (0, 0.32), (0.18, 0.35), (0.3, roof), (0.52, roof), (0.54, wall)]
    body += [(1, wall), (1, 0.12)]
    windows = [[(0.32, 0.37), (0.38, roof - 0.04), (0.5, roof - 0.04), (0.51, 0.37)]]
    return body, windows, (0.17, 0.8), 0.1, 0.12, 1.05


def _convertible(j: Callable[[float], float]) -> Profile:
    deck = 0.22 + j(0.01)
    body = [(0, 0.06), (0, 0.19), (0.3, deck), (0.4, deck + 0.11), (0.42, deck + 0.11)]
    body += [(0.36, deck), (1, deck - 0.01), (1, 0.06)]
    return body, [], (0.18, 0.8), 0.07, 0.06, 0.9


def _van(j: Callable[[float], float]) -> Profile:
    roof = 0.62 + j(0.03)
    body = [(0, 0.08), (0, 0.3), (0.06, 0.5), (0.12, roof), (1, roof), (1, 0.08)]
    windows = [[(0.08, 0.36), (0.13, roof - 0.05), (0.3, roof - 0.05), (0.3, 0.36)]]
    windows += [[(0.36, 0.4), (0.36, roof - 0.05), (0.62, roof - 0.05), (0.62, 0.4)]]
    return body, windows, (0.15, 0.84), 0.08, 0.08, 1.1


PROFILES: dict[str, Callable[[Callable[[float], float]], Profile]] = {
    "convertible": _convertible,
    "coupe": _coupe,
    "hatchback": _hatchback,
    "pickup": _pickup,
    "sedan": _sedan,
    "suv": _suv,
    "van": _van,
}


def _random_colour(rng: np.random.Generator, sat: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(0.25, 0.95))
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A sky-to-ground gradient with a horizon, plus a few soft blobs as distractors."""
    top = np.array(_random_colour(rng, (0.0, 0.4)), dtype=np.float32)
    bottom = np.array(_random_colour(rng, (0.0, 0.4)), dtype=np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    arr = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 4)):
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size * 0.5), rng.uniform(3, size * 0.12)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_random_colour(rng, (0.0, 0.5)))
    return img.filter(ImageFilter.GaussianBlur(1.5))


def draw_car(body_type: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """Draw one car of ``body_type`` on a random background.

    Args:
        body_type: one of :data:`BODY_TYPES`.
        rng: the generator that decides every random choice, for reproducibility.
        size: side of the square RGB image in pixels.
    """

    def jitter(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    body, windows, wheels_x, wheel_r, _, length = PROFILES[body_type](jitter)
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    px = size * rng.uniform(0.62, 0.8) * length  # car length in pixels
    x0 = rng.uniform(0.02 * size, max(0.03 * size, size - px - 0.02 * size))
    ground = size * rng.uniform(0.62, 0.85)
    mirror = bool(rng.random() < 0.5)

    def to_px(p: Point) -> tuple[float, float]:
        x = 1.0 - p[0] if mirror else p[0]
        return x0 + x * px, ground - p[1] * px

    paint = _random_colour(rng, (0.3, 1.0))
    glass = tuple(int(v) for v in rng.uniform(150, 230, 3))
    draw.polygon([to_px(p) for p in body], fill=paint, outline=(20, 20, 20))
    for win in windows:
        draw.polygon([to_px(p) for p in win], fill=glass)
    for wx in wheels_x:
        cx, cy = to_px((wx, wheel_r))
        r = wheel_r * px
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(25, 25, 25))
        draw.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=(160, 160, 160))
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, rng.uniform(2.0, 10.0), arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_toy_dataset(
    out: str | Path,
    per_class: tuple[int, int, int] = (160, 40, 40),
    seed: int = 0,
    size: int = 128,
    classes: tuple[str, ...] = BODY_TYPES,
) -> Path:
    """Write the toy data set as an ImageFolder tree ``out/{train,val,test}/<class>/*.jpg``.

    Args:
        out: root of the tree; created if missing.
        per_class: images per class in train, val and test.
        seed: the whole tree is a function of this seed.
        size: side of each square image in pixels.
        classes: body types to draw, a subset of :data:`BODY_TYPES`.

    Returns:
        The root of the written tree.
    """
    out = Path(out)
    for split_index, (split, count) in enumerate(zip(SPLITS, per_class, strict=True)):
        for class_index, name in enumerate(classes):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            # One generator per (split, class): adding a class does not change the others.
            rng = np.random.default_rng([seed, split_index, BODY_TYPES.index(name), class_index])
            for i in range(count):
                quality = int(rng.integers(75, 96))
                draw_car(name, rng, size).save(folder / f"{name}_{i:04d}.jpg", quality=quality)
    return out
