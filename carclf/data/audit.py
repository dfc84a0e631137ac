"""Audit an image tree: scan, check every file, split, and write the manifest and a report.

Accepts a pre-split root (``train|val|test/<class>/…``) or a flat root (``<class>/…``) that is split
stratified and deterministically, each cluster of identical or near-duplicate files within one
split. Every file is read once: its sha256, its header (format and the
pixel limit) and a full decode through :func:`carclf.data.transforms.load_image`, the loader that
training and serving use, so a file that is kept is a file that loads. Files that cannot be used
are excluded with a reason; hidden files and folders are ignored; problems that make the data set
unusable (a class missing from a split, a class without a usable image, fewer than two classes)
are written to the report and then refused. Nothing in the user's tree is ever modified or deleted.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import sys
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from carclf.data.limits import AUDIT_FORMATS, AUDIT_MAX_PIXELS
from carclf.data.manifest import read_manifest, write_manifest
from carclf.data.transforms import load_image
from carclf.errors import UserInputError

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
# MPO is how Pillow names the JPEGs many cameras write (a JPEG with a preview image appended).
ALLOWED_FORMATS = AUDIT_FORMATS
MAX_PIXELS = AUDIT_MAX_PIXELS  # the default of ``max_pixels`` (carclf.data.limits says why)
# Hamming distance (of 64 bits) at or below which two dHashes count as a near-duplicate.
NEAR_DUPLICATE_BITS = 4
REPORT_LIMIT = 200  # longest list of pairs written into a report

# Exclusion kinds, each with a fixed meaning; the reason adds the detail.
EMPTY, NOT_IMAGE, FORMAT, BOMB, TRUNCATED, CORRUPT, UNREADABLE = (
    "empty",
    "not-image",
    "format",
    "bomb",
    "truncated",
    "corrupt",
    "unreadable",
)
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<", "HTML or XML"),
)


@dataclass
class Excluded:
    """A file left out of the manifest, and why."""

    path: str
    split: str
    label: str
    kind: str
    reason: str


@dataclass
class _Candidate:
    path: Path
    label: str
    split: str  # "" until a flat root is split


@dataclass
class _Layout:
    presplit: bool
    classes: dict[str, list[str]]  # split → class folders found there (flat: {"": [...]})
    files: list[_Candidate]
    excluded: list[Excluded]  # entries that are not regular files
    ignored: list[str]  # visible entries outside the expected layout


@dataclass
class AuditResult:
    """What an audit found: the usable rows, the label order and everything it left out."""

    rows: list[dict]
    labels: list[str]
    excluded: list[Excluded] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    deduplicated: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # ``{"split", "paths"}`` per near-duplicate cluster kept within one split; None where the audit
    # did not group them (a pre-split root, or grouping turned off).
    clusters: list[dict] | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (split, label), n in sorted(
            Counter((r["split"], r["label"]) for r in self.rows).items()
        ):
            out[split][label] = n
        return dict(out)


# --- one file ------------------------------------------------------------------------------


def _not_image_reason(data: bytes) -> str:
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            return f"not an image: {what}"
    head = data[:512]
    try:  # incremental: a character cut at byte 512 is not an error
        if b"\x00" not in head:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            return "not an image: text"
    except UnicodeDecodeError:
        pass
    return "not an image: unknown file type"


def _damage(exc: Exception) -> str:
    return TRUNCATED if "truncated" in str(exc).lower() else CORRUPT


def dhash(img: Image.Image) -> int:
    """A 64-bit difference hash: is each pixel of a 9x8 gray thumbnail darker than its right one."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def check_image(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[dict | None, tuple | None]:
    """Read, hash and fully decode one file.

    Returns:
        ``(facts, None)`` for a usable image, where facts are the manifest columns sha256, width,
        height (upright, after EXIF rotation), bytes and format, plus ``dhash``; or
        ``(None, (kind, reason))`` for a file that cannot be used.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, (UNREADABLE, f"unreadable: {exc.strerror or exc}")
    if not data:
        return None, (EMPTY, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format or "?", img.size
    except Image.DecompressionBombError as exc:
        return None, (BOMB, f"decompression bomb: {exc}")
    except Image.UnidentifiedImageError:
        return None, (NOT_IMAGE, _not_image_reason(data))
    except Exception as exc:  # a broken header can raise anything; the file is the problem
        return None, (_damage(exc), f"{_damage(exc)} header: {type(exc).__name__}: {exc}")
    if fmt not in ALLOWED_FORMATS:
        return None, (FORMAT, f"format {fmt} is not allowed ({', '.join(sorted(ALLOWED_FORMATS))})")
    if width * height > max_pixels:
        return None, (BOMB, f"decompression bomb: {width}x{height} pixels > limit {max_pixels}")
    try:
        img = load_image(data)  # the loader training and serving use: kept means loadable
    except Exception as exc:  # decoders raise OSError, SyntaxError, zlib.error, ValueError, …
        return None, (_damage(exc), f"{_damage(exc)} image data, fails at full decode: {exc}")
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": img.width,
        "height": img.height,
        "bytes": len(data),
        "format": fmt,
        "dhash": dhash(img),
    }, None


# --- the tree ------------------------------------------------------------------------------


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_class(class_dir: Path, label: str, split: str, layout: _Layout) -> None:
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))  # prune hidden folders
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _hidden(name):
                continue
            if path.is_file():
                layout.files.append(_Candidate(path, label, split))
            else:  # broken links, FIFOs, sockets: reading them could fail or block
                why = "broken link" if path.is_symlink() else "not a regular file"
                layout.excluded.append(Excluded(str(path), split, label, UNREADABLE, why))


def _scan_level(folder: Path, split: str, layout: _Layout) -> None:
    """Scan ``folder/<class>/…``; visible non-folders at this level are noted as ignored."""
    classes = []
    for entry in sorted(folder.iterdir()):
        if _hidden(entry.name):
            continue
        if entry.is_dir():
            classes.append(entry.name)
            _scan_class(entry, entry.name, split, layout)
        else:
            layout.ignored.append(str(entry))
    layout.classes[split] = classes


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders of a pre-split root; empty for a flat root.

    Recognised names, in any case: ``train``, ``val`` (or ``valid``, ``validation``), ``test``.
    """
    found: dict[str, list[Path]] = defaultdict(list)
    for entry in sorted(root.iterdir()):
        split = SPLIT_ALIASES.get(entry.name.lower())
        if split and entry.is_dir():
            found[split].append(entry)
    for split, entries in found.items():
        if len(entries) > 1:
            names = " and ".join(e.name for e in entries)
            raise UserInputError(f"{root}: {names} are both the {split!r} split; keep one")
    return {s: found[s][0] for s in SPLIT_NAMES if s in found}


