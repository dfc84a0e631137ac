"""The report of a finished search, from crafted trial rows: no Ray needed."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from carclf.cli import main
from carclf.config import Config, validate_config
from carclf.plots import plot_param_importances, plot_search_trials
from carclf.runs import best_checkpoint
from carclf.search.report import export_optuna, param_importances
from carclf.search.tune import trial_rows

from .conftest import tiny_config

SPACE = {
    "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
    "model.kwargs.filters": {"type": "choice", "values": [[8, 16], [16, 32]]},
}


def _cfg(tmp_path: Path, manifest: Path) -> Config:
    raw = tiny_config(tmp_path / "exp", manifest).model_dump(mode="json")
    raw["tune"] = {"studies": {"scratch": {"space": SPACE}}}
    return validate_config(raw)


def _row(order: int, lr: float, filters: list[int], curve: list[float | None]) -> dict:
    values = [v for v in curve if v is not None]
    return {
        "order": order,
        "study": "scratch",
        "trial": f"_trial_{order}",
        "param:train.lr": lr,
        "param:model.kwargs.filters": filters,
        "best_val_acc": max(values) if values else None,
        "epochs": len(curve),
        "stopped_early": len(curve) < 3,
        "collapsed": lr > 0.05,
        "collapse_reason": "validation accuracy at chance" if lr > 0.05 else "",
        "curve": curve,
    }


ROWS = [
    _row(1, 0.09, [8, 16], [0.14, 0.14]),
    _row(2, 0.001, [16, 32], [0.3, 0.6, 0.8]),
    _row(3, 0.003, [8, 16], [0.4, 0.7, 0.9]),
    _row(4, 0.0002, [16, 32], [0.2, 0.3]),
    _row(5, 0.08, [16, 32], []),
]


def test_every_trial_lands_in_an_optuna_study_dashboard_can_open(
    tmp_path: Path, toy_manifest: Path
) -> None:
    cfg = _cfg(tmp_path, toy_manifest)
    db = tmp_path / "optuna.db"
    export_optuna(cfg, ROWS, db)
    export_optuna(cfg, ROWS, db)  # a rerun replaces the study
    study = optuna.load_study(study_name="scratch", storage=f"sqlite:///{db}")
    assert len(study.trials) == len(ROWS)
    assert study.best_trial.params == {"train.lr": 0.003, "model.kwargs.filters": "[8, 16]"}
    assert study.best_trial.intermediate_values == {0: 0.4, 1: 0.7, 2: 0.9}
    assert study.trials[0].user_attrs["collapsed"] is True
    assert study.trials[4].state == optuna.trial.TrialState.FAIL
    importances = param_importances(study)
    assert set(importances) == {"train.lr", "model.kwargs.filters"}
    plot = plot_param_importances({"scratch": importances}, tmp_path / "imp.png")
    assert plot.stat().st_size > 0


def test_no_importances_from_too_few_trials(tmp_path: Path, toy_manifest: Path) -> None:
    study = export_optuna(_cfg(tmp_path, toy_manifest), ROWS[:1], tmp_path / "o.db")["scratch"]
    assert param_importances(study) is None


def test_search_plot_marks_collapsed_trials(tmp_path: Path) -> None:
    rows = [*ROWS, {**ROWS[2], "study": "transfer", "collapsed": False}]
    assert plot_search_trials(rows, "best_val_acc", tmp_path / "t.png").stat().st_size > 0


def test_best_checkpoint_of_a_stopped_trial(tmp_path: Path) -> None:
    for name, acc in (("checkpoint_a", 0.5), ("checkpoint_b", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"metrics": {"val_acc": acc}}))
    path, metrics = best_checkpoint(tmp_path, "val_acc", "max")
    assert path.name == "checkpoint_b" and metrics["val_acc"] == 0.75
    assert best_checkpoint(tmp_path, "val_acc", "min")[0].name == "checkpoint_a"
    with pytest.raises(RuntimeError, match="no checkpoint"):
        best_checkpoint(tmp_path / "checkpoint_a", "val_acc", "max")


def test_unknown_parameter_gets_exit_code_2(
    tmp_path: Path, toy_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = tiny_config(tmp_path / "exp", toy_manifest).model_dump(mode="json")
    space = {"train.speed": {"type": "int", "low": 1, "high": 3}}
    raw["tune"] = {"studies": {"s": {"space": space}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tune.studies.s.space.train.speed" in err[0]


def test_comparison_names_the_searched_model_and_rounds_scores(
    tmp_path: Path, toy_manifest: Path
) -> None:
    from carclf.search.report import _study_model, comparison_markdown

    raw = tiny_config(tmp_path / "exp", toy_manifest).model_dump(mode="json")
    names = {"type": "choice", "values": ["scratch_cnn", "scratch_cnn_bn"]}
    raw["tune"] = {"studies": {"s": {"space": {"model.name": names}}}}
    cfg = validate_config(raw)
    assert _study_model(cfg, "s", {"param:model.name": "scratch_cnn_bn"}) == "scratch_cnn_bn"
    assert _study_model(cfg, "s", None) == "scratch_cnn | scratch_cnn_bn"
    row = {"study": "s", "best_val_acc": 0.8107142857, "best_trial": "_trial_f13c7d4a_1_lr=0.1"}
    assert comparison_markdown([row])[-1] == "| s | 0.811 | _trial_f13c7d4a |"


def test_trials_table_gives_each_trial_its_outcome_and_marks_pretrained_studies(
    tmp_path: Path, toy_manifest: Path
) -> None:
    from carclf.search.report import trials_table

    raw = tiny_config(tmp_path / "exp", toy_manifest).model_dump(mode="json")
    names = {"type": "choice", "values": ["scratch_cnn", "scratch_cnn_bn"]}
    lr = {"type": "loguniform", "low": 1e-4, "high": 1e-2}
    transfer = {"model.name": "resnet18", "model.pretrained": True}
    raw["tune"] = {
        "studies": {
            "scratch": {"space": {"model.name": names}},
            "transfer": {"overrides": transfer, "space": {"train.lr": lr}},
        }
    }
    cfg = validate_config(raw)
    base = {"best_val_acc": 0.5, "epochs": 3, "collapsed": False, "stopped_early": False}
    rows = [
        {**base, "study": "scratch", "trial": "a", "param:model.name": "scratch_cnn",
         "collapsed": True, "collapse_reason": "validation accuracy 0.143 at chance (1/7)"},
        {**base, "study": "scratch", "trial": "b", "param:model.name": "scratch_cnn_bn",
         "stopped_early": True},
        {**base, "study": "transfer", "trial": "c", "param:train.lr": 1e-3},
    ]  # fmt: skip
    table = trials_table(rows, cfg)
    assert [t["outcome"] for t in table] == [
        "collapsed: validation accuracy 0.143 at chance (1/7)",
        "stopped early (ASHA)",
        "ran every epoch",
    ]
    assert [t["model"] for t in table] == ["scratch_cnn", "scratch_cnn_bn", "resnet18 (pretrained)"]


class _Result:
    """What ``trial_rows`` reads of a Tune result: its per-epoch metrics, no error."""

    def __init__(self, accs: list[float]) -> None:
        rows = [
            {"epoch": n, "val_acc": a, "val_loss": 1.9 if a < 0.2 else 1.0, "train_loss": 1.9}
            for n, a in enumerate(accs)
        ]
        self.metrics_dataframe = pd.DataFrame(rows)
        self.metrics, self.config, self.error, self.path = {}, {}, None, None


def test_a_trial_that_trained_on_past_collapse_symptoms_and_recovered_is_not_collapsed(
    tmp_path: Path, toy_manifest: Path
) -> None:
    cfg = _cfg(tmp_path, toy_manifest)
    chance = [0.14, 0.14, 0.14, 0.14]  # 7 classes: at chance from epoch 3 (min_epochs) on
    grid = [_Result(chance), _Result([*chance, 0.5, 0.7]), _Result([0.3, 0.5, 0.6, 0.7])]
    rows = trial_rows("scratch", grid, cfg, num_classes=7)
    assert [r["collapsed"] for r in rows] == [True, False, False]
    assert "chance" in rows[0]["collapse_reason"] and rows[1]["collapse_reason"] == ""


def test_the_linear_probe_is_row_zero_and_every_gain_is_over_it(
    tmp_path: Path, toy_manifest: Path
) -> None:
    import torch

    from carclf.config import ModelConfig
    from carclf.models import create_model
    from carclf.search.report import comparison_markdown, probe_row, trials_table, with_gains

    weights = tmp_path / "weights.pth"
    torch.save(create_model(ModelConfig(name="test_resnet"), 3).state_dict(), weights)
    raw = tiny_config(tmp_path / "exp", toy_manifest).model_dump(mode="json")
    lr = {"type": "loguniform", "low": 1e-4, "high": 1e-2}
    transfer = {
        "model.name": "test_resnet",
        "model.pretrained": True,
        "model.pretrained_file": str(weights),
        "model.kwargs": {},
    }
    raw["tune"] = {
        "studies": {
            "scratch": {"space": {"train.lr": lr}},
            "transfer": {"overrides": transfer, "space": {"train.lr": lr}},
        }
    }
    cfg = validate_config(raw)
    probe = probe_row(cfg, tmp_path / "exp")
    assert probe["study"] == "linear probe" and "transfer's weights" in probe["model"]
    assert (tmp_path / "exp" / "probe" / "baseline.json").is_file()
    assert 0.0 <= probe["test_acc"] <= 1.0 and probe["best_val_acc"] is not None
    table = with_gains([{"study": "transfer", "test_acc": probe["test_acc"] + 0.1}], probe)
    assert [r["study"] for r in table] == ["linear probe", "transfer"]
    assert table[1]["test_gain_over_probe"] == pytest.approx(10.0)
    assert "+10.0" in comparison_markdown(table)[-1]
    row = {"study": "transfer", "trial": "c", "param:train.lr": 1e-3, "epochs": 3,
           "best_val_acc": probe["best_val_acc"] + 0.05, "collapsed": False,
           "stopped_early": False}  # fmt: skip
    assert trials_table([row], cfg, probe)[0]["gain_over_probe"] == pytest.approx(5.0)
    raw["tune"]["probe"] = False
    assert probe_row(validate_config(raw), tmp_path / "off") is None
