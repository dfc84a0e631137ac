"""Identical files and near-duplicates: finding them, reporting them, keeping one copy.

Identical means the same sha256. A near-duplicate is a different file whose 64-bit difference hash
(:func:`dhash`, computed once per file by the audit's check) differs in at most
:data:`NEAR_DUPLICATE_BITS` bits: a re-encoded, resized or slightly edited copy. The audit reports
identical files across and within splits (:func:`find_duplicates`), keeps one copy of each under
``--dedupe`` (:func:`dedupe`) and reports near-duplicate pairs across splits
(:func:`near_duplicates`); a flat root's split keeps each cluster of near-duplicates within one
split (:func:`near_duplicate_groups`, used by :mod:`carclf.data.splits`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from carclf.data.manifest import SPLIT_NAMES

# Hamming distance (of 64 bits) at or below which two dHashes count as a near-duplicate.
NEAR_DUPLICATE_BITS = 4


def dhash(img: Image.Image) -> int:
    """A 64-bit difference hash: is each pixel of a 9x8 gray thumbnail darker than its right one."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


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

    Compares every pair (n²/2 bit counts) in blocks of about four million, so memory stays small
    however many rows there are.
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