def scan_tree(root: Path) -> _Layout:
    """Find every class folder and file of a pre-split or flat ImageFolder tree."""
    if not root.is_dir():
        raise UserInputError(f"data folder not found: {root}")
    splits = split_folders(root)
    layout = _Layout(presplit=bool(splits), classes={}, files=[], excluded=[], ignored=[])
    if not splits:
        _scan_level(root, "", layout)
        return layout
    for entry in sorted(root.iterdir()):
        if not _hidden(entry.name) and entry not in splits.values():
            layout.ignored.append(str(entry))  # a pre-split root holds only split folders
    for split, folder in splits.items():
        _scan_level(folder, split, layout)
    return layout


# --- splitting, duplicates, checks ----------------------------------------------------------


def _split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int] | None:
    """Train/val/test counts for ``n`` items: every split with a ratio > 0 gets at least one."""
    wanted = [int(r > 0) for r in ratios]
    if n < sum(wanted):
        return None
    n_val = max(round(n * ratios[1]), wanted[1])
    n_test = max(round(n * ratios[2]), wanted[2])
    while n - n_val - n_test < wanted[0]:  # rounding up val and test left train short
        if n_val > wanted[1] and n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def assign_splits(
    n: int, ratios: tuple[float, float, float], seed: int, label: str
) -> list[str] | None:
    """Splits for ``n`` items of one class in a fixed order, by a seeded shuffle; None if too few.

    NumPy's PCG64 seeded with ``(seed, crc32(label))`` gives the same answer on any machine, and
    each class its own shuffle.
    """
    counts = _split_counts(n, ratios)
    if counts is None:
        return None
    names = [s for s, k in zip(SPLIT_NAMES, counts, strict=True) for _ in range(k)]
    order = np.random.default_rng([seed, zlib.crc32(label.encode())]).permutation(n)
    out = [""] * n
    for rank, i in enumerate(order):
        out[i] = names[rank]
    return out


