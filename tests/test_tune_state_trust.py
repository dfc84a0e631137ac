"""A search resumes only from Tune state that is the user's own (issue #30): ``Tuner.restore``
unpickles it, so state another user could write is refused, exit 2, before Ray starts, unless
the user confirms with ``--trust-state``. No Ray starts here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from carclf import ownership
from carclf.cli import main
from carclf.config import Config, validate_config
from carclf.errors import UserInputError
from carclf.search.tune import check_restorable

from .conftest import tiny_config

STUDY = "s"


def _config(tmp_path: Path) -> Config:
    # The manifest is never read: the check comes first.
    raw = tiny_config(tmp_path / "exp", tmp_path / "m.parquet").model_dump(mode="json")
    raw["tune"] = {
        "studies": {STUDY: {"space": {"train.lr": {"type": "choice", "values": [1e-3]}}}}
    }
    return validate_config(raw)


def _state(tmp_path: Path) -> Path:
    """A study's Tune state as Tune leaves it: the pickles a restore would load."""
    state = tmp_path / "exp" / "tune" / STUDY
    (state / "trial_0").mkdir(parents=True)
    for name in ("tuner.pkl", "experiment_state-2026.json", "trial_0/error.pkl"):
        (state / name).write_bytes(b"pickled")
    for path in (tmp_path / "exp", tmp_path / "exp" / "tune", state, state / "trial_0"):
        path.chmod(0o755)
    return state


def test_own_state_is_restored(tmp_path: Path) -> None:
    _state(tmp_path)
    check_restorable(_config(tmp_path), STUDY)
    check_restorable(_config(tmp_path), "no such study yet")  # nothing to restore: fine


@pytest.mark.parametrize("where", ["", "tuner.pkl", "trial_0/error.pkl", "../.."])
def test_state_writable_by_others_is_refused(tmp_path: Path, where: str) -> None:
    target = _state(tmp_path) / where if where else _state(tmp_path)
    target.chmod(0o777 if target.is_dir() else 0o666)
    with pytest.raises(UserInputError, match=r"writable by others.*--trust-state") as err:
        check_restorable(_config(tmp_path), STUDY)
    assert "\n" not in str(err.value)
    check_restorable(_config(tmp_path), STUDY, trust_state=True)  # confirmed


def test_state_of_another_user_is_refused(tmp_path: Path, monkeypatch) -> None:
    _state(tmp_path)
    other = os.geteuid() + 4242
    monkeypatch.setattr(ownership.os, "geteuid", lambda: other)
    with pytest.raises(UserInputError, match="owned by uid"):
        check_restorable(_config(tmp_path), STUDY)


def test_group_write_counts_only_for_a_private_group(monkeypatch) -> None:
    monkeypatch.setattr(ownership, "_private_group", lambda gid, uid: False)
    path = Path(__file__)
    mode = path.stat().st_mode
    try:
        path.chmod(mode | 0o020)
        assert "group" in (ownership.not_own(path) or "")
        monkeypatch.setattr(ownership, "_private_group", lambda gid, uid: True)
        assert ownership.not_own(path) is None
    finally:
        path.chmod(mode)


def test_the_cli_refuses_with_exit_2_before_ray(tmp_path: Path, capsys) -> None:
    (_state(tmp_path) / "tuner.pkl").chmod(0o666)
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path).model_dump(mode="json")))
    assert main(["tune", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "tuner.pkl" in err[-1] and "--trust-state" in err[-1]
    assert not (tmp_path / "exp" / "config.yaml").exists()  # refused before writing anything
