"""MLflow tracking: the store, a training run's record, a search's parent and child runs, the
bundle's artefacts; read back with the MLflow client (no Ray here: see test_pipeline/test_tune)."""

from __future__ import annotations

from pathlib import Path

import pytest

from carclf import runs
from carclf.config import Config, validate_config
from carclf.tracking import (
    client,
    config_params,
    experiment_id,
    finish_run,
    log_bundle,
    log_rows,
    log_study,
    start_run,
    with_store,
)

from .conftest import tiny_config


def _cfg(tmp_path: Path, manifest: Path, **tracking: object) -> Config:
    raw = tiny_config(tmp_path / "exp" / "run", manifest).model_dump(mode="json")
    raw["tracking"] = {"mlflow": True, **tracking}
    return validate_config(raw)


def test_store_defaults_to_sqlite_in_the_experiment_directory(
    tmp_path: Path, toy_manifest: Path
) -> None:
    cfg = with_store(_cfg(tmp_path, toy_manifest), tmp_path / "exp")
    assert cfg.tracking.tracking_uri == f"sqlite:///{(tmp_path / 'exp' / 'mlflow.db').resolve()}"
    mine = _cfg(tmp_path, toy_manifest, tracking_uri="http://127.0.0.1:5000")
    assert with_store(mine, tmp_path).tracking.tracking_uri == "http://127.0.0.1:5000"
    off = tiny_config(tmp_path / "r", toy_manifest)
    assert with_store(off, tmp_path).tracking.tracking_uri is None


def test_config_becomes_flat_parameters(tmp_path: Path, toy_manifest: Path) -> None:
    params = config_params(_cfg(tmp_path, toy_manifest))
    assert params["train.lr"] == "0.003"
    assert params["model.kwargs.filters"] == "[8, 16]"
    assert params["model.name"] == "scratch_cnn"
    assert not any(k.startswith(("tracking", "tune")) for k in params)


def test_training_run_is_logged_and_a_resume_continues_it(
    tmp_path: Path, toy_manifest: Path
) -> None:
    cfg = with_store(_cfg(tmp_path, toy_manifest), tmp_path / "exp")
    run_dir = Path(cfg.output_dir)
    run_id = start_run(cfg, run_dir)
    mlflow = client(cfg)
    log_rows(mlflow, run_id, [{"epoch": 0, "val_acc": 0.5, "note": "x"}])
    finish_run(cfg, run_id, None)  # the first attempt died
    assert start_run(cfg, run_dir) == run_id
    assert (run_dir / runs.MLFLOW_RUN_FILE).is_file()
    log_rows(mlflow, run_id, [{"epoch": 1, "val_acc": 0.75, "val_loss": float("nan")}])
    finish_run(cfg, run_id, {"epoch": 1, "val_acc": 0.75})
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1"
    assert run.data.metrics["best_val_acc"] == 0.75
    assert [m.value for m in mlflow.get_metric_history(run_id, "val_acc")] == [0.5, 0.75]
    assert "val_loss" not in run.data.metrics  # NaN is not a metric


def _trial(name: str, best: float | None, collapsed: bool = False) -> dict:
    return {
        "study": "scratch",
        "trial": name,
        "param:train.lr": 0.1,
        "param:model.kwargs.filters": [8, 16],
        "best_val_acc": best,
        "epochs": 2,
        "stopped_early": collapsed,
        "state": "TERMINATED",
        "collapsed": collapsed,
        "collapse_reason": "validation accuracy 0.143 at chance (1/7)" if collapsed else "",
        "run_dir": "",
    }


def test_a_study_is_one_parent_run_with_a_child_per_trial(
    tmp_path: Path, toy_manifest: Path
) -> None:
    raw = _cfg(tmp_path, toy_manifest).model_dump(mode="json")
    raw["tune"] = {"studies": {"scratch": {"space": {}}}}
    cfg = with_store(validate_config(raw), tmp_path / "exp")
    history = [{"epoch": 0, "val_acc": 0.14, "timestamp": 1.7e9}, {"epoch": 1, "val_acc": 0.14}]
    trials = [(_trial("t1", 0.6), history[:1]), (_trial("t2", 0.14, True), history)]
    log_study(cfg, "scratch", trials)
    parent = log_study(cfg, "scratch", trials)  # a rerun replaces the study's runs
    mlflow = client(cfg)
    exp = experiment_id(mlflow, cfg)
    children = mlflow.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(mlflow.search_runs([exp])) == 3
    assert sorted(c.info.run_name for c in children) == ["t1", "t2"]
    collapsed = next(c for c in children if c.info.run_name == "t2")
    assert collapsed.data.tags["carclf.collapsed"] == "true"
    assert "chance" in collapsed.data.tags["carclf.collapse_reason"]
    assert collapsed.data.params["train.lr"] == "0.1"
    assert len(mlflow.get_metric_history(collapsed.info.run_id, "val_acc")) == 2
    assert mlflow.get_run(parent).data.metrics["best_val_acc"] == pytest.approx(0.6)


def test_bundle_and_report_are_artefacts_of_the_run(tmp_path: Path, toy_manifest: Path) -> None:
    cfg = with_store(_cfg(tmp_path, toy_manifest), tmp_path / "exp")
    run_id = start_run(cfg, Path(cfg.output_dir))
    bundle, report = tmp_path / "bundle", tmp_path / "eval"
    for d, name in ((bundle, "MODEL_CARD.md"), (report, "report.html")):
        d.mkdir()
        (d / name).write_text("x")
    log_bundle(cfg, run_id, bundle, report)
    mlflow = client(cfg)
    assert [a.path for a in mlflow.list_artifacts(run_id, "bundle")] == ["bundle/MODEL_CARD.md"]
    assert [a.path for a in mlflow.list_artifacts(run_id, "eval")] == ["eval/report.html"]
    # Beside the store, not under the working directory.
    assert (tmp_path / "exp" / "mlartifacts").is_dir() and not Path("mlruns").exists()
