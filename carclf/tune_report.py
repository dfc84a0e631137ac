"""What a finished search leaves for people: the comparison table, plots and the Optuna study.

For each study, the best healthy trial (by the tune metric on validation) is scored on the test
split with :func:`carclf.evaluate.evaluate`, and its confusion matrix is named by
:func:`carclf.collapse.confusion_pattern`. Every trial goes into ``optuna.db`` (one Optuna study
per carclf study, ``optuna-dashboard sqlite:///<output_dir>/optuna.db``), from which the
parameter importances come (``optuna.importance``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from carclf.collapse import confusion_pattern
from carclf.config import Config, SearchParam
from carclf.data.manifest import Manifest
from carclf.plots import plot_param_importances, plot_search_trials

OPTUNA_DB = "optuna.db"
TRIALS_PLOT = "search_trials.png"
IMPORTANCE_PLOT = "param_importances.png"


def _distribution(param: SearchParam) -> Any:
    """A search dimension as Optuna sees it; choices as JSON text (lists are not Optuna values)."""
    from optuna import distributions as d

    if param.type == "choice":
        return d.CategoricalDistribution([json.dumps(v) for v in param.values])
    if param.type == "int":
        return d.IntDistribution(int(param.low), int(param.high))
    return d.FloatDistribution(param.low, param.high, log=param.type == "loguniform")


def _optuna_value(param: SearchParam, value: Any) -> Any:
    return json.dumps(value) if param.type == "choice" else value


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
                    k: _optuna_value(p, row[f"param:{k}"])
                    for k, p in spec.space.items()
                    if f"param:{k}" in row
                },
                distributions={k: _distribution(p) for k, p in spec.space.items()},
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


def best_checkpoint(run_dir: Path, metric: str, mode: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of a trial's run with the best ``metric``, and that epoch's metrics.

    A trial stopped by Tune (ASHA, a collapse) never returns from its Ray Train run, so its
    run has checkpoints but no ``run.json``.
    """
    metas = [
        (path.parent, json.loads(path.read_text())["metrics"])
        for path in run_dir.glob("checkpoint_*/meta.json")
    ]
    if not metas:
        raise RuntimeError(f"{run_dir}: the trial wrote no checkpoint")
    sign = 1.0 if mode == "max" else -1.0
    return max(metas, key=lambda m: sign * m[1][metric])


def test_scores(row: dict[str, Any], cfg: Config, manifest: Manifest, out: Path) -> dict[str, Any]:
    """Test accuracy, macro-F1 and the confusion-matrix pattern of one trial's best checkpoint;
    the full evaluation (metrics, plots, report) goes to ``out/eval/<study>``."""
    from carclf.evaluate import PREDICTIONS_FILE, evaluate, read_predictions
    from carclf.metrics import confusion
    from carclf.train import RUN_FILE, write_run_file

    if not manifest.split("test"):
        return {"test_acc": None, "test_f1_macro": None, "confusion_pattern": "no test split"}
    run_dir = Path(row["run_dir"])
    if not (run_dir / RUN_FILE).is_file():
        write_run_file(run_dir, *best_checkpoint(run_dir, cfg.tune.metric, cfg.tune.mode))
    result = evaluate(run_dir, manifest.path, "test", out / "eval" / row["study"], gallery_size=0)
    _, y_true, probs, labels = read_predictions(result.out_dir / PREDICTIONS_FILE)
    cm = confusion(y_true, probs.argmax(axis=1), len(labels))
    return {
        "test_acc": result.metrics["summary"]["acc"],
        "test_f1_macro": result.metrics["summary"]["f1_macro"],
        "confusion_pattern": confusion_pattern(cm, labels),
    }


def _best(rows: list[dict[str, Any]], key: str, mode: str) -> dict[str, Any] | None:
    sign = 1.0 if mode == "max" else -1.0
    healthy = [r for r in rows if r[key] is not None and not r["collapsed"]]
    return max(healthy, key=lambda r: sign * r[key]) if healthy else None


def _study_model(cfg: Config, study: str, best: dict[str, Any] | None) -> str:
    """The study's model: the best trial's where the model is searched over."""
    spec = cfg.tune.studies[study]
    if "model.name" in spec.space:
        if best is not None and best.get("param:model.name"):
            return str(best["param:model.name"])
        return " | ".join(map(str, spec.space["model.name"].values or []))
    return str(spec.overrides.get("model.name", cfg.model.name))


def comparison_table(
    rows: list[dict[str, Any]], cfg: Config, manifest: Manifest, out: Path
) -> list[dict[str, Any]]:
    """One row per study: its trials, collapses, early stops and its best healthy trial, with
    that trial's test scores."""
    key = f"best_{cfg.tune.metric}"
    table = []
    for study in cfg.tune.studies:
        mine = [r for r in rows if r["study"] == study]
        best = _best(mine, key, cfg.tune.mode)
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
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if key == "best_trial":  # Tune's directory name; its first parts are the trial's id
        return "_".join(str(value).split("_")[:3])
    return str(value)


def _markdown(table: list[dict[str, Any]]) -> list[str]:
    header = list(table[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(h, r[h]) for h in header) + " |" for r in table]


def write_report(
    rows: list[dict[str, Any]], cfg: Config, manifest: Manifest, out: Path
) -> dict[str, Any] | None:
    """Write ``optuna.db``, the plots and ``comparison.csv`` / ``comparison.md``.

    Returns:
        The best healthy trial over all studies (for ``best_config.yaml``), or None.
    """
    from carclf.tune import write_csv

    studies = export_optuna(cfg, rows, out / OPTUNA_DB)
    importances = {name: param_importances(s) for name, s in studies.items()}
    plot_search_trials(rows, f"best_{cfg.tune.metric}", out / TRIALS_PLOT)
    found = {k: v for k, v in importances.items() if v}
    if found:
        plot_param_importances(found, out / IMPORTANCE_PLOT)
    table = comparison_table(rows, cfg, manifest, out)
    write_csv(table, out / "comparison.csv")
    missing = sorted(set(importances) - set(found))
    lines = ["# Search comparison", "", *_markdown(table), ""]
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
    return _best(rows, f"best_{cfg.tune.metric}", cfg.tune.mode)
