"""The split solver on its own: groups of images into train, val and test by their sizes."""

from __future__ import annotations

import pytest

from carclf.data.splits import assign_group_splits, assign_splits


@pytest.mark.parametrize(
    "ratios", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.8, 0.2, 0.0), (0, 0.5, 0.5)]
)
def test_group_splits_of_single_images_are_assign_splits(ratios) -> None:
    for n in range(40):
        for seed, label in ((0, "cab"), (42, "limo"), (7, "Aston Martin DB9")):
            assert assign_group_splits([1] * n, ratios, seed, label) == assign_splits(
                n, ratios, seed, label
            )


def test_group_splits_count_images_not_groups() -> None:
    sizes = [6, 1, 1, 1, 1, 1, 4, 1, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 2]
    for seed in range(20):
        splits = assign_group_splits(sizes, (0.7, 0.15, 0.15), seed, "cab")
        images = {s: sum(n for n, t in zip(sizes, splits, strict=True) if t == s) for s in splits}
        assert images == {"train": 22, "val": 5, "test": 5}, seed  # 32 images: 22.4, 4.8, 4.8
    # Too few groups for three splits; big groups still leave each split one.
    assert assign_group_splits([10, 10], (0.7, 0.15, 0.15), 0, "x") is None
    assert sorted(assign_group_splits([10, 1, 1], (0.7, 0.15, 0.15), 0, "x")) == [
        "test",
        "train",
        "val",
    ]
    assert set(assign_group_splits([9, 8, 7, 6, 5], (0.6, 0.2, 0.2), 3, "x")) == {
        "train",
        "val",
        "test",
    }
