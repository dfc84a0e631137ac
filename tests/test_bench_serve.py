"""The serving benchmark's arithmetic (bench/serve_bench.py): rounds side by side."""

from __future__ import annotations

import pytest

from bench.serve_bench import side_by_side


def test_the_ratio_is_the_median_round_and_each_level_its_median_round() -> None:
    def rnd(local: float, at4: float, at8: float) -> dict:
        levels = [{"clients": 4, "images_per_s": at4}, {"clients": 8, "images_per_s": at8}]
        return {"in_process": {"images_per_s": local}, "http_levels": levels}

    rounds = [rnd(50, 40, 45), rnd(40, 44, 30), rnd(60, 42, 57)]
    got = side_by_side(rounds)
    assert got["http_over_in_process_rounds"] == pytest.approx([0.9, 0.75, 0.95])
    assert got["http_over_in_process"] == pytest.approx(0.9)  # the median round's, not a mean
    assert got["in_process"] == {"images_per_s": 50}
    assert [lv["images_per_s"] for lv in got["http_levels"]] == [42, 45]
    assert got["http"] == {"clients": 8, "images_per_s": 45}
