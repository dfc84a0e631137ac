"""MLflow tracking (``tracking.mlflow``): training runs, search trials and the winner's bundle.

One store per experiment directory, resolved once by the command that starts the work
(:func:`with_store`) and carried in the config, so a pipeline's search, its final run and the
bundle land in one place. The default store is SQLite (``sqlite:///<dir>/mlflow.db``), MLflow's
own default backend since 3.7; any tracking URI (a server, Databricks) can be set instead.

Who writes, and when:

* a training run: the driver creates the MLflow run (parameters: the flattened config) and the
  Ray Train controller logs each epoch's metrics as it is reported (:func:`epoch_callback`); the
  driver logs the best epoch's metrics at the end. A resumed run continues its MLflow run (its
  id is kept in the run directory, :data:`carclf.runs.MLFLOW_RUN_FILE`).
* a search: after each study, the search's driver logs one parent run per study and one child
  run per trial, with the trial's parameters, its metrics per epoch, its best score, early stop
  and collapse label (:func:`log_study`). One writer per store at a time: trials run
  concurrently, and SQLite does not take concurrent writers gracefully.
* the pipeline: the exported bundle (with its model card) and the evaluation report go to the
  final run as artefacts (:func:`log_bundle`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from carclf import runs
from carclf.config import Config
from carclf.paths import ExperimentPaths

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
SQLITE = "sqlite:///"
# MLflow refuses a parameter value longer than this many characters.
MAX_PARAM_CHARS = 6000
# Tune's bookkeeping in a trial's reports, not metrics of the model.
TUNE_KEYS = ("timestamp", "pid", "training_iteration", "iterations_since_restore", "trial_id")


def with_store(cfg: Config, experiment_dir: str | Path) -> Config:
    """``cfg`` with its tracking URI resolved: ``tracking_uri`` if set, else SQLite in
    ``experiment_dir``. Unchanged when tracking is off or the URI is already set."""
    t = cfg.tracking
    if not t.mlflow or t.tracking_uri:
        return cfg
    db = Path(experiment_dir).resolve() / DB_FILE
    db.parent.mkdir(parents=True, exist_ok=True)
    return cfg.model_copy(
        update={"tracking": t.model_copy(update={"tracking_uri": f"{SQLITE}{db}"})}
    )


def client(cfg: Config) -> Any:
    """An ``MlflowClient`` on ``cfg``'s store (no global MLflow state is touched)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.tracking_uri)


def experiment_id(mlflow: Any, cfg: Config) -> str:
    """The id of ``cfg``'s MLflow experiment (``tracking.experiment``, else the task), created
    on first use."""
    name = cfg.tracking.experiment or cfg.task
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    return mlflow.create_experiment(name, artifact_location=_artifact_location(cfg))


def _artifact_location(cfg: Config) -> str | None:
    """Artefacts beside a SQLite store (MLflow would put them under the working directory);
    a tracking server chooses its own."""
    uri = cfg.tracking.tracking_uri or ""
    if not uri.startswith(SQLITE):
        return None
    return (Path(uri.removeprefix(SQLITE)).parent / ARTIFACTS_DIR).as_uri()