def _gap(sizes: np.ndarray, split: np.ndarray, target: np.ndarray) -> int:
    """How many images the splits are off their targets, summed; 0 when each holds its share."""
    counts = np.bincount(split, weights=sizes, minlength=len(SPLIT_NAMES)).astype(np.int64)
    return int(np.abs(counts - target).sum())


def _first_fit(
    sizes: np.ndarray, order: np.ndarray, target: np.ndarray, wanted: list[bool]
) -> np.ndarray:
    """Each group, in ``order``, into the first split with room for it, else the one with most room.

    Only splits with a target are used (rounding can give one to a split of ratio 0, as in
    :func:`assign_splits`), and the last groups go to splits of ratio > 0 that have none yet, so
    each of them gets at least one.
    """
    split = np.zeros(len(sizes), dtype=np.int64)
    room = target.copy()
    used = [False] * len(SPLIT_NAMES)
    usable = [s for s, w in enumerate(wanted) if w or target[s] > 0]
    for left, g in zip(range(len(order), 0, -1), order, strict=True):
        empty = [s for s in usable if wanted[s] and not used[s]]
        options = empty if left <= len(empty) else usable
        fits = [s for s in options if room[s] >= sizes[g]]
        s = fits[0] if fits else options[int(np.argmax(room[options]))]
        split[g], used[s] = s, True
        room[s] -= sizes[g]
    return split


def _changes(
    sizes: np.ndarray, split: np.ndarray, wanted: list[bool], usable: list[bool]
) -> Iterable[tuple]:
    """Single moves and pairwise swaps of groups: ``(from, to, images moved, [(group, split)])``.

    Groups of one size in one split are interchangeable here, so only the first of each is tried:
    at most 6·D moves and 3·D² swaps for D distinct sizes. Groups go only to ``usable`` splits,
    and a move never empties a split with a ratio > 0.
    """
    firsts = []
    for s in range(len(SPLIT_NAMES)):
        members = np.flatnonzero(split == s)
        kinds, first = np.unique(sizes[members], return_index=True)
        firsts.append(list(zip(kinds.tolist(), members[first].tolist(), strict=True)))
    for s, t in ((s, t) for s in range(3) for t in range(3) if s != t and usable[t]):
        if len(np.flatnonzero(split == s)) > 1 or not wanted[s]:
            yield from ((s, t, a, [(g, t)]) for a, g in firsts[s])
        if s < t:
            for (a, g), (b, h) in ((x, y) for x in firsts[s] for y in firsts[t] if x[0] != y[0]):
                yield s, t, a - b, [(g, t), (h, s)]


def _rebalance(
    sizes: np.ndarray, split: np.ndarray, target: np.ndarray, wanted: list[bool]
) -> None:
    """Move or swap groups while that brings the image counts nearer ``target``; in place.

    Each round takes the change that shrinks the total gap most (the first of equals, so the answer
    is fixed), and the gap is a whole number that only shrinks, so it ends.
    """
    usable = [w or n > 0 for w, n in zip(wanted, target.tolist(), strict=True)]
    while _gap(sizes, split, target):
        counts = np.bincount(split, weights=sizes, minlength=len(SPLIT_NAMES)).astype(np.int64)
        best, best_gain = None, 0
        for s, t, moved, change in _changes(sizes, split, wanted, usable):
            before = abs(counts[s] - target[s]) + abs(counts[t] - target[t])
            after = abs(counts[s] - moved - target[s]) + abs(counts[t] + moved - target[t])
            if before - after > best_gain:
                best, best_gain = change, before - after
        if best is None:
            return
        for g, s in best:
            split[g] = s


