"""Near-duplicates as real photos and small low-detail images meet them.

Copies of photos (re-encoded, resized, brighter, slightly cropped) must be confirmed; distinct
digit scans, flat icons and plain-background shapes, whose dHashes lie a few bits apart by the
thousand, must not be; clusters must not chain; a near-duplicate across classes is reported as a
possible label error. The photos are scikit-learn's two sample images, the digit scans its
``load_digits``: both ship with the package.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits, load_sample_image

from carclf.cli import main
from carclf.data.audit import audit_tree, run_audit, summary_lines
from carclf.data.duplicates import (
    NEAR_DUPLICATE_BITS,
    NEAR_DUPLICATE_DIAMETER,
    NEAR_DUPLICATE_DISTANCE,
    fingerprint,
    image_distance,
    near_duplicate_groups,
    near_duplicate_pairs,
)
from carclf.data.transforms import load_image
from carclf.errors import UserInputError

# --- images ---------------------------------------------------------------------------------


def _decoded(img: Image.Image, fmt: str = "PNG", **options) -> Image.Image:
    """``img`` written as ``fmt`` and read back with the audit's loader."""
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return load_image(buf.getvalue())


def _photos() -> list[Image.Image]:
    """Twelve distinct natural photos: a 3x2 grid of tiles of each of the two sample images."""
    tiles = []
    for name in ("china.jpg", "flower.jpg"):
        full = Image.fromarray(load_sample_image(name))  # 640x427
        w, h = full.size[0] // 3, full.size[1] // 2
        tiles += [
            full.crop((x * w, y * h, (x + 1) * w, (y + 1) * h)) for y in (0, 1) for x in (0, 1, 2)
        ]
    return tiles


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


def _brighter(img: Image.Image, levels: int) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + levels, 0, 255).astype(np.uint8))


