"""Ray Tune + Optuna searches over Ray Train runs, with ASHA and collapse detection.

Each study of ``cfg.tune.studies`` (e.g. a from-scratch CNN and a transfer model under the same
budget) is one Tune experiment. Every trial is a function trainable that launches its own
``TorchTrainer`` (the Train V2 pattern) and forwards its reports with ``TuneReportCallback``.
A stopper ends collapsed trials early (:func:`carclf.collapse.detect_collapse`). The experiment
directory (``output_dir``) ends up with ``trials.csv``, ``comparison.csv`` / ``comparison.md``
with search plots, ``best_config.yaml`` (accepted by ``carclf train --config`` as it is), the
Optuna study in ``optuna.db`` and Tune's TensorBoard logs under ``tune/`` (see
:mod:`carclf.search.report`).

Rerunning the same command resumes unfinished studies (``Tuner.restore``). The searcher's Optuna
study lives in memory and travels in Tune's own experiment state, so a restored search and its
searcher always agree; ``optuna.db`` is written from the finished trials for optuna-dashboard.
Tune's state is pickled, so a study is restored only from a tree that is the user's own
(:func:`carclf.ownership.check_own_tree`), or when the user confirms (``trust_state``,
``--trust-state``); the check runs before Ray starts.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from carclf import runs
from carclf.collapse import CollapseRule, collapse_label, detect_collapse
from carclf.config import Config, save_config
from carclf.errors import UserInputError
from carclf.metrics import best_of
from carclf.ownership import check_own_tree
from carclf.paths import BEST_CONFIG_FILE, ExperimentPaths
from carclf.runtime import ensure_ray
from carclf.search.report import write_report
from carclf.search.space import (
    check_studies,
    decode_params,
    encode_params,
    study_config,
    trial_config,
    tune_domain,
)
from carclf.tables import write_csv
from carclf.tracking import log_study, with_store
from carclf.train import fit_local, fit_run, prepare_run, runs_in_process


def replay_epochs(run_dir: Path) -> int:
    """Report the epochs a trial already trained (its ``epochs.csv``) to Tune again.

    Tune saves its experiment state at most every few seconds, so a driver killed just after a
    trial ended may leave that trial marked as running. On restore the trial then starts again;
    replaying its epochs lets the scheduler and the stopper decide as before, without training.

    Returns:
        The number of epochs replayed.
    """
    from ray import tune

    rows = runs.read_epochs(run_dir)
    for row in rows:
        tune.report(row)
    return len(rows)


def _trial(params: dict[str, Any], *, cfg_json: dict, study: str) -> None:
    """One trial: a full Ray Train run whose reports go to Tune (resumed, after a restore)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = Config.model_validate(cfg_json)
    paths = ExperimentPaths(Path(cfg.output_dir))  # absolute already: run_tune resolved it
    trial_dir = paths.trials(study) / tune.get_context().get_trial_name()
    spec = cfg.tune.studies[study]
    trial_cfg = trial_config(cfg, spec, decode_params(spec, params), trial_dir)
    # The search's driver logs every trial to MLflow once its study ends (one writer).
    trial_cfg = trial_cfg.model_copy(
        update={"tracking": trial_cfg.tracking.model_copy(update={"mlflow": False})}
    )
    done = replay_epochs(trial_dir)
    if done >= trial_cfg.train.epochs or runs.is_finished(trial_dir):
        return
    # Either way the run resumes from the run directory's last checkpoint, after the
    # replayed epochs.
    if runs_in_process(trial_cfg):
        fit_local(trial_cfg, prepare_run(trial_cfg), on_epoch=tune.report)
    else:
        fit_run(trial_cfg, prepare_run(trial_cfg), callbacks=[TuneReportCallback()])


def _collapse_stopper(rule: CollapseRule, num_classes: int) -> Any:
    from ray import tune

    class CollapseStopper(tune.Stopper):
        """Stops a trial as soon as its validation history shows collapse."""

        def __init__(self) -> None:
            self.history: dict[str, list[dict]] = defaultdict(list)

        def __call__(self, trial_id: str, result: dict) -> bool:
            self.history[trial_id].append(result)
            return detect_collapse(self.history[trial_id], num_classes, rule) is not None

        def stop_all(self) -> bool:
            return False

    return CollapseStopper()


def trial_cpus(trial: Config, sliver: float) -> float:
    """The CPUs a trial's own actor holds: its worker's too when it trains in process
    (``train.runs_in_process``), else ``sliver`` (``tune.trial_cpus``) beside the
    ``TorchTrainer`` workers it starts.

    Either way a trial accounts for ``trial_cpus + num_workers × cpus_per_worker`` in all.
    """
    return sliver + trial.scaling.cpus_per_worker if runs_in_process(trial) else sliver


