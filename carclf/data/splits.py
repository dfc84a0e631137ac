"""The split solver: which split each image of a flat root goes to.

A flat root (``<class>/…``) is split per class, stratified and deterministic: the same tree, ratios
and seed give the same split on any machine and wherever the tree lies. Identical files and (by
default) clusters of confirmed near-duplicates of a class (:mod:`carclf.data.duplicates`, which
says how clusters are bounded) form a group that goes to one split whole, so a split cannot leak
them; the solver fills each split as near its ratio of the class's images as whole groups
allow. :func:`stratified_split` is the audit's entry; :func:`assign_splits` (single items) and
:func:`assign_group_splits` (groups of sizes) are the solver itself.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from carclf.data.duplicates import NearPair, near_duplicate_groups, near_duplicate_pairs
from carclf.data.manifest import SPLIT_NAMES


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


def _class_groups(rows: list[dict], root: Path, pairs: list[NearPair] | None) -> list[list[dict]]:
    """One class's rows grouped by sha256 (and, given ``pairs``, by near-duplicate clusters).

    Ordered by their smallest relative path, so the order does not depend on where the tree lies.
    """
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_hash[row["sha256"]].append(row)
    if pairs is not None:  # identical files are one key, so one per file is enough
        numbers = near_duplicate_groups([f[0] for f in by_hash.values()], pairs)
    else:
        numbers = np.arange(len(by_hash))
    joined: dict[int, list[dict]] = defaultdict(list)
    for file_rows, number in zip(by_hash.values(), numbers.tolist(), strict=True):
        joined[number] += file_rows
    return sorted(
        joined.values(),
        key=lambda g: min(Path(r["path"]).relative_to(root).as_posix() for r in g),
    )


# What turns the grouping off, named where the grouping makes a class impossible to split (the
# on-the-fly audit of ``data.root`` has no such setting: a manifest audited without it does).
GROUPING_OFF = (
    "turn the grouping off: `carclf data audit ROOT --manifest M --no-group-near-duplicates` "
    "(then data.manifest=M), or run_audit(..., group_near_duplicates=False)"
)


def _too_few(label: str, files: int, groups: int, ratios: tuple[float, float, float]) -> str:
    within = "" if files == groups else f" in {groups} near-duplicate group(s)"
    off = "" if files == groups else f"; to split it file by file, {GROUPING_OFF}"
    return (
        f"class {label!r} has {files} distinct usable image(s){within}, "
        f"too few to split with ratios {','.join(map(str, ratios))}{off}"
    )


def stratified_split(
    rows: list[dict],
    root: Path,
    ratios: tuple[float, float, float],
    seed: int,
    group_near_duplicates: bool = True,
    pairs: list[NearPair] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Give each row of a flat root a split, per class; rows of a class too small keep ``""``.

    Identical files (same sha256) and, with ``group_near_duplicates``, clusters of confirmed
    near-duplicates (of bounded diameter, :func:`carclf.data.duplicates.near_duplicate_groups`) of
    one class form a group that goes to one split whole (:func:`assign_group_splits`, by image
    counts), so a split cannot leak them. Off, each group of identical files counts as one item
    (:func:`assign_splits`), as before grouping.
    A near-duplicate across classes is a possible label error: it is reported, not grouped.

    Args:
        rows: The rows of a flat root, with :func:`carclf.data.duplicates.fingerprint`'s keys.
        root: The root, for an order of groups that does not depend on where the tree lies.
        ratios: Train/val/test fractions of each class.
        seed: Seed of the split.
        group_near_duplicates: Keep each cluster of near-duplicates within one split.
        pairs: :func:`carclf.data.duplicates.near_duplicate_pairs` of ``rows``, when already found.

    Returns:
        The problems, and the paths of each group of two or more distinct files kept together.
    """
    if group_near_duplicates and pairs is None:
        pairs = near_duplicate_pairs(rows)
    problems, clusters = [], []
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_class[row["label"]].append(row)
    for label, class_rows in sorted(by_class.items()):
        groups = _class_groups(class_rows, root, pairs if group_near_duplicates else None)
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


def kept_clusters(clusters: list[list[str]], rows: list[dict]) -> list[dict]:
    """Each cluster's split and the paths still in ``rows`` (--dedupe leaves copies out)."""
    split_of = {r["path"]: r["split"] for r in rows}
    kept = ([p for p in paths if p in split_of] for paths in clusters)
    return [{"split": split_of[paths[0]], "paths": paths} for paths in kept if paths]
