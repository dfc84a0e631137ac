"""A search whose driver is killed resumes: no finished trial trains again, Optuna still searches.

The driver is ``python -m carclf tune`` in a subprocess joined to the session's Ray (cheaper than
a second Ray on 2 cores); killing it ends its Tune and Train actors with it.
"""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import tiny_config

STUDY = "s"
SAMPLES = 2


def _config(tmp_path: Path, manifest: Path) -> Path:
    raw = tiny_config(tmp_path / "exp", manifest).model_dump(mode="json")
    raw["tune"] = {
        "num_samples": SAMPLES,
        "grace_period": 1,
        "studies": {
            STUDY: {"space": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}}
        },
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tune(config: Path, address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address, "OMP_NUM_THREADS": "1"}
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "carclf", "tune", "--config", str(config)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _epochs(run_dir: Path) -> list[str]:
    with (run_dir / "epochs.csv").open() as fh:
        return [row["epoch"] for row in csv.DictReader(fh)]


@pytest.mark.integration
def test_killed_driver_resumes_without_rerunning_finished_trials(
    ray_session, tmp_path: Path, toy_manifest: Path
) -> None:
    import optuna

    config = _config(tmp_path, toy_manifest)
    out = tmp_path / "exp"
    address = ray_session.get_runtime_context().gcs_address
    driver = _tune(config, address, tmp_path / "driver.log")
    try:
        deadline = time.monotonic() + 300
        # Trials run one at a time: a second trial's run directory means the first has ended.
        while len(list((out / STUDY).glob("_trial_*"))) < 2:
            assert driver.poll() is None, "the search ended before it could be killed"
            assert time.monotonic() < deadline, "no second trial within 300 s"
            time.sleep(0.5)
        first = {p: p.stat().st_mtime for p in (out / STUDY).glob("_trial_*/epochs.csv")}
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert first, "the first trial wrote no epoch"

    rerun = _tune(config, address, tmp_path / "rerun.log")
    assert rerun.wait(timeout=400) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    with (out / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == SAMPLES
    assert len({r["run_dir"] for r in rows}) == SAMPLES
    for epochs_csv, mtime in first.items():  # finished before the kill: not trained again
        assert epochs_csv.stat().st_mtime == mtime
        assert _epochs(epochs_csv.parent) == ["0"]
    # The restored searcher is the Optuna one: it kept the first trial and told it the rest.
    state = sorted((out / "tune" / STUDY).glob("searcher-state-*.pkl"))[-1]
    with state.open("rb") as fh:
        trials = pickle.load(fh)["_ot_study"].trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * SAMPLES
    assert trials[0].params["train.lr"] == float(rows[0]["param:train.lr"])
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == SAMPLES
    assert list(out.glob("tune/s/*/events.out.tfevents.*")), "no TensorBoard logs from Tune"
    assert (out / "search_trials.png").is_file()
    assert "test_acc" in (out / "comparison.md").read_text()
