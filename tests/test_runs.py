"""The run format: where an audited data.root goes, how the best checkpoint is chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carclf.metrics import best_of, metric_mode
from carclf.paths import MANIFEST_FILE
from carclf.runs import best_checkpoint, read_epochs, resolve_manifest

from .conftest import tiny_config


def test_data_root_is_audited_beside_the_run_directory(
    tmp_path: Path, toy_root: Path, toy_manifest: Path
) -> None:
    cfg = tiny_config(tmp_path / "x" / "train", toy_manifest)
    assert resolve_manifest(cfg) == toy_manifest.resolve()  # data.manifest is used as it is
    rooted = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"manifest": None, "root": str(toy_root)})}
    )
    assert resolve_manifest(rooted) == (tmp_path / "x" / MANIFEST_FILE).resolve()
    assert resolve_manifest(rooted).is_file()  # a second call reuses the same audit


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val_acc", "max"), ("val_f1_macro", "max"), ("val_loss", "min"), ("log_loss", "min")],
)
def test_metric_direction(metric: str, mode: str) -> None:
    assert metric_mode(metric) == mode
    assert best_of([3.0, 1.0, 2.0], float, metric_mode(metric)) == (3.0 if mode == "max" else 1.0)


def test_best_checkpoint_follows_the_mode_and_epochs_read_as_numbers(tmp_path: Path) -> None:
    for name, loss in (("checkpoint_a", 0.5), ("checkpoint_b", 0.9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"metrics": {"val_loss": loss}}))
    assert best_checkpoint(tmp_path, "val_loss", metric_mode("val_loss"))[0].name == "checkpoint_a"
    (tmp_path / "epochs.csv").write_text("epoch,val_acc\n0,0.5\n1,0.75\n")
    assert read_epochs(tmp_path) == [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1, "val_acc": 0.75}]
