"""Identical files and near-duplicates: finding them, reporting them, keeping one copy.

Identical means the same sha256. A near-duplicate is a different file that shows the same picture:
a re-encoded, resized, slightly brightened or slightly cropped copy. The audit's check computes a
small :func:`fingerprint` of every file while it has it decoded (two 64-bit difference hashes, a
32x32 gray thumbnail and 8x8 colour planes), and near-duplicates are found from those in two steps:

1. Candidates: pairs whose dHashes differ in at most :data:`NEAR_DUPLICATE_BITS` bits, in the
   plain one or in the one that ignores differences of a few levels (a brighter copy of a photo
   with a near-white sky has that sky clipped flat). Cheap enough to compare every pair, but
   coarse: a 9x8 hash says little about small low-detail images (digit scans, flat icons,
   plain-background renders), thousands of which share hashes a few bits apart.
2. Confirmation: a candidate counts only if :func:`image_distance` is at most
   :data:`NEAR_DUPLICATE_DISTANCE`. That is the larger of two RMS differences (of 1): the gray
   thumbnails on a 12x12 grid, a uniform brightness shift weighted by a quarter, at the best of a
   few crop alignments (0, 2 or 3 % off each border of either image, so a small crop matches its
   original); and the colour planes (Cb, Cr), weighted by half, so that shapes alike in gray but
   not in colour stay apart.

The thresholds rest on measurements that ``tests/test_near_duplicates.py`` repeats: JPEG quality
60, a 0.5x resize, +10 brightness and 2-3 % crops of photos come out at most about 0.011 (and 9
bits), while the closest two of the 1,797 distinct 8x8 digit scans of scikit-learn's
``load_digits``, upscaled to 32 px with any filter, are 0.027 apart, and flat icons or discs that
differ in colour or position 0.028.

:func:`near_duplicate_pairs` finds the confirmed pairs of distinct files once per audit; from them
come the near-duplicates across splits (:func:`near_duplicates`), the pairs with different labels,
reported as possible label errors and never grouped (:func:`near_label_conflicts`), and the
clusters that a flat root's split keeps within one split (:func:`near_duplicate_groups`, used by
:mod:`carclf.data.splits`). Clusters have a bounded diameter: confirmed pairs are taken from the
closest up, and two clusters merge only when every member of one is within
:data:`NEAR_DUPLICATE_DIAMETER` (twice the threshold) of every member of the other. Copies of one
image (two crops from opposite sides are about that far apart) stay together, and no chain of
small steps joins images further apart than that, however many steps lie between them.
:func:`find_duplicates` and :func:`dedupe` handle identical files.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from carclf.data.manifest import SPLIT_NAMES

# dHash Hamming distance (of 64 bits) at or below which two files are compared more closely.
# Wide enough for 3 % crops (up to 9 bits measured); the confirmation rejects what it lets in.
NEAR_DUPLICATE_BITS = 10
# :func:`image_distance` at or below which a candidate pair is a near-duplicate.
NEAR_DUPLICATE_DISTANCE = 0.018
# The widest a cluster may be: copies of one image, each within the threshold of it, are within
# about twice that of each other (two crops from opposite sides), while chains go no further.
NEAR_DUPLICATE_DIAMETER = 2 * NEAR_DUPLICATE_DISTANCE
THUMB_SIDE = 32  # the stored thumbnail: 1 KiB a file, fine enough to resample crop windows from
CHROMA_SIDE = 8  # colour is coarse in photos and JPEGs: 128 bytes a file
_COMPARE_SIDE = 12  # coarse enough that a leftover crop offset is a fraction of a cell
_CROPS = (0.02, 0.03)  # border fractions tried, on each side and on both
_FLAT_LEVELS = 3  # the dead zone of the second dHash: +10 on a near-white sky clips it flat
_BRIGHTNESS_WEIGHT = 0.25  # +10 levels adds 0.01: a slightly brighter copy still matches
# Colour counts at half: copies measured at most 0.018 RMS in Cb/Cr (3 % crops), while discs and
# icons alike in gray (the same shape and place, another colour as bright) are 0.07 or more.
_CHROMA_WEIGHT = 0.5
# Above this unaligned distance no small crop can bring a pair under the threshold (3 % crops of
# photos measured at most 0.06), so the alignment search, 97 comparisons a pair, is skipped.
_ALIGN_BELOW = 0.12
_PAIR_BLOCK = 4_000_000  # dHash pairs compared at once
_CONFIRM_BLOCK = 16_384  # candidate pairs confirmed at once: about 40 MB of float64
_ALIGN_BLOCK = 256  # pairs aligned at once: about 30 MB of float64


@dataclass(frozen=True)
class NearPair:
    """Two distinct files (by sha256) confirmed as near-duplicates."""

    a: str
    b: str
    bits: int
    distance: float


# --- fingerprints and the distance ---------------------------------------------------------


def dhash(img: Image.Image, dead_zone: int = 0) -> int:
    """A 64-bit difference hash: is each pixel of a 9x8 gray thumbnail darker than its right one.

    With a ``dead_zone``, darker by more than that many levels (of 255): differences too small
    to survive a re-encode or a clipped highlight count as none.
    """
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1] + dead_zone).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def fingerprint(img: Image.Image) -> dict[str, int | bytes]:
    """What the near-duplicate search keeps of a decoded image.

    ``dhash`` and ``dhash_flat`` are :func:`dhash` without and with a dead zone of
    :data:`_FLAT_LEVELS` (so that flat, clipped or noisy regions agree in the second); ``thumb`` is
    a :data:`THUMB_SIDE` square gray thumbnail and ``chroma`` the Cb and Cr planes at
    :data:`CHROMA_SIDE` square (box-filtered, aspect not kept), as bytes. All come from one
    box-filtered colour thumbnail: a single pass over the decoded image.
    """
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    small = rgb.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    gray = small.convert("L")
    colour = small.convert("YCbCr").resize((CHROMA_SIDE, CHROMA_SIDE), Image.Resampling.BOX)
    chroma = np.asarray(colour)[..., 1:].transpose(2, 0, 1)  # the planes, not interleaved
    return {
        "dhash": dhash(gray),
        "dhash_flat": dhash(gray, _FLAT_LEVELS),
        "thumb": gray.tobytes(),
        "chroma": chroma.tobytes(),
    }


def _window_map(lo: float, hi: float) -> np.ndarray:
    """Box-resampling of the window ``[lo, hi]`` (fractions) of a thumbnail axis onto the grid."""
    edges = np.linspace(lo * THUMB_SIDE, hi * THUMB_SIDE, _COMPARE_SIDE + 1)
    cells = np.arange(THUMB_SIDE)
    overlap = np.minimum(edges[1:, None], cells + 1) - np.maximum(edges[:-1, None], cells)
    overlap = np.clip(overlap, 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


# Per axis: the whole, then each crop fraction off the start, the end and both.
_MAPS = np.stack(
    [_window_map(0.0, 1.0)]
    + [_window_map(*w) for c in _CROPS for w in ((c, 1.0), (0.0, 1.0 - c), (c, 1.0 - c))]
)
_WINDOWS, _CELLS = len(_MAPS), _COMPARE_SIDE * _COMPARE_SIDE
_WHOLE = np.kron(_MAPS[0], _MAPS[0]).T / 255.0  # a flat uint8 thumbnail → its grid, one product
_AXIS = _MAPS.transpose(2, 0, 1).reshape(THUMB_SIDE, -1)  # every window of one axis, one product


@dataclass(frozen=True)
class _Prints:
    """The fingerprints of n files as arrays: thumbnails, their grids, the chroma planes."""

    thumbs: np.ndarray  # (n, THUMB_SIDE²) uint8
    grids: np.ndarray  # (n, cells): each thumbnail whole on the comparison grid
    chroma: np.ndarray  # (n, 2·CHROMA_SIDE²), scaled to [0, 1]

    @classmethod
    def of(cls, prints: Sequence[dict]) -> _Prints:
        thumbs = np.frombuffer(b"".join(p["thumb"] for p in prints), dtype=np.uint8)
        chroma = np.frombuffer(b"".join(p["chroma"] for p in prints), dtype=np.uint8)
        thumbs = thumbs.reshape(len(prints), THUMB_SIDE * THUMB_SIDE)
        chroma = chroma.reshape(len(prints), 2 * CHROMA_SIDE * CHROMA_SIDE)
        return cls(thumbs, thumbs @ _WHOLE, chroma / 255.0)


def _windows(thumbs: np.ndarray) -> np.ndarray:
    """Each thumbnail's grid for every pair of crop windows, axes ``(n, wx, gx, wy, gy)``.

    Two matrix products over the whole batch (columns, then rows), not one per image; window 0
    of each axis is the whole.
    """
    n = len(thumbs)
    cols = thumbs.reshape(n * THUMB_SIDE, THUMB_SIDE) / 255.0 @ _AXIS  # (n·y, wx·gx)
    both = cols.reshape(n, THUMB_SIDE, -1).transpose(0, 2, 1) @ _AXIS  # (n, wx·gx, wy·gy)
    return both.reshape(n, _WINDOWS, _COMPARE_SIDE, _WINDOWS, _COMPARE_SIDE)


def _distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RMS difference over the last axis, the mean (a brightness shift) down-weighted."""
    diff = x - y
    mean = diff.mean(axis=-1)
    var = np.maximum((diff**2).mean(axis=-1) - mean**2, 0.0)
    return np.sqrt(var + (_BRIGHTNESS_WEIGHT * mean) ** 2)