def assign_group_splits(
    sizes: Sequence[int], ratios: tuple[float, float, float], seed: int, label: str
) -> list[str] | None:
    """Splits for groups of ``sizes`` images (one class, a fixed order); None if too few groups.

    Each split gets as near its ratio of the class's images as whole groups allow: groups are taken
    in :func:`assign_splits`'s seeded order, each into the first split (train, val, test) with room
    for it, then moves and swaps between splits close what is left of the gap. If a gap remains,
    the same is tried with the largest groups first, and the nearer answer kept (the first if
    equal). With every size 1 the first pass fills each split exactly as :func:`assign_splits`
    does, so its answer is the same.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    wanted = [r > 0 for r in ratios]
    if len(sizes) < sum(wanted):
        return None
    target = np.array(_split_counts(int(sizes.sum()), ratios), dtype=np.int64)
    order = np.random.default_rng([seed, zlib.crc32(label.encode())]).permutation(len(sizes))
    best = None
    # The seeded order mixes large and small groups into every split; largest first packs better.
    for attempt in (order, order[np.argsort(-sizes[order], kind="stable")]):
        split = _first_fit(sizes, attempt, target, wanted)
        _rebalance(sizes, split, target, wanted)
        if best is None or _gap(sizes, split, target) < _gap(sizes, best, target):
            best = split
        if not _gap(sizes, best, target):
            break
    return [SPLIT_NAMES[s] for s in best]


def near_duplicate_groups(hashes: Sequence[int], max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """A group number per dHash: connected components of "differ in ``max_bits`` or less".

    Chains join (a~b and b~c put a and c together however far apart they are). Pairs are compared
    in blocks as in :func:`near_duplicates`, and each block's pairs are folded into the groups at
    once, so memory stays bounded however many pairs are close.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    groups = np.arange(n)
    step = max(1, min(1024, 4_000_000 // max(n, 1)))
    for start in range(0, n, step):
        rows_i = np.arange(start, min(start + step, n))[:, None]
        cols = np.arange(start, n)[None, :]  # only j >= start: each pair once
        close = (np.bitwise_count(hashes[rows_i] ^ hashes[cols]) <= max_bits) & (cols > rows_i)
        a, b = np.nonzero(close)
        ends_a, ends_b = groups[start + a], groups[start + b]
        joins = ends_a != ends_b  # pairs already in one group add nothing
        if joins.any():  # a graph on group numbers: at most n nodes, whatever the block
            ends = (ends_a[joins], ends_b[joins])
            graph = coo_matrix((np.ones(int(joins.sum()), dtype=np.int8), ends), shape=(n, n))
            groups = connected_components(graph, directed=False)[1][groups]
    return groups


def _class_groups(rows: list[dict], root: Path, near: bool) -> list[list[dict]]:
    """One class's rows grouped by sha256 (and, if ``near``, joined by near-duplicate dHash).

    Ordered by their smallest relative path, so the order does not depend on where the tree lies.
    """
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_hash[row["sha256"]].append(row)
    files = list(by_hash.values())
    if near:  # identical files have one dHash, so one per file is enough
        numbers = near_duplicate_groups([f[0]["dhash"] for f in files])
    else:
        numbers = np.arange(len(files))
    joined: dict[int, list[dict]] = defaultdict(list)
    for file_rows, number in zip(files, numbers.tolist(), strict=True):
        joined[number] += file_rows
    return sorted(
        joined.values(),
        key=lambda g: min(Path(r["path"]).relative_to(root).as_posix() for r in g),
    )


def _too_few(label: str, files: int, groups: int, ratios: tuple[float, float, float]) -> str:
    within = "" if files == groups else f" in {groups} near-duplicate group(s)"
    return (
        f"class {label!r} has {files} distinct usable image(s){within}, "
        f"too few to split with ratios {','.join(map(str, ratios))}"
    )


def stratified_split(
    rows: list[dict],
    root: Path,
    ratios: tuple[float, float, float],
    seed: int,
    group_near_duplicates: bool = True,
) -> tuple[list[str], list[list[str]]]:
    """Give each row of a flat root a split, per class; rows of a class too small keep ``""``.

    Identical files (same sha256) and, with ``group_near_duplicates``, near-duplicates (dHash
    within :data:`NEAR_DUPLICATE_BITS`, chains joined) of one class form a group that goes to one
    split whole (:func:`assign_group_splits`, by image counts), so a split cannot leak them. Off,
    each group of identical files counts as one item (:func:`assign_splits`), as before grouping.
    A near-duplicate across classes is a labelling question: it is reported, not grouped.

    Returns:
        The problems, and the paths of each group of two or more distinct files kept together.
    """
    problems, clusters = [], []
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_class[row["label"]].append(row)
    for label, class_rows in sorted(by_class.items()):
        groups = _class_groups(class_rows, root, group_near_duplicates)
        if group_near_duplicates:
            splits = assign_group_splits([len(g) for g in groups], ratios, seed, label)
        else:
            splits = assign_splits(len(groups), ratios, seed, label)
        if splits is None:
            files = len({r["sha256"] for r in class_rows})
            problems.append(_too_few(label, files, len(groups), ratios))
            continue
        for group, split in zip(groups, splits, strict=True):
            for row in group:
                row["split"] = split
            if len({r["sha256"] for r in group}) > 1:
                clusters.append(sorted(r["path"] for r in group))
    return problems, clusters


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


def near_duplicates(rows: list[dict], max_bits: int = NEAR_DUPLICATE_BITS) -> list[dict]:
    """Pairs of different files in different splits whose dHashes differ in ``max_bits`` or less.

    Compares every pair (n²/2 bit counts) in blocks of about four million, so memory stays small;
    20,000 images took 2 s on a 2-core machine.
    """
    n = len(rows)
    hashes = np.array([r["dhash"] for r in rows], dtype=np.uint64)
    splits = np.array([SPLIT_NAMES.index(r["split"]) for r in rows])
    _, files = np.unique([r["sha256"] for r in rows], return_inverse=True)
    step = max(1, min(1024, 4_000_000 // max(n, 1)))
    pairs = []
    for start in range(0, n, step):
        rows_i = np.arange(start, min(start + step, n))[:, None]
        cols = np.arange(start, n)[None, :]  # only j >= start: each pair once
        dist = np.bitwise_count(hashes[rows_i] ^ hashes[cols])
        close = (dist <= max_bits) & (cols > rows_i) & (splits[rows_i] != splits[cols])
        close &= files[rows_i] != files[cols]
        for a, b in zip(*np.nonzero(close), strict=True):
            i, j = start + a, start + b
            pairs.append({"paths": [rows[i]["path"], rows[j]["path"]], "bits": int(dist[a, b])})
    return sorted(pairs, key=lambda p: (p["bits"], p["paths"]))


def _excluded_summary(excluded: list[Excluded], split: str, label: str) -> str:
    kinds = Counter(e.kind for e in excluded if e.split == split and e.label == label)
    if not kinds:
        return "no files"
    return f"{sum(kinds.values())} file(s) excluded: " + ", ".join(
        f"{n} {k}" for k, n in sorted(kinds.items())
    )


def class_problems(layout: _Layout, result: AuditResult) -> list[str]:
    """Everything that makes the data set unusable, one line each, naming the class and split.

    For a flat root this runs before the split (every row's split is still ``""``).
    """
    problems = []
    if layout.presplit and "train" not in layout.classes:
        problems.append("split 'train' is missing (a pre-split root needs train/)")
    all_classes = sorted({c for classes in layout.classes.values() for c in classes})
    if len(all_classes) < 2:
        problems.append(f"found {len(all_classes)} class folder(s); at least 2 are needed")
    usable = Counter((r["split"], r["label"]) for r in result.rows)
    for split, classes in layout.classes.items():
        where = f"split {split!r}" if split else "the root"
        for label in all_classes:
            if label not in classes:
                problems.append(f"class {label!r} is missing from {where}")
            elif not usable[(split, label)]:
                detail = _excluded_summary(result.excluded, split, label)
                problems.append(f"class {label!r} has no usable image in {where} ({detail})")
    return problems


# --- the audit ------------------------------------------------------------------------------


def _check_all(
    files: list[_Candidate], max_pixels: int, workers: int | None
) -> list[tuple[dict | None, tuple | None]]:
    # Pillow releases the GIL while decoding, so threads read and decode files in parallel.
    with (
        warnings.catch_warnings(),
        ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as ex,
    ):
        # Images between Pillow's warning threshold and our limit are refused by our own check.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = ex.map(lambda c: check_image(c.path, max_pixels), files)
        return list(tqdm(results, total=len(files), desc="audit", disable=None, file=sys.stderr))


def _check_rows(layout: _Layout, result: AuditResult, max_pixels: int, workers: int | None) -> None:
    """Check every candidate file: a row for each usable one, an exclusion for each other."""
    for cand, (facts, why) in zip(
        layout.files, _check_all(layout.files, max_pixels, workers), strict=True
    ):
        if why:
            result.excluded.append(Excluded(str(cand.path), cand.split, cand.label, *why))
        else:
            result.rows.append(
                {"path": str(cand.path), "label": cand.label, "split": cand.split, **facts}
            )


def _kept_clusters(clusters: list[list[str]], rows: list[dict]) -> list[dict]:
    """Each cluster's split and the paths still in ``rows`` (--dedupe leaves copies out)."""
    split_of = {r["path"]: r["split"] for r in rows}
    kept = ([p for p in paths if p in split_of] for paths in clusters)
    return [{"split": split_of[paths[0]], "paths": paths} for paths in kept if paths]


def audit_tree(
    root: str | Path,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    dedupe_files: bool = False,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    group_near_duplicates: bool = True,
) -> AuditResult:
    """Scan and check every file under ``root``; unusable data sets come back with ``problems``.

    Args:
        root: A pre-split (``train|val|test/<class>/…``) or flat (``<class>/…``) image tree.
        ratios: Train/val/test fractions for a flat root.
        seed: Seed of a flat root's split.
        dedupe_files: Keep one copy of identical files (see :func:`dedupe`).
        max_pixels: Images with more pixels are excluded as decompression bombs.
        workers: Threads that read and decode files (default: the CPU count, at most 8).
        group_near_duplicates: In a flat root, keep near-duplicates of a class (dHash within
            :data:`NEAR_DUPLICATE_BITS`) in one split, as identical files always are.
    """
    root = Path(root).resolve()
    layout = scan_tree(root)
    if not layout.classes or not any(layout.classes.values()):
        raise UserInputError(f"{root}: no class folders found")
    if not layout.presplit and abs(sum(ratios) - 1.0) > 1e-6:
        raise UserInputError(f"--ratios must add up to 1, got {ratios}")
    result = AuditResult(rows=[], labels=[], excluded=list(layout.excluded), ignored=layout.ignored)
    _check_rows(layout, result, max_pixels, workers)
    clusters: list[list[str]] = []
    if not layout.presplit:
        result.problems += class_problems(layout, result)
        problems, clusters = stratified_split(
            result.rows, root, ratios, seed, group_near_duplicates
        )
        result.problems += problems
        result.rows = [r for r in result.rows if r["split"]]  # classes too small to split
    result.duplicates = find_duplicates(result.rows)
    if dedupe_files:
        result.rows, result.deduplicated = dedupe(result.rows)
    if layout.presplit:  # after --dedupe, which can empty a class in val or test
        result.problems += class_problems(layout, result)
    result.near_duplicates = near_duplicates(result.rows)
    if not layout.presplit and group_near_duplicates:
        result.clusters = _kept_clusters(clusters, result.rows)
    result.labels = sorted({c for classes in layout.classes.values() for c in classes})
    index = {name: i for i, name in enumerate(result.labels)}
    for row in result.rows:
        row["label_index"] = index[row["label"]]
    return result


# --- the report -----------------------------------------------------------------------------


def _distribution(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return dict(zip(("min", "p5", "median", "p95", "max"), map(float, q), strict=True))


def audit_report(result: AuditResult) -> dict:
    """The audit as a JSON-ready dict: counts, imbalance, exclusions, duplicates, sizes."""
    counts = result.counts()
    train = [n for n in counts.get("train", {}).values() if n]
    sizes = np.array([[r["width"], r["height"]] for r in result.rows]).reshape(-1, 2)
    short = sizes.min(axis=1)
    edges = [0, 64, 128, 256, 512, 1024, np.inf]
    hist, _ = np.histogram(short, bins=edges)
    cross = [d for d in result.duplicates if len(d["splits"]) > 1]
    return {
        "labels": result.labels,
        "images": len(result.rows),
        "counts": counts,
        "imbalance_ratio": max(train) / min(train) if train else None,
        "problems": result.problems,
        "excluded": [asdict(e) for e in sorted(result.excluded, key=lambda e: e.path)],
        "excluded_by_kind": dict(sorted(Counter(e.kind for e in result.excluded).items())),
        "ignored": result.ignored,
        "duplicates": result.duplicates,
        "cross_split_duplicates": cross,
        "label_conflicts": [d for d in result.duplicates if len(d["labels"]) > 1],
        "deduplicated": result.deduplicated,
        "near_duplicates": {
            "max_bits": NEAR_DUPLICATE_BITS,
            "pairs": len(result.near_duplicates),
            "listed": result.near_duplicates[:REPORT_LIMIT],
        },
        "near_duplicate_clusters": None
        if result.clusters is None
        else {
            "clusters": len(result.clusters),
            "images": sum(len(c["paths"]) for c in result.clusters),
            "listed": result.clusters[:REPORT_LIMIT],
        },
        "formats": dict(sorted(Counter(r["format"] for r in result.rows).items())),
        "image_size": None
        if not len(sizes)
        else {
            "width": _distribution(sizes[:, 0]),
            "height": _distribution(sizes[:, 1]),
            "short_side_histogram": {
                f"{int(lo)}-{'' if np.isinf(hi) else int(hi) - 1}": int(n)
                for lo, hi, n in zip(edges[:-1], edges[1:], hist, strict=True)
            },
        },
    }


def _paths(paths: Iterable[str]) -> str:
    return ", ".join(f"`{p}`" for p in paths)


def _counts_markdown(report: dict) -> list[str]:
    """The table of images per class and split, and the train imbalance ratio."""
    splits = [s for s in SPLIT_NAMES if s in report["counts"]]
    lines = ["", "| class | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for label in report["labels"]:
        cells = [str(report["counts"][s].get(label, 0)) for s in splits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["imbalance_ratio"] is not None:
        lines += [
            "",
            f"Imbalance ratio (largest / smallest class in train): {report['imbalance_ratio']:.2f}",
        ]
    return lines


def _duplicates_markdown(report: dict) -> list[str]:
    """Identical files across and within splits, label conflicts and what --dedupe left out."""
    cross = report["cross_split_duplicates"]
    lines = ["", f"## Identical files across splits: leakage ({len(cross)} groups)", ""]
    lines += [f"- {', '.join(d['splits'])}: {_paths(d['paths'])}" for d in cross] or ["None."]
    within = [d for d in report["duplicates"] if len(d["splits"]) == 1]
    lines += ["", f"## Identical files within a split ({len(within)} groups)", ""]
    lines += [f"- {d['splits'][0]}: {_paths(d['paths'])}" for d in within] or ["None."]
    if report["label_conflicts"]:
        lines += ["", "## Identical files with different labels", ""]
        lines += [
            f"- {', '.join(d['labels'])}: {_paths(d['paths'])}" for d in report["label_conflicts"]
        ]
    if report["deduplicated"]:
        lines += ["", f"## Left out by --dedupe ({len(report['deduplicated'])})", ""]
        lines += [f"- `{d['path']}` (copy of `{d['kept']}`)" for d in report["deduplicated"]]
    near = report["near_duplicates"]
    lines += [
        "",
        f"## Near-duplicates across splits ({near['pairs']} pairs, dHash ≤ "
        f"{near['max_bits']} bits)",
        "",
    ]
    lines += [f"- {p['bits']} bits: {_paths(p['paths'])}" for p in near["listed"]] or ["None."]
    return lines + _clusters_markdown(report)


def _clusters_markdown(report: dict) -> list[str]:
    """The near-duplicate clusters a flat root's split kept together; none if it did not group."""
    kept = report.get("near_duplicate_clusters")  # a report written before grouping has none
    if kept is None:
        return []
    lines = [
        "",
        f"## Near-duplicate clusters kept within one split ({kept['clusters']} clusters, "
        f"{kept['images']} images)",
        "",
    ]
    return lines + ([f"- {c['split']}: {_paths(c['paths'])}" for c in kept["listed"]] or ["None."])


def _sizes_markdown(report: dict) -> list[str]:
    """Width and height percentiles, the short-side histogram and the formats; none if no rows."""
    size = report["image_size"]
    if not size:
        return []
    lines = ["", "## Image sizes", "", "| | min | p5 | median | p95 | max |", "|---" * 6 + "|"]
    for axis in ("width", "height"):
        lines.append(f"| {axis} | " + " | ".join(f"{v:g}" for v in size[axis].values()) + " |")
    lines += [
        "",
        "Short side: " + ", ".join(f"{k}: {n}" for k, n in size["short_side_histogram"].items()),
    ]
    lines += ["", "Formats: " + ", ".join(f"{k} {n}" for k, n in report["formats"].items())]
    return lines


def report_markdown(report: dict) -> str:
    """A person's view of :func:`audit_report`."""
    lines = [
        "# Data audit",
        "",
        f"{report['images']} usable images, {len(report['labels'])} classes.",
    ]
    if report["problems"]:
        lines += ["", "## Refused: the data set cannot be used as it is", ""]
        lines += [f"- {p}" for p in report["problems"]]
    lines += _counts_markdown(report)
    lines += ["", f"## Excluded files ({len(report['excluded'])})", ""]
    lines += [f"- `{e['path']}` ({e['kind']}): {e['reason']}" for e in report["excluded"]] or [
        "None."
    ]
    lines += _duplicates_markdown(report)
    if report["ignored"]:
        lines += ["", "## Ignored (outside the expected layout)", ""]
        lines += [f"- `{p}`" for p in report["ignored"]]
    lines += _sizes_markdown(report)
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    """A few lines for a person at a terminal: sizes, exclusions, warnings."""
    per_split = ", ".join(
        f"{s} {sum(report['counts'][s].values())}" for s in SPLIT_NAMES if s in report["counts"]
    )
    lines = [f"{report['images']} images in {len(report['labels'])} classes ({per_split})"]
    if report["imbalance_ratio"]:
        lines[0] += f", imbalance {report['imbalance_ratio']:.2f}"
    if report["excluded"]:
        kinds = ", ".join(f"{n} {k}" for k, n in report["excluded_by_kind"].items())
        lines.append(f"excluded {len(report['excluded'])} file(s): {kinds}")
    if report["cross_split_duplicates"] and not report["deduplicated"]:
        n = len(report["cross_split_duplicates"])
        lines.append(f"warning: {n} group(s) of identical files across splits (--dedupe)")
    if report["deduplicated"]:
        lines.append(f"--dedupe left out {len(report['deduplicated'])} identical copies")
    kept = report.get("near_duplicate_clusters")  # a report written before grouping has none
    if kept and kept["clusters"]:
        lines.append(
            f"kept {kept['clusters']} near-duplicate cluster(s) ({kept['images']} images) "
            "within one split"
        )
    if report["near_duplicates"]["pairs"]:
        lines.append(f"warning: {report['near_duplicates']['pairs']} near-duplicate pair(s)")
    return lines


# --- writing --------------------------------------------------------------------------------


@dataclass
class AuditRun:
    """The outcome of :func:`run_audit`: the manifest, its report, and whether it was reused."""

    manifest: Path
    report: dict | None
    report_paths: tuple[Path, Path]
    reused: bool


def report_paths(manifest: Path) -> tuple[Path, Path]:
    """``<manifest stem>.audit.json`` and ``.audit.md`` beside the manifest."""
    stem = manifest.with_suffix("")
    return Path(f"{stem}.audit.json"), Path(f"{stem}.audit.md")


_REBUILD = "(`carclf data audit … --force` rebuilds it)"


def _reuse(manifest: Path, root: Path, settings: dict) -> None:
    """Refuse to reuse a manifest that was built from another tree or with other settings."""
    try:
        existing = read_manifest(manifest)
    except UserInputError as exc:
        raise UserInputError(f"{exc} {_REBUILD}") from None
    if existing.root and existing.root != str(root):
        raise UserInputError(f"{manifest}: was built from {existing.root}, not {root} {_REBUILD}")
    for key, value in settings.items():
        old = existing.settings.get(key, value)
        if old != value:
            raise UserInputError(f"{manifest}: was built with {key}={old}, not {value} {_REBUILD}")


def run_audit(
    root: str | Path,
    manifest: str | Path,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    force: bool = False,
    dedupe_files: bool = False,
    max_pixels: int = MAX_PIXELS,
    group_near_duplicates: bool = True,
) -> AuditRun:
    """Audit ``root``; write the manifest and ``<manifest stem>.audit.{json,md}`` beside it.

    An existing manifest is reused (after checking it was built from the same tree with the same
    settings) unless ``force`` is set. A data set with problems gets its report written, and then
    ``UserInputError`` naming the first problem; no manifest is written for it. The other options
    are :func:`audit_tree`'s.
    """
    manifest, root = Path(manifest), Path(root).resolve()
    paths = report_paths(manifest)
    settings = {"dedupe": dedupe_files, "max_pixels": max_pixels}
    if root.is_dir() and not split_folders(root):  # a flat root's split depends on them
        settings |= {
            "ratios": list(ratios),
            "seed": seed,
            "group_near_duplicates": group_near_duplicates,
        }
    if manifest.exists() and not force:
        _reuse(manifest, root, settings)
        report = json.loads(paths[0].read_text()) if paths[0].is_file() else None
        return AuditRun(manifest, report, paths, reused=True)
    result = audit_tree(
        root, ratios, seed, dedupe_files, max_pixels, group_near_duplicates=group_near_duplicates
    )
    report = audit_report(result)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(report_markdown(report))
    if result.problems:
        more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
        raise UserInputError(f"{root}: {result.problems[0]}{more}; see {paths[1]}")
    write_manifest(result.rows, result.labels, manifest, root=str(root), settings=settings)
    return AuditRun(manifest, report, paths, reused=False)


def write_audit(root: str | Path, manifest: str | Path, **options: Any) -> Path:
    """:func:`run_audit` with the same keyword options, returning only the manifest path."""
    return run_audit(root, manifest, **options).manifest