COPIES = {
    "jpeg-60": lambda img: _decoded(img, "JPEG", quality=60),
    "half-size": lambda img: _decoded(img.resize((img.width // 2, img.height // 2))),
    "brighter-10": lambda img: _decoded(_brighter(img, 10)),
    "crop-2%": lambda img: _decoded(_crop(img, 0.02, 0.02, 0.02, 0.02)),
    "crop-3%": lambda img: _decoded(_crop(img, 0.03, 0.03, 0.03, 0.03)),
    "crop-3%-two-sides": lambda img: _decoded(_crop(img, 0.03, 0.03, 0, 0)),
    "crop-3%-one-side": lambda img: _decoded(_crop(img, 0, 0, 0.03, 0)),
    "crop-2%-half-jpeg": lambda img: _decoded(
        _crop(img, 0.02, 0.02, 0.02, 0.02).resize((img.width // 2, img.height // 2)),
        "JPEG",
        quality=60,
    ),
}


def _digits(digit: int | None = None) -> list[Image.Image]:
    """The 8x8 digit scans of ``load_digits`` (1,797, or those of one digit) upscaled to 32 px."""
    data = load_digits()
    scans = data.images if digit is None else data.images[data.target == digit]
    return [
        Image.fromarray((scan * 255 / 16).astype(np.uint8)).resize(
            (32, 32), Image.Resampling.BILINEAR
        )
        for scan in scans
    ]


def _icon(k: int) -> Image.Image:
    """Flat icon ``k``: one of four glyphs, its place, size and two colours drawn by its seed."""
    rng = np.random.default_rng([7, k])
    back, fore = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    img = Image.new("RGB", (48, 48), back)
    draw = ImageDraw.Draw(img)
    x0, y0 = (int(v) for v in rng.integers(4, 20, 2))
    x1, y1 = x0 + int(rng.integers(14, 26)), y0 + int(rng.integers(14, 26))
    if k % 4 == 0:
        draw.rectangle((x0, y0, x1, y1), fill=fore)
    elif k % 4 == 1:
        draw.ellipse((x0, y0, x1, y1), fill=fore)
    elif k % 4 == 2:
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fore)
    else:
        draw.rectangle((x0, y0, x1, y0 + 5), fill=fore)
        draw.rectangle((x0, y0, x0 + 5, y1), fill=fore)
    return img


def _disc(k: int) -> Image.Image:
    """A disc on a plain background: one of 36 places 8 px apart, in one of four colours."""
    colours = [(200, 30, 30), (30, 160, 40), (40, 60, 200), (230, 200, 40)]
    place = k // 4
    cx, cy = 12 + 8 * (place % 6), 12 + 8 * (place // 6)
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((cx - 8, cy - 8, cx + 8, cy + 8), fill=colours[k % 4])
    return img


def _prints(images: list[Image.Image]) -> list[dict]:
    return [{"sha256": str(i), **fingerprint(_decoded(img))} for i, img in enumerate(images)]


def _bits(a: dict, b: dict) -> int:
    """The candidate search's figure: the smaller difference of the two dHashes."""
    return min(bin(a[key] ^ b[key]).count("1") for key in ("dhash", "dhash_flat"))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [_decoded(tile) for tile in _photos()]


# --- copies are found -----------------------------------------------------------------------


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_copies_of_photos_are_confirmed(photos, copy: str) -> None:
    for photo in photos:
        original, changed = fingerprint(photo), fingerprint(COPIES[copy](photo))
        assert _bits(original, changed) <= NEAR_DUPLICATE_BITS, copy
        assert image_distance([original], [changed])[0] <= NEAR_DUPLICATE_DISTANCE, copy


def test_distinct_photos_are_not_near_duplicates(photos) -> None:
    assert near_duplicate_pairs(_prints(photos)) == []


# --- distinct low-detail images are not -----------------------------------------------------


def test_the_distinct_digit_scans_are_not_near_duplicates() -> None:
    """All 1,797 scans: the set an audit once put into 21 clusters by dHash alone."""
    rows = _prints(_digits())
    hashes = np.array([r["dhash"] for r in rows], dtype=np.uint64)
    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= 4
    assert (close.sum() - len(rows)) // 2 > 10_000  # what the dHash alone calls near-duplicates
    assert near_duplicate_pairs(rows) == []


@pytest.mark.parametrize("draw", [_icon, _disc], ids=["flat-icons", "discs"])
def test_flat_icons_and_plain_shapes_are_not_near_duplicates(draw) -> None:
    rows = _prints([draw(k) for k in range(120)])
    assert near_duplicate_pairs(rows) == []


def _write(root: Path, label: str, images: list[Image.Image], fmt: str = "PNG") -> list[str]:
    (root / label).mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        names.append(f"{label}/{i:03d}.{fmt.lower()}")
        img.save(root / names[-1], fmt)
    return names


def test_a_flat_tree_of_distinct_low_detail_images_is_not_grouped(tmp_path: Path) -> None:
    root = tmp_path / "low-detail"
    _write(root, "one", _digits(1))
    _write(root, "seven", _digits(7))
    _write(root, "icons", [_icon(k) for k in range(120)])
    _write(root, "discs", [_disc(k) for k in range(144)])
    run = run_audit(root, tmp_path / "m.parquet", ratios=(0.7, 0.15, 0.15), seed=0)
    report = run.report
    assert report["images"] == 182 + 179 + 120 + 144 and not report["problems"]
    assert report["near_duplicate_clusters"] == {"clusters": 0, "images": 0, "listed": []}
    assert report["near_duplicates"]["pairs"] == 0
    assert report["near_duplicate_label_conflicts"]["pairs"] == 0
    for label, n in (("one", 182), ("seven", 179), ("icons", 120), ("discs", 144)):
        counts = [report["counts"][s][label] for s in ("train", "val", "test")]
        assert counts == [n - 2 * round(0.15 * n), round(0.15 * n), round(0.15 * n)], label
    assert not any("near-duplicate" in line for line in summary_lines(report))


# --- clusters -------------------------------------------------------------------------------


def test_copies_in_a_flat_tree_form_one_cluster_within_one_split(photos, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for c, label in enumerate(("cab", "limo", "taxi")):
        _write(root, label, photos[4 * c : 4 * c + 4])
    copies = [COPIES[name](photos[0]) for name in sorted(COPIES)]
    names = {"cab/000.png", *_write(root, "cab/copies", copies)}
    result = audit_tree(root, (0.5, 0.25, 0.25), seed=1)
    assert [len(c["paths"]) for c in result.clusters] == [len(names)]
    rel = {Path(p).relative_to(root.resolve()).as_posix() for p in result.clusters[0]["paths"]}
    assert rel == names
    split = {r["split"] for r in result.rows if r["path"] in result.clusters[0]["paths"]}
    assert len(split) == 1 and not result.near_duplicates and not result.problems


def test_clusters_do_not_chain_far_beyond_the_threshold(photos) -> None:
    """A ladder of ever brighter copies: neighbours are near-duplicates, the ends far apart."""
    mid = Image.fromarray((np.asarray(photos[3], np.float64) * 0.5 + 50).astype(np.uint8))
    rows = _prints([_brighter(mid, 7 * k) for k in range(12)])
    pairs = near_duplicate_pairs(rows)
    linked = {frozenset((p.a, p.b)) for p in pairs}
    assert frozenset(("0", "1")) in linked and frozenset(("0", "11")) not in linked
    groups = near_duplicate_groups(rows, pairs)
    clusters = [np.flatnonzero(groups == g) for g in sorted(set(groups.tolist()))]
    assert len(clusters) >= 2  # chaining by dHash alone made one cluster of all twelve
    for members in clusters:  # the diameter is bounded, however long the chain
        first, second = zip(*[(rows[a], rows[b]) for a in members for b in members], strict=True)
        assert image_distance(first, second).max() <= NEAR_DUPLICATE_DIAMETER


def test_copies_of_one_photo_stay_together_however_they_differ_from_each_other(photos) -> None:
    """Two crops from opposite sides are further apart than either is from the original."""
    rows = _prints([photos[0], *(COPIES[name](photos[0]) for name in sorted(COPIES))])
    groups = near_duplicate_groups(rows, near_duplicate_pairs(rows))
    assert len(set(groups.tolist())) == 1


# --- across classes, and the way out -----------------------------------------------------------


def test_a_near_duplicate_across_classes_is_a_possible_label_error(photos, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _write(root, "cab", photos[0:4])
    _write(root, "limo", [*photos[4:7], COPIES["jpeg-60"](photos[0])], fmt="JPEG")
    _write(root, "taxi", photos[8:12])
    run = run_audit(root, tmp_path / "m.parquet", ratios=(0.5, 0.25, 0.25))
    conflicts = run.report["near_duplicate_label_conflicts"]
    assert conflicts["pairs"] == 1
    (pair,) = conflicts["listed"]
    assert [Path(p).name for p in pair["paths"]] == ["000.png", "003.jpeg"]
    assert pair["labels"] == ["cab", "limo"] and pair["distance"] <= NEAR_DUPLICATE_DISTANCE
    assert run.report["near_duplicate_clusters"]["clusters"] == 0  # reported, not grouped
    saved = json.loads(run.report_paths[0].read_text())
    assert saved["near_duplicate_label_conflicts"] == conflicts
    text = run.report_paths[1].read_text()
    assert "## Near-duplicates with different labels: possible label errors (1 pairs)" in text
    assert "- cab vs limo (" in text
    assert any("possible label errors" in line for line in summary_lines(run.report))


def test_a_class_left_unsplittable_by_grouping_names_the_option(photos, tmp_path, capsys) -> None:
    root = tmp_path / "photos"
    _write(root, "cab", photos[0:4])
    _write(root, "limo", photos[4:8])
    _write(root, "solo", [COPIES[name](photos[8]) for name in ("jpeg-60", "half-size", "crop-2%")])
    manifest = tmp_path / "m.parquet"
    with pytest.raises(UserInputError, match="in 1 near-duplicate group") as caught:
        run_audit(root, manifest)
    assert "--no-group-near-duplicates" in str(caught.value)
    assert "run_audit(..., group_near_duplicates=False)" in str(caught.value)
    assert main(["data", "audit", str(root), "--manifest", str(manifest)]) == 2
    assert "--no-group-near-duplicates" in capsys.readouterr().err
    args = ["data", "audit", str(root), "--manifest", str(manifest), "--no-group-near-duplicates"]
    assert main(args) == 0
