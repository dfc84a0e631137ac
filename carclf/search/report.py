"""What a finished search leaves for people: the comparison table, plots and the Optuna study.

For each study, the best healthy trial (by the tune metric on validation) is scored on the test
split with :func:`carclf.evaluate.evaluate`, and its confusion matrix is named by
:func:`carclf.collapse.confusion_pattern`. Every trial goes into ``optuna.db`` (one Optuna study
per carclf study, ``optuna-dashboard sqlite:///<output_dir>/optuna.db``), from which the
parameter importances come (``optuna.importance``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from carclf.collapse import confusion_pattern
from carclf.config import Config
from carclf.data.manifest import Manifest
from carclf.metrics import best_of
from carclf.plots import plot_param_importances, plot_search_trials
from carclf.runs import finish_unfinished
from carclf.search.space import optuna_distribution, optuna_value, study_config
from carclf.tables import markdown_table, number_cell, write_csv

OPTUNA_DB = "optuna.db"
TRIALS_PLOT = "search_trials.png"
IMPORTANCE_PLOT = "param_importances.png"


def export_optuna(cfg: Config, rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Write every trial into an Optuna SQLite storage, one study per carclf study.

    A trial with a finite metric is COMPLETE with its best epoch as value and its per-epoch
    metric as intermediate values; the collapse label and early stop are user attributes.
    A rerun replaces the studies.

    Returns:
        The Optuna studies by carclf study name.
    """
    import optuna

    storage = f"sqlite:///{path}"
    direction = "maximize" if cfg.tune.mode == "max" else "minimize"
    key = f"best_{cfg.tune.metric}"
    studies = {}
    for name, spec in cfg.tune.studies.items():
        if name in optuna.get_all_study_names(storage):
            optuna.delete_study(study_name=name, storage=storage)
        study = optuna.create_study(study_name=name, storage=storage, direction=direction)
        for row in (r for r in rows if r["study"] == name):
            value = row[key]
            trial = optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL
                if value is None
                else optuna.trial.TrialState.COMPLETE,
                value=value,
                params={
                    k: optuna_value(p, row[f"param:{k}"])
                    for k, p in spec.space.items()
                    if f"param:{k}" in row
                },
                distributions={k: optuna_distribution(p) for k, p in spec.space.items()},
                intermediate_values={
                    i: v for i, v in enumerate(row["curve"]) if v is not None and math.isfinite(v)
                },
                user_attrs={
                    "tune_trial": row["trial"],
                    "collapsed": row["collapsed"],
                    "collapse_reason": row["collapse_reason"],
                    "stopped_early": row["stopped_early"],
                },
            )
            study.add_trial(trial)
        studies[name] = study
    return studies


def param_importances(study: Any) -> dict[str, float] | None:
    """Optuna's parameter importances of a study (its default evaluator, PED-ANOVA); None when
    Optuna finds too few trials to tell the parameters apart."""
    import optuna

    with warnings.catch_warnings():
        # Optuna warns, then returns equal importances, when there are too few trials.
        warnings.simplefilter("error", UserWarning)
        try:
            return optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError, UserWarning):
            return None


def test_scores(row: dict[str, Any], cfg: Config, manifest: Manifest, out: Path) -> dict[str, Any]:
    """Test accuracy, macro-F1 and the confusion-matrix pattern of one trial's best checkpoint;
    the full evaluation (metrics, plots, report) goes to ``out/eval/<study>``."""
    from carclf.evaluate import PREDICTIONS_FILE, evaluate, read_predictions
    from carclf.metrics import confusion

    if not manifest.split("test"):
        return {"test_acc": None, "test_f1_macro": None, "confusion_pattern": "no test split"}
    run_dir = Path(row["run_dir"])
    finish_unfinished(run_dir, cfg.tune.metric, cfg.tune.mode)
    result = evaluate(run_dir, manifest.path, "test", out / "eval" / row["study"], gallery_size=0)
    _, y_true, probs, labels = read_predictions(result.out_dir / PREDICTIONS_FILE)
    cm = confusion(y_true, probs.argmax(axis=1), len(labels))
    return {
        "test_acc": result.metrics["summary"]["acc"],
        "test_f1_macro": result.metrics["summary"]["f1_macro"],
        "confusion_pattern": confusion_pattern(cm, labels),
    }


