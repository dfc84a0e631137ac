"""Weights and run files (issue #30, item 10): a tensor that timm's filter resized is named in the
load line, a corrupt ``.safetensors`` is exit 2, ``run.json`` is written whole or not at all,
and a NaN metric never wins the best checkpoint nor prunes it. No Ray."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from carclf import cli, runs
from carclf.errors import UserInputError
from carclf.metrics import best_of, rank_key
from carclf.session import KEEP_CHECKPOINTS, LocalSession
from carclf.weights import load_backbone, read_state_dict

NAN = float("nan")


def _save(model, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_position_embedding_resized_by_timms_filter_is_named_in_the_load_line(
    tmp_path: Path,
) -> None:
    source = timm.create_model("test_vit", img_size=32, num_classes=0)
    file = _save(source, tmp_path / "vit32.safetensors")
    model = timm.create_model("test_vit", img_size=64, num_classes=5)
    report = load_backbone(model, str(file), "test_vit")
    assert report.loaded == report.backbone  # a full load, but not of the file's own values
    assert report.resized == ("pos_embed [1, 5, 64] -> [1, 17, 64]",)
    assert "1 resized by timm's filter (pos_embed [1, 5, 64] -> [1, 17, 64])" in report.line()
    assert report.as_dict()["resized"] == report.resized


def test_a_file_of_the_models_own_size_reports_no_resize(tmp_path: Path) -> None:
    source = timm.create_model("test_vit", img_size=32, num_classes=0)
    file = _save(source, tmp_path / "vit32.safetensors")
    report = load_backbone(timm.create_model("test_vit", img_size=32), str(file), "test_vit")
    assert report.resized == () and "resized" not in report.line()


CORRUPTIONS = {
    "truncated": lambda raw: raw[:-20],
    "empty": lambda raw: b"",
    "garbage": lambda raw: b"not a safetensors file at all",
    "bad header": lambda raw: (5).to_bytes(8, "little") + b"{nope" + raw[13:],
}


@pytest.fixture(params=sorted(CORRUPTIONS))
def corrupt_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = _save(timm.create_model("test_resnet", num_classes=0), tmp_path / "w.safetensors")
    path.write_bytes(CORRUPTIONS[request.param](path.read_bytes()))
    return path


def test_a_corrupt_pretrained_safetensors_is_a_user_error(corrupt_file: Path) -> None:
    with pytest.raises(UserInputError, match="not a readable safetensors file") as err:
        read_state_dict(corrupt_file)
    message = str(err.value)
    assert message.startswith("model.pretrained_file: ") and "\n" not in message
    assert str(corrupt_file) in message


def test_train_with_a_corrupt_safetensors_exits_2_in_one_line(
    corrupt_file: Path, tmp_path: Path, toy_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    model = {"name": "test_resnet", "pretrained": True, "pretrained_file": str(corrupt_file)}
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "output_dir": str(tmp_path / "run"),
                "data": {"manifest": str(toy_manifest)},
                "model": model,
            }
        )
    )
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable safetensors file" in err[0]


def test_export_of_a_run_whose_weights_are_corrupt_exits_2(
    fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    best = Path(json.loads((fake_run / runs.RUN_FILE).read_text())["best_checkpoint"])
    weights = best / runs.CHECKPOINT_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    assert cli.main(["export", str(fake_run), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable safetensors file" in err[0]
    assert not (tmp_path / "bundle").exists()


def test_weights_of_another_model_in_a_checkpoint_are_exit_2(
    fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    best = Path(json.loads((fake_run / runs.RUN_FILE).read_text())["best_checkpoint"])
    _save(timm.create_model("test_resnet", num_classes=0), best / runs.CHECKPOINT_WEIGHTS_FILE)
    assert cli.main(["export", str(fake_run), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the model its run describes" in err[0]


def test_run_json_is_replaced_whole_or_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs.write_run_file(tmp_path, tmp_path / "checkpoint_a", {"val_acc": 0.5})
    before = (tmp_path / runs.RUN_FILE).read_text()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        runs.write_run_file(tmp_path, tmp_path / "checkpoint_b", {"val_acc": 0.9})
    with pytest.raises(TypeError):  # a metric JSON cannot hold, found before anything moves
        runs.write_run_file(tmp_path, tmp_path / "checkpoint_b", {"val_acc": object()})
    assert (tmp_path / runs.RUN_FILE).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [runs.RUN_FILE]  # no temp file left
    monkeypatch.undo()
    runs.write_run_file(tmp_path, tmp_path / "checkpoint_b", {"val_acc": 0.9})
    assert json.loads((tmp_path / runs.RUN_FILE).read_text())["metrics"] == {"val_acc": 0.9}


@pytest.mark.parametrize(
    ("values", "mode", "best"),
    [
        ([NAN, 0.9, 0.5], "max", 0.9),
        ([0.5, NAN, 0.9, NAN], "max", 0.9),
        ([NAN, 0.3, 0.2], "min", 0.2),
        ([0.3, NAN, math.inf, 0.2], "min", 0.2),
        ([NAN, -math.inf, 0.1], "max", 0.1),
        ([None, 0.4], "max", 0.4),
    ],
)
def test_a_nan_metric_is_never_the_best(values: list, mode: str, best: float) -> None:
    assert best_of(values, lambda v: v, mode) == best


def test_nan_ranks_below_every_number_infinities_included() -> None:
    assert rank_key(NAN, "max") < rank_key(-math.inf, "max") < rank_key(0.0, "max")
    assert rank_key(NAN, "min") < rank_key(math.inf, "min") < rank_key(0.0, "min")
    assert math.isnan(best_of([NAN, NAN], lambda v: v, "max"))  # only NaN: the first of them


def _checkpoint(run_dir: Path, epoch: int, val_acc: float) -> Path:
    path = run_dir / f"checkpoint_{epoch:03d}"
    path.mkdir()
    (path / runs.META_FILE).write_text(
        json.dumps({"metrics": {"epoch": epoch, "val_acc": val_acc}})
    )
    return path


def test_nan_epochs_neither_win_nor_prune_the_real_best(tmp_path: Path) -> None:
    values = [NAN, 0.9, NAN, 0.5, NAN, 0.6, NAN, 0.3]
    for epoch, value in enumerate(values):
        _checkpoint(tmp_path, epoch, value)
    session = LocalSession(tmp_path, "val_acc", "max", on_epoch=lambda _: None)
    session.prune()
    kept = {m["epoch"] for _, m in runs.checkpoints(tmp_path)}
    assert KEEP_CHECKPOINTS == 2 and kept == {1, 5, 7}  # the best two, and the latest
    path, metrics = session.best()
    assert metrics["val_acc"] == 0.9 and path.name == "checkpoint_001"
    assert runs.best_checkpoint(tmp_path, "val_acc", "max")[1]["epoch"] == 1
