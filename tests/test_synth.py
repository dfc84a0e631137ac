import hashlib
from pathlib import Path

import numpy as np

from carclf.data.synth import BODY_TYPES, PROFILES, draw_car, write_toy_dataset


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_toy_dataset(tmp_path / "a", per_class=(2, 1, 1), seed=3, size=48)
    b = write_toy_dataset(tmp_path / "b", per_class=(2, 1, 1), seed=3, size=48)
    c = write_toy_dataset(tmp_path / "c", per_class=(2, 1, 1), seed=4, size=48)
    assert _digest(a) == _digest(b) != _digest(c)


def test_imagefolder_layout(tmp_path: Path) -> None:
    root = write_toy_dataset(tmp_path, per_class=(3, 2, 1), size=32)
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(BODY_TYPES)
        assert all(len(list((root / split / c).glob("*.jpg"))) == n for c in BODY_TYPES)


def test_body_types_differ_in_what_tells_them_apart() -> None:
    def profile(body: str):
        return PROFILES[body](lambda scale: 0.0)

    def roof(body: str) -> float:
        return max(y for _, y in profile(body)[0])

    def roof_at(body: str, x: float) -> float:  # outline height near the rear
        return max(y for px, y in profile(body)[0] if px >= x)

    assert roof("van") > roof("suv") > roof("sedan") > roof("coupe")
    assert roof_at("pickup", 0.6) < roof_at("suv", 0.6)  # open bed behind the cab
    assert roof_at("hatchback", 0.9) > roof_at("sedan", 0.9)  # two volumes against three
    assert profile("convertible")[1] == []  # no roof, no side windows
    assert profile("van")[5] > profile("hatchback")[5]  # length


def test_draw_is_deterministic() -> None:
    a = np.asarray(draw_car("sedan", np.random.default_rng(1)))
    b = np.asarray(draw_car("sedan", np.random.default_rng(1)))
    assert a.shape == (128, 128, 3) and (a == b).all()