def fit_concurrency(cfg: Config, cluster_cpus: float) -> int:
    """How many trials may run at once: ``tune.max_concurrent``, capped by the cluster's CPUs.

    A trial holds its driver's sliver plus every worker's CPUs. Trials launched beyond what fits
    would each wait for workers until Ray Train's start-up timeout and fail, so the cap is
    applied (and said) before the search starts.

    Raises:
        UserInputError: when not even one trial fits.
    """
    workers = cfg.tune.trial_workers or cfg.scaling.num_workers
    per_trial = cfg.tune.trial_cpus + workers * cfg.scaling.cpus_per_worker
    fits = int(cluster_cpus / per_trial + 1e-9)  # tolerance before truncating: 1.9999999 is 2
    if fits < 1:
        raise UserInputError(
            f"tune: one trial needs {per_trial:g} CPUs (trial_cpus + num_workers × "
            f"cpus_per_worker) but the cluster has {cluster_cpus:g}"
        )
    if fits < cfg.tune.max_concurrent:
        print(
            f"[carclf] tune: {cfg.tune.max_concurrent} concurrent trials need "
            f"{cfg.tune.max_concurrent * per_trial:g} CPUs, the cluster has {cluster_cpus:g}: "
            f"running {fits} at a time",
            file=sys.stderr,
        )
    return min(fits, cfg.tune.max_concurrent)


def _search_alg(cfg: Config, study: str) -> Any:
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    t = cfg.tune
    spec = t.studies[study]
    start = [encode_params(spec, point) for point in spec.start]
    if t.searcher == "random":
        return BasicVariantGenerator(
            points_to_evaluate=start, max_concurrent=t.max_concurrent, random_state=cfg.seed
        )
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # In-memory study: it is pickled with Tune's experiment state, so a restore brings back
    # exactly the trials Tune knows. An RDB study would run ahead of a killed driver's last
    # saved state and keep trials "running" forever.
    searcher = OptunaSearch(
        metric=t.metric,
        mode=t.mode,
        points_to_evaluate=start or None,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=t.startup_trials),
        study_name=study,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=t.max_concurrent)


TRUST_STATE_FLAG = "--trust-state"


def check_restorable(cfg: Config, study: str, trust_state: bool = False) -> None:
    """Refuse to resume ``study`` from Tune state that is not the user's own.

    ``Tuner.restore`` unpickles it with a full unpickler, so whoever could write it could run
    code as this user; ``trust_state`` is the user's confirmation that it is safe anyway.

    Raises:
        UserInputError: the study's state, or a directory up to the experiment directory, is
            owned by someone else or writable by others.
    """
    paths = ExperimentPaths.of(cfg)
    state = paths.tuner_study(study)
    if not trust_state and state.exists():
        check_own_tree(state, top=paths.output_dir, confirm=TRUST_STATE_FLAG)


def run_study(cfg: Config, study: str, num_classes: int, trust_state: bool = False) -> Any:
    """Run (or resume, see :func:`check_restorable`) one study; returns Tune's ``ResultGrid``."""
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    paths = ExperimentPaths.of(cfg)
    # The study's overrides, no sample.
    base = trial_config(cfg, t.studies[study], {}, paths.output_dir)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, cfg_json=cfg.model_dump(mode="json"), study=study),
        {"CPU": trial_cpus(base, t.trial_cpus)},
    )
    path = paths.tuner_study(study)
    if tune.Tuner.can_restore(path):
        check_restorable(cfg, study, trust_state)  # again: the state may have changed meanwhile
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True).fit()
    scheduler = (
        ASHAScheduler(
            max_t=base.train.epochs,  # a study may train longer or shorter than another
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
        )
        if t.scheduler == "asha"
        else FIFOScheduler()
    )
    search_alg = _search_alg(cfg, study)
    tuner = tune.Tuner(
        trainable,
        param_space={k: tune_domain(p) for k, p in t.studies[study].space.items()},
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=t.num_samples,
        ),
        run_config=tune.RunConfig(
            name=study,
            storage_path=str(paths.tuner),
            stop=_collapse_stopper(t.collapse, num_classes) if t.stop_collapsed else None,
            # Explicit, not left to Tune's defaults: `tensorboard --logdir output_dir` shows the
            # trials (tune/<study>/<trial>/events.*) beside each run's own curves.
            callbacks=[TBXLoggerCallback()],
        ),
    )
    return tuner.fit()


def trial_history(result: Any) -> list[dict[str, Any]]:
    """A trial's reports, one per epoch: a restored trial's replayed epochs count once."""
    if result.metrics_dataframe is None:
        return []
    by_epoch: dict[Any, dict[str, Any]] = {}
    for n, row in enumerate(result.metrics_dataframe.to_dict("records")):
        by_epoch.setdefault(row.get("epoch", n), row)
    return list(by_epoch.values())


