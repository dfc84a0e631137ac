"""Search spaces are checked before any trial; a tiny two-study search runs on real Ray Tune."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from carclf.cli import main
from carclf.config import load_config, validate_config
from carclf.errors import UserInputError
from carclf.search.space import check_studies
from carclf.search.tune import fit_concurrency, run_tune

from .conftest import tiny_config

ABLATION = Path(__file__).parents[1] / "jobs" / "configs" / "ablation-demo.yaml"


def _with_tune(tmp_path: Path, manifest: Path, studies: dict, **tune: object):
    raw = tiny_config(tmp_path / "exp", manifest).model_dump(mode="json")
    raw["tune"] = {"studies": studies, **tune}
    return validate_config(raw)


@pytest.mark.parametrize("name", ["ablation-demo", "ablation-photos", "finetune-search"])
def test_search_configs_are_valid_and_put_the_probe_first(name: str) -> None:
    from carclf.search.report import probe_config

    cfg = load_config(ABLATION.parent / f"{name}.yaml")
    check_studies(cfg)
    assert fit_concurrency(cfg, cluster_cpus=2.0) == 2  # two trials at once on 2 cores
    study, base = probe_config(cfg)
    assert base.model.name == "efficientnet_lite0" and base.model.pretrained
    assert cfg.tune.probe and study in cfg.tune.studies


def test_the_photo_searches_search_the_fine_tuning_recipe_and_start_from_it() -> None:
    recipe = load_config(ABLATION.parent / "finetune-cpu.yaml")
    search = load_config(ABLATION.parent / "finetune-search.yaml")
    spec = search.tune.studies["finetune"]
    assert len(spec.space) >= 8 and search.tune.num_samples >= 8
    for key, value in spec.start[0].items():  # the first trial is the hand recipe
        section, _, field = key.partition(".")
        assert getattr(getattr(recipe, section), field) == value, key
    for key in ("model", "train", "data"):
        fixed = {k: v for k, v in getattr(search, key).model_dump().items()}
        mine = getattr(recipe, key).model_dump()
        differ = {k for k in fixed if fixed[k] != mine[k] and f"{key}.{k}" not in spec.space}
        assert differ <= {"root", "early_stopping_patience"}, (key, differ)


def test_unknown_parameter_is_refused(tmp_path: Path, toy_manifest: Path) -> None:
    cfg = _with_tune(
        tmp_path,
        toy_manifest,
        {"s": {"space": {"train.speed": {"type": "uniform", "low": 0, "high": 1}}}},
    )
    with pytest.raises(UserInputError, match=r"tune\.studies\.s\.space\.train\.speed"):
        check_studies(cfg)


def test_ablation_demo_runs_two_trials_at_once_on_two_cores() -> None:
    assert fit_concurrency(load_config(ABLATION), cluster_cpus=2.0) == 2


def test_concurrency_is_capped_to_what_the_cluster_holds(
    tmp_path: Path, toy_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    space = {"train.lr": {"type": "loguniform", "low": 0.001, "high": 0.1}}
    cfg = _with_tune(tmp_path, toy_manifest, {"s": {"space": space}}, max_concurrent=4)
    per_trial = cfg.tune.trial_cpus + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    assert fit_concurrency(cfg, cluster_cpus=2 * per_trial) == 2
    assert "running 2 at a time" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="one trial needs"):
        fit_concurrency(cfg, cluster_cpus=per_trial / 2)


@pytest.mark.parametrize(
    "param",
    [
        {"type": "uniform", "low": 1, "high": 1},
        {"type": "choice", "values": []},
        {"type": "loguniform", "low": 0, "high": 1},
    ],
)
def test_empty_range_is_refused_with_exit_code_2(
    tmp_path: Path, toy_manifest: Path, param: dict, capsys: pytest.CaptureFixture
) -> None:
    raw = tiny_config(tmp_path / "exp", toy_manifest).model_dump(mode="json")
    raw["tune"] = {"studies": {"s": {"space": {"train.lr": param}}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["tune", "--config", str(path)]) == 2
    assert "tune.studies.s.space.train.lr" in capsys.readouterr().err


@pytest.mark.integration
def test_two_studies_with_a_collapsing_scratch_cnn(
    ray_session, tmp_path: Path, toy_manifest: Path
) -> None:
    studies = {
        "scratch": {
            # SGD at lr 5 blows a plain CNN up: the collapse the search must catch and stop.
            "overrides": {"model.name": "scratch_cnn", "train.lr": 5.0, "train.optimizer": "sgd"},
            "space": {"model.kwargs.filters": {"type": "choice", "values": [[8, 16], [8, 8]]}},
        },
        "transfer": {
            # Two workers: this study's trials go through a TorchTrainer, the scratch study's
            # one-worker trials train inside their Tune trials (carclf/session.py).
            "overrides": {"model.name": "scratch_cnn_bn", "scaling.num_workers": 2},
            "space": {"train.lr": {"type": "loguniform", "low": 0.003, "high": 0.01}},
        },
    }
    rule = {"min_epochs": 2, "window": 2, "chance_margin": 0.0, "loss_margin": 0.01}
    cfg = _with_tune(
        tmp_path,
        toy_manifest,
        studies,
        num_samples=1,  # one trial per study: the time budget (restore has its own test)
        searcher="random",
        grace_period=3,
        collapse=rule,
    )
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"epochs": 4}),
            "tracking": cfg.tracking.model_copy(update={"mlflow": True}),
        }
    )
    out = run_tune(cfg)
    with (out / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    scratch = [r for r in rows if r["study"] == "scratch"]
    assert all(r["collapsed"] == "True" and r["stopped_early"] == "True" for r in scratch), rows
    assert "| scratch | scratch_cnn | 1 | 1 |" in (out / "comparison.md").read_text()
    _mlflow_has_a_parent_per_study_and_a_child_per_trial(out)
    assert all(float(r["startup_s"]) >= 0 and float(r["first_report_s"]) > 0 for r in rows)
    # Whether the tiny transfer runs leave chance in 4 epochs is up to the data; when one does,
    # it is the winner, and best_config.yaml is a plain train config.
    healthy = [r for r in rows if r["collapsed"] == "False"]
    assert all(r["study"] == "transfer" for r in healthy)
    if healthy:
        best = load_config(out / "best_config.yaml")
        assert best.tune is None and best.output_dir.endswith("best_run")
        assert best.model.name == "scratch_cnn_bn"
    else:
        assert not (out / "best_config.yaml").exists()


def _mlflow_has_a_parent_per_study_and_a_child_per_trial(out: Path) -> None:
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("body_type").experiment_id
    for study in ("scratch", "transfer"):
        parents = mlflow.search_runs([exp], f"tags.`carclf.study` = '{study}' and "
                                     "attributes.run_name = '" + study + "'")  # fmt: skip
        assert len(parents) == 1
        children = mlflow.search_runs(
            [exp], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
        )
        assert len(children) == 1
        assert mlflow.get_metric_history(children[0].info.run_id, "val_acc")
    # The scratch trial collapses by design (the transfer one may too, on this tiny set).
    scratch = mlflow.search_runs(
        [exp], "tags.`carclf.study` = 'scratch' and tags.`carclf.collapsed` = 'true'"
    )
    assert len(scratch) == 1 and scratch[0].data.tags["carclf.collapse_reason"]


def _start(tmp_path: Path, toy_manifest: Path, *points: dict, num_samples: int = 2):
    space = {
        "train.lr": {"type": "loguniform", "low": 0.001, "high": 0.1},
        "model.kwargs.filters": {"type": "choice", "values": [[8, 16], [16, 32]]},
    }
    return _with_tune(
        tmp_path,
        toy_manifest,
        {"s": {"overrides": {"model.name": "scratch_cnn"}, "space": space, "start": list(points)}},
        num_samples=num_samples,
    )


def test_start_point_travels_to_the_searcher_encoded(tmp_path: Path, toy_manifest: Path) -> None:
    from carclf.search.space import decode_params, encode_params

    point = {"train.lr": 0.003, "model.kwargs.filters": [16, 32]}
    study = _start(tmp_path, toy_manifest, point).tune.studies["s"]
    assert encode_params(study, point) == {"train.lr": 0.003, "model.kwargs.filters": 1}
    assert decode_params(study, encode_params(study, point)) == point


@pytest.mark.parametrize(
    ("points", "reason"),
    [
        ([{"train.lr": 0.003}], "missing"),
        ([{"train.lr": 0.5, "model.kwargs.filters": [8, 16]}], "outside the space"),
        ([{"train.lr": 0.003, "model.kwargs.filters": [8, 8]}], "outside the space"),
        ([{"train.lr": 0.003, "model.kwargs.filters": [8, 16]}] * 3, "more than num_samples"),
    ],
)
def test_bad_start_point_is_refused(
    tmp_path: Path, toy_manifest: Path, points: list[dict], reason: str
) -> None:
    with pytest.raises(UserInputError, match=reason):
        _start(tmp_path, toy_manifest, *points)


def test_unknown_model_among_the_choices_is_refused(tmp_path: Path, toy_manifest: Path) -> None:
    names = {"type": "choice", "values": ["resnet18", "resnet_18"]}
    cfg = _with_tune(tmp_path, toy_manifest, {"s": {"space": {"model.name": names}}})
    with pytest.raises(UserInputError, match=r"space\.model\.name: model\.name: unknown model"):
        check_studies(cfg)


def test_tpe_start_up_trials_reach_the_sampler(tmp_path: Path, toy_manifest: Path) -> None:
    from carclf.search.tune import _search_alg

    cfg = _start(tmp_path, toy_manifest, num_samples=4)
    cfg.tune.startup_trials = 3
    searcher = _search_alg(cfg, "s").searcher  # behind the ConcurrencyLimiter
    assert searcher._sampler._n_startup_trials == 3
