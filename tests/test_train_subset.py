"""data.train_per_class: a seeded subset of the training split; validation and test stay whole."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from carclf.data.manifest import read_manifest
from carclf.runs import training_manifest

from .conftest import tiny_config


def test_train_per_class_limits_only_the_training_split(toy_manifest: Path, tmp_path: Path) -> None:
    full = read_manifest(toy_manifest)
    cfg = tiny_config(tmp_path, toy_manifest, data={"train_per_class": 5})
    subset = training_manifest(toy_manifest, cfg)
    per_class = Counter(label for _, label in subset.split("train"))
    assert set(per_class.values()) == {5} and len(per_class) == len(full.labels)
    assert subset.split("val") == full.split("val") and subset.split("test") == full.split("test")
    # The same rows on every worker and rerun; another seed draws others.
    assert training_manifest(toy_manifest, cfg).split("train") == subset.split("train")
    other = training_manifest(toy_manifest, cfg.model_copy(update={"seed": 1}))
    assert other.split("train") != subset.split("train")
    unlimited = training_manifest(toy_manifest, tiny_config(tmp_path, toy_manifest))
    assert unlimited.split("train") == full.split("train")