def _run_dir(paths: ExperimentPaths, study: str, result: Any) -> str:
    """The trial's Ray Train run directory (``<output_dir>/<study>/<trial name>``)."""
    trial_id = (result.metrics or {}).get("trial_id")
    found = sorted(paths.trials(study).glob(f"*_{trial_id}")) if trial_id else []
    return str(found[0]) if found else ""


def _startup(history: list[dict[str, Any]]) -> dict[str, float | None]:
    """When the trial's first epoch was reported (seconds after the trial started) and how
    much of that was not the epoch itself (start-up: processes, model, data, linear probe)."""
    first = history[0] if history else {}
    total, epoch = first.get("time_total_s"), first.get("epoch_s")
    return {
        "first_report_s": total,
        "startup_s": None if total is None or epoch is None else max(total - epoch, 0.0),
    }


def trial_rows(study: str, grid: Any, cfg: Config, num_classes: int) -> list[dict[str, Any]]:
    """One row per trial, in the order trials started: parameters, best metric, the metric per
    epoch (``curve``), epochs, state and the collapse label."""
    t = cfg.tune
    spec = t.studies[study]
    paths = ExperimentPaths.of(cfg)
    epochs = trial_config(cfg, spec, {}, paths.output_dir).train.epochs  # the study's own budget
    rows = []
    for result in grid:
        history = trial_history(result)
        reason = collapse_label(history, num_classes, t.collapse)
        curve = [h.get(t.metric) for h in history]
        finite = [v for v in curve if isinstance(v, float | int) and math.isfinite(v)]
        best = best_of(finite, float, t.mode) if finite else None
        rows.append(
            {
                "study": study,
                "trial": result.path and Path(result.path).name,
                **{f"param:{k}": v for k, v in decode_params(spec, result.config or {}).items()},
                f"best_{t.metric}": best,
                "epochs": len(history),
                "stopped_early": len(history) < epochs,
                "state": "ERROR" if result.error else "TERMINATED",
                "collapsed": bool(reason),
                "collapse_reason": reason or "",
                "curve": curve,
                **_startup(history),
                "started": history[0].get("timestamp", math.inf) if history else math.inf,
                "run_dir": _run_dir(paths, study, result),
            }
        )
    rows.sort(key=lambda r: r["started"])
    return [
        {"order": n, **{k: v for k, v in row.items() if k != "started"}}
        for n, row in enumerate(rows, 1)
    ]


def _with_histories(rows: list[dict[str, Any]], grid: Any) -> list[tuple[dict, list[dict]]]:
    """Each trial's row beside its reports per epoch (matched by the trial's directory name)."""
    history = {Path(r.path).name: trial_history(r) for r in grid if r.path}
    return [(row, history.get(row["trial"], [])) for row in rows]


def best_train_config(cfg: Config, row: dict[str, Any]) -> Config:
    """The winning trial as a plain train config (no ``tune`` section), into ``best_run``."""
    params = {k.removeprefix("param:"): v for k, v in row.items() if k.startswith("param:")}
    study = cfg.tune.studies[row["study"]]
    return study_config(cfg, study, params, ExperimentPaths.of(cfg).best_run)


def run_tune(cfg: Config, trust_state: bool = False) -> Path:
    """Run every study of ``cfg.tune``; write trials.csv, the Optuna study, the comparison
    (tables, plots, test scores of each study's best trial) and best_config.yaml.

    Args:
        cfg: the search's config.
        trust_state: resume studies whose Tune state is not the user's own (the user's
            confirmation; see :func:`check_restorable`).

    Returns:
        The experiment directory.
    """
    from carclf.data.manifest import read_manifest

    check_studies(cfg)
    for study in cfg.tune.studies:  # before anything is written or Ray starts
        check_restorable(cfg, study, trust_state)
    out = ExperimentPaths.of(cfg).output_dir
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(runs.resolve_manifest(cfg))
    # Absolute paths: each trial runs in its own working directory (Tune's trial directory).
    cfg = cfg.model_copy(
        update={
            "output_dir": str(out),
            "data": cfg.data.model_copy(update={"manifest": str(manifest.path)}),
        }
    )
    cfg = with_store(cfg, out)
    save_config(cfg, out)
    ensure_ray()
    import ray

    concurrent = fit_concurrency(cfg, ray.cluster_resources().get("CPU", 0.0))
    cfg = cfg.model_copy(
        update={"tune": cfg.tune.model_copy(update={"max_concurrent": concurrent})}
    )
    rows: list[dict[str, Any]] = []
    for study in cfg.tune.studies:
        grid = run_study(cfg, study, len(manifest.labels), trust_state)
        mine = trial_rows(study, grid, cfg, len(manifest.labels))
        if cfg.tracking.mlflow:
            log_study(cfg, study, _with_histories(mine, grid))
        rows += mine
    write_csv(rows, out / "trials.csv")
    best = write_report(rows, cfg, manifest, out)
    if best is not None:
        save_config(best_train_config(cfg, best), out, BEST_CONFIG_FILE)
    return out