def _aligned(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The smallest distance over every crop window of file ``i`` against ``j`` whole, and back.

    :func:`_distance` expanded into sums, so that what depends on one file (its windows, their
    sums and sums of squares) is computed once per file, and only the cross term once per pair.
    """
    files, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)
    windows = _windows(thumbs[files])
    squares = np.einsum("uagbh,uagbh->uab", windows, windows) / _CELLS
    means = windows.sum(axis=(2, 4)) / _CELLS
    whole = windows[:, 0, :, 0, :]
    ends = (inverse[: len(i)], inverse[len(i) :])
    best = []
    for a, b in (ends, ends[::-1]):  # every window of a against b whole, then the other way
        cross = np.einsum("pagbh,pgh->pab", windows[a], whole[b]) / _CELLS
        mean = means[a] - means[b, :1, :1]
        var = np.maximum(squares[a] - 2 * cross + squares[b, :1, :1] - mean**2, 0.0)
        best.append(np.sqrt(var + (_BRIGHTNESS_WEIGHT * mean) ** 2).min(axis=(1, 2)))
    return np.minimum(*best)


def _confirm(prints: _Prints, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """:func:`image_distance` of the pairs ``(i, j)`` of ``prints``."""
    gray = _distance(prints.grids[i], prints.grids[j])
    redo = np.flatnonzero(gray <= _ALIGN_BELOW)  # confirmed ones too: their distance is reported
    for start in range(0, len(redo), _ALIGN_BLOCK):
        idx = redo[start : start + _ALIGN_BLOCK]
        gray[idx] = np.minimum(gray[idx], _aligned(prints.thumbs, i[idx], j[idx]))
    colour = np.sqrt(((prints.chroma[i] - prints.chroma[j]) ** 2).mean(axis=-1))
    return np.round(np.maximum(gray, _CHROMA_WEIGHT * colour), 6)


def image_distance(first: Sequence[dict], second: Sequence[dict]) -> np.ndarray:
    """How far apart each pair of images is, by their :func:`fingerprint`; see the module.

    Args:
        first: Fingerprints (or rows that hold them), one per pair.
        second: The other fingerprint of each pair.

    Returns:
        One distance per pair, rounded to 6 places so that machines agree on ties; pairs at
        :data:`NEAR_DUPLICATE_DISTANCE` or less are near-duplicates.
    """
    prints = _Prints.of([*first, *second])
    i = np.arange(len(first))
    return _confirm(prints, i, i + len(first))


# --- finding the pairs ---------------------------------------------------------------------


def _candidates(hashes: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of ``(i, j, bits)``, i < j, where either dHash (of the columns of ``hashes``)
    differs in :data:`NEAR_DUPLICATE_BITS` or less, ``bits`` the smaller count.

    Every pair is compared (n² bit counts) in blocks, so memory stays small.
    """
    n = len(hashes)
    step = max(1, min(1024, _PAIR_BLOCK // max(n, 1)))
    for start in range(0, n, step):
        rows_i = np.arange(start, min(start + step, n))[:, None]
        cols = np.arange(start, n)[None, :]  # only j >= start: each pair once
        dist = np.bitwise_count(hashes[rows_i, 0] ^ hashes[cols, 0])
        np.minimum(dist, np.bitwise_count(hashes[rows_i, 1] ^ hashes[cols, 1]), out=dist)
        a, b = np.nonzero((dist <= NEAR_DUPLICATE_BITS) & (cols > rows_i))
        for k in range(0, len(a), _CONFIRM_BLOCK):  # low-detail sets can have many candidates
            part = slice(k, k + _CONFIRM_BLOCK)
            yield start + a[part], start + b[part], dist[a[part], b[part]]


def near_duplicate_pairs(rows: list[dict]) -> list[NearPair]:
    """Every confirmed pair of distinct files among ``rows``, whatever their splits and labels.

    Rows need ``sha256`` and :func:`fingerprint`'s keys; identical files are one file here.
    """
    files: dict[str, dict] = {}
    for row in rows:
        files.setdefault(row["sha256"], row)
    keys = list(files)
    hashes = np.array([[f["dhash"], f["dhash_flat"]] for f in files.values()], dtype=np.uint64)
    prints = _Prints.of(list(files.values()))  # the grids once per file, not once per pair
    pairs = []
    for i, j, bits in _candidates(hashes):
        dist = _confirm(prints, i, j)
        for k in np.flatnonzero(dist <= NEAR_DUPLICATE_DISTANCE):
            pairs.append(NearPair(keys[i[k]], keys[j[k]], int(bits[k]), float(dist[k])))
    return pairs


def _row_pairs(
    rows: list[dict], pairs: Iterable[NearPair]
) -> Iterator[tuple[dict, dict, NearPair]]:
    """Each confirmed pair as the rows of its two files (identical copies each count)."""
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_hash[row["sha256"]].append(row)
    for pair in pairs:
        for row_a in by_hash.get(pair.a, ()):
            for row_b in by_hash.get(pair.b, ()):
                yield row_a, row_b, pair


def _listed(row_a: dict, row_b: dict, pair: NearPair) -> dict:
    ordered = sorted((row_a, row_b), key=lambda r: r["path"])
    return {
        "paths": [r["path"] for r in ordered],
        "labels": [r["label"] for r in ordered],
        "splits": [r["split"] for r in ordered],
        "bits": pair.bits,
        "distance": round(pair.distance, 4),
    }


def near_duplicates(rows: list[dict], pairs: Iterable[NearPair] | None = None) -> list[dict]:
    """Near-duplicate pairs of files in different splits: leakage, closest first.

    Args:
        rows: The manifest's rows.
        pairs: :func:`near_duplicate_pairs` of these rows (or more), when already found.
    """
    pairs = near_duplicate_pairs(rows) if pairs is None else pairs
    found = [_listed(a, b, p) for a, b, p in _row_pairs(rows, pairs) if a["split"] != b["split"]]
    return sorted(found, key=lambda p: (p["distance"], p["paths"]))


def near_label_conflicts(rows: list[dict], pairs: Iterable[NearPair] | None = None) -> list[dict]:
    """Near-duplicate pairs whose files have different labels: possible label errors.

    They are reported, not grouped: which label is right is a question for a person.
    """
    pairs = near_duplicate_pairs(rows) if pairs is None else pairs
    found = [_listed(a, b, p) for a, b, p in _row_pairs(rows, pairs) if a["label"] != b["label"]]
    return sorted(found, key=lambda p: (p["distance"], p["paths"]))


def _diameter(prints: _Prints, known: dict, first: list[int], second: list[int]) -> float:
    """The largest distance from a member of ``first`` to one of ``second``.

    Pairs not in ``known`` (``(i, j) → distance``, i < j) are measured and added to it.
    """
    between = [(min(x, y), max(x, y)) for x in first for y in second]
    todo = [pair for pair in between if pair not in known]
    if todo:
        i, j = np.array(todo).T
        known.update(zip(todo, _confirm(prints, i, j).tolist(), strict=True))
    return max(known[pair] for pair in between)


def near_duplicate_groups(files: Sequence[dict], pairs: Iterable[NearPair]) -> np.ndarray:
    """A group number per file: clusters of confirmed pairs with a bounded diameter.

    Args:
        files: One row per distinct file (``sha256`` and :func:`fingerprint`'s keys).
        pairs: Confirmed pairs (:func:`near_duplicate_pairs`); those of other files are ignored.

    Pairs are taken closest first (ties in file order). Each joins the clusters of its two files
    when every member of one is within :data:`NEAR_DUPLICATE_DIAMETER` of every member of the
    other, so a~b and b~c put a, b and c together only if a and c are that close as well.
    """
    index = {f["sha256"]: i for i, f in enumerate(files)}
    edges = sorted(
        (p.distance, *sorted((index[p.a], index[p.b])))
        for p in pairs
        if p.a in index and p.b in index
    )
    group = np.arange(len(files))
    if not edges:
        return group
    prints, known = _Prints.of(files), {(i, j): d for d, i, j in edges}
    members: dict[int, list[int]] = {i: [i] for i in range(len(files))}
    for _, i, j in edges:
        gi, gj = sorted((int(group[i]), int(group[j])))
        if gi == gj:
            continue
        if _diameter(prints, known, members[gi], members[gj]) <= NEAR_DUPLICATE_DIAMETER:
            members[gi] += members.pop(gj)
            group[members[gi]] = gi
    return group


# --- identical files -----------------------------------------------------------------------


def find_duplicates(rows: list[dict]) -> list[dict]:
    """Groups of identical files (same sha256): their paths, splits and labels."""
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_hash[row["sha256"]].append(row)
    return [
        {
            "sha256": digest,
            "paths": [r["path"] for r in group],
            "splits": sorted({r["split"] for r in group}, key=SPLIT_NAMES.index),
            "labels": sorted({r["label"] for r in group}),
        }
        for digest, group in by_hash.items()
        if len(group) > 1
    ]


def dedupe(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Keep one copy of each identical file: in train if any copy is there, else val, else test.

    Returns:
        The kept rows, and ``{"path", "split", "kept"}`` for every copy left out of the manifest.
    """
    keep: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (SPLIT_NAMES.index(r["split"]), r["path"])):
        keep.setdefault(row["sha256"], row)
    kept_ids = {id(r) for r in keep.values()}
    dropped = [
        {"path": r["path"], "split": r["split"], "kept": keep[r["sha256"]]["path"]}
        for r in rows
        if id(r) not in kept_ids
    ]
    return [r for r in rows if id(r) in kept_ids], dropped
