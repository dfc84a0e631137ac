"""The layout of one experiment's outputs, as docs/ARCHITECTURE.md and the README show it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carclf.paths import ExperimentPaths

from .conftest import tiny_config


def test_outputs_sit_beside_the_run_directory(tmp_path: Path) -> None:
    paths = ExperimentPaths.of(tiny_config(tmp_path / "runs" / "x" / "train", tmp_path / "m"))
    base = (tmp_path / "runs" / "x").resolve()
    assert paths.output_dir == base / "train" and paths.base == base
    assert paths.manifest == base / "manifest.parquet"
    assert (paths.tune, paths.bundle, paths.eval) == (base / "tune", base / "bundle", base / "eval")
    assert paths.baseline == base / "baseline"
    assert (paths.demo_data, paths.demo_overlay) == (base / "data", base / "demo_overlay.png")


def test_a_search_experiment_holds_trials_tune_state_and_the_winner(tmp_path: Path) -> None:
    paths = ExperimentPaths(tmp_path / "tune")
    assert paths.trials("scratch") == tmp_path / "tune" / "scratch"
    assert paths.tuner == tmp_path / "tune" / "tune"
    assert paths.tuner_study("scratch") == tmp_path / "tune" / "tune" / "scratch"
    assert paths.best_config == tmp_path / "tune" / "best_config.yaml"
    assert paths.best_run == tmp_path / "tune" / "best_run"


def test_of_resolves_the_config_and_the_constructor_keeps_what_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    cfg = tiny_config(Path("link") / "train", tmp_path / "m")
    assert ExperimentPaths.of(cfg).output_dir == (tmp_path / "real" / "train").resolve()
    assert ExperimentPaths(Path("stage") / "train").base == Path("stage")  # a relative staging
