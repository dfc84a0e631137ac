"""Resuming reads a checkpoint without running pickled code (issue #14): a state file that holds
an arbitrary object is refused with a one-line error, and its code never runs. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from carclf import cli, runs
from carclf.config import save_config
from carclf.errors import UserInputError
from carclf.train import fit_local, prepare_run

from .conftest import tiny_config


class _Payload:
    """Pickles as a call to ``open(marker, "w")``: loading it with a full unpickler writes the
    marker file, which is how the tests see whether its code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _trained_run(tmp_path: Path, manifest: Path, **train: object) -> Path:
    cfg = tiny_config(tmp_path / "run", manifest, train={"epochs": 1, **train})
    return fit_local(cfg, prepare_run(cfg), on_epoch=lambda m: None).run_dir


def _poison(run_dir: Path, marker: Path) -> Path:
    """Replace the latest checkpoint's train_state.pt with the payload; return that file."""
    state_file = runs.latest_checkpoint(run_dir) / runs.STATE_FILE
    torch.save({"optimizer": _Payload(marker)}, state_file)
    return state_file


def test_the_payload_runs_code_under_a_full_unpickler(tmp_path: Path) -> None:
    # The fixture is real: without weights_only the marker is written.
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, tmp_path / "state.pt")
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert marker.exists()


def test_a_pickled_object_in_the_state_is_refused_on_resume(
    tmp_path: Path, toy_manifest: Path
) -> None:
    run_dir = _trained_run(tmp_path, toy_manifest)
    marker = tmp_path / "ran"
    state_file = _poison(run_dir, marker)
    more = tiny_config(run_dir, toy_manifest, train={"epochs": 2})
    with pytest.raises(UserInputError, match="refused") as err:
        fit_local(more, prepare_run(more), on_epoch=lambda m: None)
    assert str(state_file) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_carclf_train_exits_2_with_one_line_before_starting_ray(
    tmp_path: Path, toy_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _trained_run(tmp_path, toy_manifest)
    marker = tmp_path / "ran"
    _poison(run_dir, marker)
    cfg = tiny_config(run_dir, toy_manifest, train={"epochs": 2})
    config = save_config(cfg, tmp_path / "cfg")
    capsys.readouterr()
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carclf: error: ") and "refused" in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_checkpoint_layout_needs_no_code_running_unpickler(
    tmp_path: Path, toy_manifest: Path
) -> None:
    run_dir = _trained_run(tmp_path, toy_manifest, ema_decay=0.9)
    ckpt = runs.latest_checkpoint(run_dir)
    progress = json.loads((ckpt / runs.PROGRESS_FILE).read_text())
    assert progress["epoch"] == 0 and set(progress["stopper"]) >= {"best", "bad_epochs"}
    tensors = torch.load(ckpt / runs.STATE_FILE, weights_only=True)
    assert set(tensors) == {"optimizer", "schedule"}
    raw, ema = (
        load_file(str(ckpt / runs.RAW_WEIGHTS_FILE)),
        load_file(str(ckpt / "model.safetensors")),
    )
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA and raw weights both kept
    more = tiny_config(run_dir, toy_manifest, train={"epochs": 2, "ema_decay": 0.9})
    seen: list[dict] = []
    fit_local(more, prepare_run(more), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [1]  # resumed from the new layout


def test_a_checkpoint_written_before_the_split_still_resumes(tmp_path: Path) -> None:
    # Old layout: everything in train_state.pt; read with the same safe unpickler.
    old = {"epoch": 3, "optimizer": {"state": {}}, "schedule": {}, "stopper": {"best": 0.5}}
    torch.save(old, tmp_path / runs.STATE_FILE)
    assert runs.load_state(tmp_path) == old
    (tmp_path / runs.STATE_FILE).unlink()
    with pytest.raises(UserInputError, match="not a resumable checkpoint"):
        runs.load_state(tmp_path)