def best_trial(rows: list[dict[str, Any]], key: str, mode: str) -> dict[str, Any] | None:
    """The healthy (not collapsed) trial with the best ``key``, or None."""
    healthy = [r for r in rows if r[key] is not None and not r["collapsed"]]
    return best_of(healthy, lambda r: r[key], mode) if healthy else None


def _study_model(cfg: Config, study: str, best: dict[str, Any] | None) -> str:
    """The study's model (the best trial's where the model is searched over), marked
    "(pretrained)" where the study starts from pretrained weights."""
    spec = cfg.tune.studies[study]
    if "model.name" not in spec.space:
        name = str(spec.overrides.get("model.name", cfg.model.name))
    elif best is not None and best.get("param:model.name"):
        name = str(best["param:model.name"])
    else:
        name = " | ".join(map(str, spec.space["model.name"].values or []))
    pretrained = spec.overrides.get("model.pretrained", cfg.model.pretrained)
    return f"{name} (pretrained)" if pretrained else name


def probe_config(cfg: Config) -> tuple[str, Config] | None:
    """The first study that starts from pretrained weights, as its trials' base config (the
    study's overrides, no sampled parameters); None when no study is pretrained."""
    for name, spec in cfg.tune.studies.items():
        base = study_config(cfg, spec, {}, Path(cfg.output_dir) / "probe")
        if base.model.pretrained:
            return name, base
    return None


def probe_row(cfg: Config, out: Path) -> dict[str, Any] | None:
    """Row zero of the comparison: the linear probe of the pretrained study's weights on the
    same split (``carclf baseline``, into ``out/probe``), the score a fine-tune must beat."""
    from carclf.baseline import run_baseline

    found = probe_config(cfg) if cfg.tune.probe else None
    if found is None:
        return None
    study, base = found
    result = run_baseline(base, "test", out / "probe")
    val = dict((c["C"], c["val_acc"]) for c in result.record["C_grid"])[result.record["chosen_C"]]
    return {
        "study": "linear probe",
        "model": f"{base.model.name} (pretrained, frozen; {study}'s weights)",
        "trials": 0,
        "collapsed": 0,
        "stopped_early": 0,
        "trial_epochs": 0,
        f"best_{cfg.tune.metric}": val if cfg.tune.metric == "val_acc" else None,
        "test_acc": result.metrics["summary"]["acc"],
        "test_f1_macro": result.metrics["summary"]["f1_macro"],
        "confusion_pattern": None,
        "best_trial": None,
        "best_epochs": None,
    }