def config_params(cfg: Config) -> dict[str, str]:
    """The config as flat MLflow parameters (``train.lr`` → ``"0.0005"``), without the search
    and tracking sections."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            text = node if isinstance(node, str) else json.dumps(node)
            flat[prefix] = text[:MAX_PARAM_CHARS]

    walk("", cfg.model_dump(mode="json", exclude={"tune", "tracking"}))
    return flat


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (MLflow takes no text, None or NaN)."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def log_rows(
    mlflow: Any, run_id: str, rows: Iterable[dict[str, Any]], skip: Sequence[str] = ()
) -> None:
    """Log each row's numbers as metrics at ``step = row["epoch"]`` (one batch per row)."""
    from mlflow.entities import Metric

    for row in rows:
        step = int(row.get("epoch", 0))
        stamp = int(float(row.get("timestamp", 0)) * 1000) or _now_ms()
        values = {k: v for k, v in numeric_metrics(row).items() if k not in skip}
        mlflow.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _log_params(mlflow: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
        mlflow.log_batch(run_id, params=items[i : i + 100])


# --- a training run -------------------------------------------------------------------------


def start_run(cfg: Config, run_dir: Path) -> str:
    """The MLflow run of the training run in ``run_dir``: the one an earlier, interrupted
    attempt started (resume), else a new one with the config as parameters."""
    mlflow = client(cfg)
    recorded = run_dir / runs.MLFLOW_RUN_FILE
    if recorded.is_file():
        run_id = json.loads(recorded.read_text())["run_id"]
        mlflow.update_run(run_id, status="RUNNING")
        return run_id
    run = mlflow.create_run(
        experiment_id(mlflow, cfg),
        run_name=run_dir.name,
        tags={"carclf.run_dir": str(run_dir), "carclf.model": cfg.model.name},
    )
    _log_params(mlflow, run.info.run_id, config_params(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(
        json.dumps({"tracking_uri": cfg.tracking.tracking_uri, "run_id": run.info.run_id})
    )
    return run.info.run_id


def finish_run(cfg: Config, run_id: str, best: dict[str, Any] | None) -> None:
    """End a training run's MLflow run: the best epoch's metrics as ``best_*``, or FAILED."""
    mlflow = client(cfg)
    if best is None:
        mlflow.set_terminated(run_id, status="FAILED")
        return
    log_rows(
        mlflow,
        run_id,
        [{f"best_{k}": v for k, v in best.items()} | {"epoch": best.get("epoch", 0)}],
    )
    mlflow.set_terminated(run_id, status="FINISHED")


def epoch_callback(cfg: Config, run_id: str) -> Any:
    """A Ray Train callback (it runs on the controller) that logs every reported epoch."""
    import ray.train

    uri = cfg.tracking.tracking_uri

    class MlflowEpochLog(ray.train.UserCallback):
        def __init__(self) -> None:
            self.mlflow = None

        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if self.mlflow is None:
                from mlflow.tracking import MlflowClient

                self.mlflow = MlflowClient(tracking_uri=uri)
            log_rows(self.mlflow, run_id, metrics[:1])

    return MlflowEpochLog()


# --- a search ---------------------------------------------------------------------------------


def log_study(
    cfg: Config, study: str, trials: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]]
) -> str:
    """One parent run for ``study`` and a child run per trial (its row of ``trials.csv`` and its
    reports per epoch). A study logged before (a rerun of the search) is replaced.

    Returns:
        The parent run's id.
    """
    mlflow = client(cfg)
    exp = experiment_id(mlflow, cfg)
    tags = {"carclf.search": str(ExperimentPaths.of(cfg).output_dir), "carclf.study": study}
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    for old in mlflow.search_runs([exp], filter_string=query):
        mlflow.delete_run(old.info.run_id)
    parent = mlflow.create_run(exp, run_name=study, tags=tags).info.run_id
    key = f"best_{cfg.tune.metric}"
    for row, history in trials:
        _log_trial(mlflow, exp, {**tags, "mlflow.parentRunId": parent}, key, row, history)
    healthy = [r[key] for r, _ in trials if r[key] is not None and not r["collapsed"]]
    if healthy:
        best = max(healthy) if cfg.tune.mode == "max" else min(healthy)
        log_rows(mlflow, parent, [{key: best, "trials": len(trials), "epoch": 0}])
    mlflow.set_terminated(parent)
    return parent


def _log_trial(
    mlflow: Any,
    exp: str,
    tags: dict[str, str],
    key: str,
    row: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    run = mlflow.create_run(exp, run_name=str(row["trial"]), tags={**tags, **_trial_tags(row)})
    run_id = run.info.run_id
    params = {k.removeprefix("param:"): v for k, v in row.items() if k.startswith("param:")}
    _log_params(
        mlflow, run_id, {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
    )
    log_rows(mlflow, run_id, history, skip=TUNE_KEYS)
    log_rows(mlflow, run_id, [{key: row[key], "epochs": row["epochs"], "epoch": row["epochs"]}])
    mlflow.set_terminated(run_id, status="FAILED" if row["state"] == "ERROR" else "FINISHED")


def _trial_tags(row: dict[str, Any]) -> dict[str, str]:
    return {
        "carclf.collapsed": str(bool(row["collapsed"])).lower(),
        "carclf.collapse_reason": str(row.get("collapse_reason") or ""),
        "carclf.stopped_early": str(bool(row["stopped_early"])).lower(),
        "carclf.run_dir": str(row.get("run_dir") or ""),
    }


# --- the pipeline's winner --------------------------------------------------------------------


def log_bundle(cfg: Config, run_id: str, bundle_dir: Path, eval_dir: Path | None = None) -> None:
    """The exported bundle (with its model card) and the evaluation report, as artefacts of the
    final training run."""
    mlflow = client(cfg)
    mlflow.log_artifacts(run_id, str(bundle_dir), artifact_path="bundle")
    if eval_dir is not None and eval_dir.is_dir():
        mlflow.log_artifacts(run_id, str(eval_dir), artifact_path="eval")
