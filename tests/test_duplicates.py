"""Near-duplicate search and grouping, held to a brute-force comparison of every pair."""

from __future__ import annotations

import numpy as np

from carclf.data.duplicates import near_duplicate_groups, near_duplicates


def test_near_duplicate_groups_join_chains_like_brute_force() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, 30, dtype=np.uint64)
    hashes = [
        int(base[i % 30]) ^ sum(1 << int(b) for b in set(rng.integers(0, 64, rng.integers(0, 5))))
        for i in range(3000)  # several blocks
    ]
    hashes += [0b0, 0b1111, 0b11111111, 0b111111111111]  # a chain: each 4 bits from the next
    groups = near_duplicate_groups(hashes)
    parent = list(range(len(hashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    h = np.array(hashes, dtype=np.uint64)
    for i in range(len(hashes)):
        for j in np.flatnonzero(np.bitwise_count(h[i] ^ h[i + 1 :]) <= 4) + i + 1:
            parent[find(i)] = find(int(j))
    roots = np.array([find(i) for i in range(len(hashes))])
    assert (groups[:, None] == groups[None, :]).sum() == (roots[:, None] == roots[None, :]).sum()
    assert all(len({roots[i] for i in np.flatnonzero(groups == g)}) == 1 for g in set(groups))
    assert len(set(groups[-4:].tolist())) == 1


def test_near_duplicate_search_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    rows = []
    for i in range(3000):  # many rows: the search runs in several blocks
        flips = rng.integers(0, 64, rng.integers(0, 7))
        value = int(base[i % 40]) ^ sum(1 << int(b) for b in set(flips.tolist()))
        rows.append(
            {
                "path": f"{i}",
                "split": ("train", "val", "test")[i % 3],
                "sha256": str(i % 2000),
                "dhash": value,
            }
        )
    found = {tuple(p["paths"]) for p in near_duplicates(rows)}
    sample = range(0, 3000, 7)
    expected = {
        (rows[i]["path"], rows[j]["path"])
        for i in sample
        for j in range(i + 1, 3000)
        if rows[i]["split"] != rows[j]["split"]
        and rows[i]["sha256"] != rows[j]["sha256"]
        and bin(rows[i]["dhash"] ^ rows[j]["dhash"]).count("1") <= 4
    }
    assert expected and {p for p in found if int(p[0]) % 7 == 0} == expected
