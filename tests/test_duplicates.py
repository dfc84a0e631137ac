"""Near-duplicate search and grouping, held to a brute-force comparison of every pair."""

from __future__ import annotations

import numpy as np
from PIL import Image

from carclf.data import duplicates
from carclf.data.duplicates import (
    CHROMA_SIDE,
    NEAR_DUPLICATE_BITS,
    NEAR_DUPLICATE_DIAMETER,
    NEAR_DUPLICATE_DISTANCE,
    THUMB_SIDE,
    image_distance,
    near_duplicate_groups,
    near_duplicate_pairs,
    near_duplicates,
)

_GRAY_CHROMA = bytes([128]) * (2 * CHROMA_SIDE * CHROMA_SIDE)


def _flips(rng: np.random.Generator, most: int) -> int:
    return sum(1 << int(b) for b in set(rng.integers(0, 64, rng.integers(0, most + 1)).tolist()))


def _rows(n: int = 700) -> list[dict]:
    """Noisy copies of 35 smooth patterns, their dHashes a few random bits off the pattern's.

    The patterns' own dHashes are a few bits apart in fives, and the noise goes from none to
    more than a near-duplicate allows: many candidates are confirmed, many are not.
    """
    rng = np.random.default_rng(0)
    patterns = []
    for _ in range(35):
        cells = rng.integers(40, 216, (4, 4), dtype=np.uint8)
        size = (THUMB_SIDE, THUMB_SIDE)
        patterns.append(np.asarray(Image.fromarray(cells).resize(size, Image.Resampling.BILINEAR)))
    kinds = rng.integers(0, 2**63, 5, dtype=np.uint64)
    hashes = [int(kinds[k % 5]) ^ _flips(rng, 4) for k in range(35)]
    rows = []
    for i in range(n):
        noise = rng.normal(0, rng.uniform(0, 30), (THUMB_SIDE, THUMB_SIDE))
        thumb = np.clip(patterns[i % 35] + noise, 0, 255).astype(np.uint8)
        plain = int(hashes[i % 35]) ^ _flips(rng, 14)
        rows.append(
            {
                "path": f"{i:04d}",
                "split": ("train", "val", "test")[i % 3],
                "label": "ab"[i % 2],
                "sha256": str(i),
                "dhash": plain,
                "dhash_flat": plain ^ _flips(rng, 6),
                "thumb": thumb.tobytes(),
                "chroma": _GRAY_CHROMA,
            }
        )
    return rows


def _popcount(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def test_near_duplicate_pairs_match_brute_force(monkeypatch) -> None:
    # Small blocks, so that the search runs in many of each kind.
    monkeypatch.setattr(duplicates, "_PAIR_BLOCK", 20_000)
    monkeypatch.setattr(duplicates, "_CONFIRM_BLOCK", 500)
    monkeypatch.setattr(duplicates, "_ALIGN_BLOCK", 32)
    rows = _rows()
    found = {(p.a, p.b): (p.bits, p.distance) for p in near_duplicate_pairs(rows)}
    candidates = [
        (i, j, min(_popcount(a[k], b[k]) for k in ("dhash", "dhash_flat")))
        for i, a in enumerate(rows)
        for j, b in enumerate(rows[i + 1 :], i + 1)
    ]
    candidates = [c for c in candidates if c[2] <= NEAR_DUPLICATE_BITS]
    dist = image_distance([rows[i] for i, _, _ in candidates], [rows[j] for _, j, _ in candidates])
    expected = {
        (rows[i]["sha256"], rows[j]["sha256"]): (bits, float(d))
        for (i, j, bits), d in zip(candidates, dist, strict=True)
        if d <= NEAR_DUPLICATE_DISTANCE
    }
    assert len(expected) > 100 and len(candidates) > 2 * len(expected)  # both steps matter
    assert found == expected


def test_the_distance_is_symmetric_and_zero_for_the_same_image() -> None:
    rows = _rows(60)
    forth = image_distance(rows[:30], rows[30:])
    assert np.array_equal(forth, image_distance(rows[30:], rows[:30]))
    assert not image_distance(rows[:5], rows[:5]).any()


def test_near_duplicates_across_splits_match_brute_force() -> None:
    rows = _rows(300)
    pairs = near_duplicate_pairs(rows)
    listed = near_duplicates(rows, pairs)
    by_sha = {r["sha256"]: r for r in rows}
    expected = sorted(
        sorted([by_sha[p.a]["path"], by_sha[p.b]["path"]])
        for p in pairs
        if by_sha[p.a]["split"] != by_sha[p.b]["split"]
    )
    assert expected and sorted(p["paths"] for p in listed) == expected
    assert [p["distance"] for p in listed] == sorted(p["distance"] for p in listed)


def _flat(level: int, key: str) -> dict:
    """A flat image of one gray level: every flat image has the same dHash."""
    thumb = bytes([level]) * (THUMB_SIDE * THUMB_SIDE)
    return {"sha256": key, "dhash": 0, "dhash_flat": 0, "thumb": thumb, "chroma": _GRAY_CHROMA}


def test_a_chain_is_cut_where_its_diameter_would_pass_the_bound() -> None:
    """Flat grays 6 levels apart: a brightness shift of d levels is 0.25·d/255 apart."""
    rows = [_flat(100 + 6 * k, f"k{k:02d}") for k in range(12)]
    pairs = near_duplicate_pairs(rows)
    assert {(p.a, p.b) for p in pairs} == {
        (f"k{a:02d}", f"k{b:02d}") for a in range(12) for b in range(a + 1, min(a + 4, 12))
    }  # 18 levels (0.0176) is near, 24 (0.0235) is not
    groups = near_duplicate_groups(rows, pairs).tolist()
    assert groups == [0] * 7 + [7] * 5  # 36 levels (0.0353) fit the diameter, 42 do not


def test_groups_are_within_the_diameter_and_could_not_be_merged() -> None:
    rows = _rows(350)
    pairs = near_duplicate_pairs(rows)
    groups = near_duplicate_groups(rows, pairs)
    members = {g: np.flatnonzero(groups == g) for g in set(groups.tolist())}
    assert any(len(m) > 2 for m in members.values())

    def widest(first, second) -> float:
        cross = [(a, b) for a in first for b in second]
        return float(image_distance([rows[a] for a, _ in cross], [rows[b] for _, b in cross]).max())

    for group in members.values():
        assert widest(group, group) <= NEAR_DUPLICATE_DIAMETER
    index = {r["sha256"]: i for i, r in enumerate(rows)}
    for pair in pairs:  # a confirmed pair left apart: its two groups together would be too wide
        ga, gb = groups[index[pair.a]], groups[index[pair.b]]
        if ga != gb:
            assert widest(members[ga], members[gb]) > NEAR_DUPLICATE_DIAMETER