def with_gains(table: list[dict[str, Any]], probe: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``table`` with the probe first and each study's test-accuracy gain over it (points)."""
    if probe is None:
        return table
    for row in table:
        acc = row.get("test_acc")
        row["test_gain_over_probe"] = None if acc is None else 100 * (acc - probe["test_acc"])
    return [{**probe, "test_gain_over_probe": 0.0}, *table]


def comparison_table(
    rows: list[dict[str, Any]], cfg: Config, manifest: Manifest, out: Path
) -> list[dict[str, Any]]:
    """One row per study: its trials, collapses, early stops and its best healthy trial, with
    that trial's test scores."""
    key = f"best_{cfg.tune.metric}"
    table = []
    for study in cfg.tune.studies:
        mine = [r for r in rows if r["study"] == study]
        best = best_trial(mine, key, cfg.tune.mode)
        scores = (
            test_scores(best, cfg, manifest, out)
            if best
            else dict.fromkeys(("test_acc", "test_f1_macro", "confusion_pattern"))
        )
        table.append(
            {
                "study": study,
                "model": _study_model(cfg, study, best),
                "trials": len(mine),
                "collapsed": sum(r["collapsed"] for r in mine),
                "stopped_early": sum(r["stopped_early"] for r in mine),
                "trial_epochs": sum(r["epochs"] for r in mine),
                key: None if best is None else best[key],
                **scores,
                "best_trial": None if best is None else best["trial"],
                "best_epochs": None if best is None else best["epochs"],
            }
        )
    return table


def _cell(key: str, value: Any) -> str:
    if key == "best_trial" and value:  # Tune's directory name; its first parts are the trial's id
        return "_".join(str(value).split("_")[:3])
    if "gain" in key and isinstance(value, float):  # points, signed
        return f"{value:+.1f}"
    return number_cell(digits=3)(key, value)


def comparison_markdown(table: list[dict[str, Any]]) -> list[str]:
    """The comparison as Markdown lines: scores to 3 decimals, trial names shortened."""
    return markdown_table(table, _cell)


def _outcome(row: dict[str, Any]) -> str:
    if row["collapsed"]:
        return f"collapsed: {row['collapse_reason']}"
    return "stopped early (ASHA)" if row["stopped_early"] else "ran every epoch"


def trials_table(
    rows: list[dict[str, Any]], cfg: Config, probe: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per trial for people: study, model, best score (and its gain over the probe's
    on validation, in points), epochs and what became of it (the collapse label with its
    reasons, an early stop, or all epochs)."""
    key = f"best_{cfg.tune.metric}"
    table = []
    for r in rows:
        row = {
            "study": r["study"],
            "trial": r["trial"],
            "model": _study_model(cfg, r["study"], r),
            "lr": r.get("param:train.lr"),
            key: r[key],
        }
        if probe is not None and probe.get(key) is not None:
            row["gain_over_probe"] = None if r[key] is None else 100 * (r[key] - probe[key])
        table.append(row | {"epochs": r["epochs"], "outcome": _outcome(r)})
    return table


def _trial_cell(key: str, value: Any) -> str:
    if key == "lr" and isinstance(value, float):
        return f"{value:.2g}"
    return _cell("best_trial" if key == "trial" else key, value)


def write_report(
    rows: list[dict[str, Any]], cfg: Config, manifest: Manifest, out: Path
) -> dict[str, Any] | None:
    """Write ``optuna.db``, the plots and ``comparison.csv`` / ``comparison.md``.

    Returns:
        The best healthy trial over all studies (for ``best_config.yaml``), or None.
    """
    studies = export_optuna(cfg, rows, out / OPTUNA_DB)
    importances = {name: param_importances(s) for name, s in studies.items()}
    plot_search_trials(rows, f"best_{cfg.tune.metric}", out / TRIALS_PLOT)
    found = {k: v for k, v in importances.items() if v}
    if found:
        plot_param_importances(found, out / IMPORTANCE_PLOT)
    probe = probe_row(cfg, out)
    table = with_gains(comparison_table(rows, cfg, manifest, out), probe)
    write_csv(table, out / "comparison.csv")
    missing = sorted(set(importances) - set(found))
    lines = ["# Search comparison", "", *comparison_markdown(table), ""]
    if probe is not None:
        lines += [
            "Row zero is the linear probe of the pretrained weights on the same split "
            "(`probe/`): logistic regression on frozen features; *gain* columns are points "
            "over it (test for each study's best trial, validation for every trial).",
            "",
        ]
    trials = trials_table(rows, cfg, probe)
    lines += ["## Trials", "", *markdown_table(trials, _trial_cell), ""]
    lines += [f"![{cfg.tune.metric} per trial]({TRIALS_PLOT})", ""]
    if found:
        lines += [f"![parameter importances]({IMPORTANCE_PLOT})", ""]
    if missing:
        lines += [f"No parameter importances for {', '.join(missing)}: too few complete trials."]
    lines += [
        "Test scores: the best healthy trial of each study on the test split (`eval/<study>/`).",
        f"Optuna study: `optuna-dashboard sqlite:///{out / OPTUNA_DB}`.",
        f"TensorBoard: `tensorboard --logdir {out}`.",
    ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    return best_trial(rows, f"best_{cfg.tune.metric}", cfg.tune.mode)
