"""``carclf baseline``: evaluate's files, the C grid, the CLI, compare beside a run, refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from carclf.baseline import run_baseline
from carclf.cli import main
from carclf.config import Config, save_config
from carclf.errors import UserInputError
from carclf.evaluate import compare, read_predictions
from carclf.metrics import full_metrics
from carclf.probe import C_GRID

from .conftest import tiny_config

EVALUATE_FILES = ("predictions.parquet", "metrics.json")


@pytest.fixture(scope="module")
def probe_cfg(toy_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The tiny scratch CNN (random init, 32 px) on the toy manifest, output in ``<tmp>/train``."""
    return tiny_config(tmp_path_factory.mktemp("probe") / "train", toy_manifest)


@pytest.fixture(scope="module")
def probed(probe_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A baseline of the test split, written once for the module."""
    return run_baseline(probe_cfg, "test", tmp_path_factory.mktemp("probed") / "out").out_dir


def _config_file(cfg: Config, folder: Path) -> str:
    return str(save_config(cfg, folder, "cfg.yaml"))


def _manifest_without(manifest: Path, out: Path, keep) -> Path:
    """A copy of ``manifest`` (label map and all) with only the rows ``keep(table)`` selects."""
    table = pq.read_table(manifest)
    pq.write_table(table.filter(keep(table)), out)
    return out


def test_writes_evaluates_files_and_records_the_grid(
    probed: Path, probe_cfg: Config, toy_manifest: Path
) -> None:
    for name in (*EVALUATE_FILES, "baseline.json", "config.yaml"):
        assert (probed / name).is_file(), name
    metrics = json.loads((probed / "metrics.json").read_text())
    dummy = full_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    assert set(metrics) == set(dummy) | {"temperature_scaling"}
    assert set(metrics["summary"]) == set(dummy["summary"])
    assert metrics["temperature_scaling"]["temperature"] == 1.0

    paths, y_true, probs, labels = read_predictions(probed / "predictions.parquet")
    assert len(paths) == metrics["n"] == 28 and len(labels) == 7  # 7 classes x 4 test images
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    assert metrics["summary"]["acc"] == pytest.approx(float((probs.argmax(1) == y_true).mean()))

    record = json.loads((probed / "baseline.json").read_text())
    assert record["model"] == "scratch_cnn" and record["pretrained"] is False
    assert record["feature_dim"] == 128  # the scratch CNN's dense layer feeds its classifier
    assert record["n"] == {"train": 84, "val": 28, "test": 28}
    assert record["manifest"] == str(toy_manifest.resolve()) and record["split"] == "test"
    grid = {row["C"]: row["val_acc"] for row in record["C_grid"]}
    assert sorted(grid) == sorted(C_GRID)
    best = max(grid.values())
    assert record["chosen_C"] == min(c for c, acc in grid.items() if acc == best)
    assert set(record["seconds"]) == {"model", "features", "fit"}
    assert record["acc"] == metrics["summary"]["acc"]


def test_is_deterministic_and_probes_the_input_of_an_mlp_head(
    probed: Path, probe_cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    again = run_baseline(probe_cfg, "test", tmp_path / "again")
    first = pq.read_table(probed / "predictions.parquet")
    assert pq.read_table(again.out_dir / "predictions.parquet").equals(first)

    config = _config_file(probe_cfg, tmp_path)
    code = main(["baseline", "--config", config, "--set", "model.head_hidden=32"])
    out, err = capsys.readouterr()
    default_out = Path(probe_cfg.output_dir).resolve().parent / "baseline"  # beside it
    assert code == 0 and out.strip().splitlines()[-1] == str(default_out)
    assert "linear probe of scratch_cnn (128 features, C=" in err and "test acc " in err
    record = json.loads((default_out / "baseline.json").read_text())
    assert record["head_hidden"] == 32 and record["feature_dim"] == 128  # the whole head's input


def test_compare_puts_the_baseline_beside_a_run(
    probed: Path, fake_run: Path, toy_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    code = main(
        ["compare", str(fake_run), str(probed), "--manifest", str(toy_manifest), "--out", str(out)]
    )
    assert code == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["model"] for r in rows] == [str(fake_run), f"linear probe: {probed}"]
    metrics = json.loads((probed / "metrics.json").read_text())
    assert float(rows[1]["acc"]) == pytest.approx(metrics["summary"]["acc"])
    assert int(rows[1]["n"]) == int(rows[0]["n"]) == metrics["n"]
    evaluated = json.loads((out / f"0_{fake_run.name}" / "metrics.json").read_text())
    assert set(evaluated) == set(metrics)  # tools that read evaluate's metrics.json read it
    assert not (out / f"1_{probed.name}").exists()  # read as written, not evaluated again


def test_compare_refuses_a_baseline_of_another_split(
    probed: Path, probe_cfg: Config, toy_manifest: Path, tmp_path: Path, capsys
) -> None:
    on_val = run_baseline(probe_cfg, "val", tmp_path / "val").out_dir
    compare([probed, probed], toy_manifest, "test", tmp_path / "two")  # two baselines: fine
    assert len(list(csv.DictReader((tmp_path / "two" / "comparison.csv").open()))) == 2
    with pytest.raises(UserInputError, match=r"made on split 'val'.*on split 'test'"):
        compare([probed, on_val], toy_manifest, "test", tmp_path / "cmp")
    argv = ["compare", str(on_val), "--manifest", str(toy_manifest), "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(toy_manifest.resolve()) in err and "'val'" in err and "'test'" in err


def test_unusable_splits_exit_2(
    probe_cfg: Config, toy_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = _config_file(probe_cfg, tmp_path)
    no_val = _manifest_without(
        toy_manifest, tmp_path / "no_val.parquet", lambda t: pc.not_equal(t["split"], "val")
    )
    first_label = pq.read_table(toy_manifest)["label"][0].as_py()
    one_class = _manifest_without(
        toy_manifest,
        tmp_path / "one_class.parquet",
        lambda t: pc.or_(pc.not_equal(t["split"], "train"), pc.equal(t["label"], first_label)),
    )
    cases = {
        "split 'bogus' has no images": ["--split", "bogus"],
        "split 'val' has no images": ["--set", f"data.manifest={no_val}"],
        "the train split has one class only": ["--set", f"data.manifest={one_class}"],
    }
    for message, extra in cases.items():
        argv = ["baseline", "--config", config, "--out", str(tmp_path / "x"), *extra]
        assert main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("carclf: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # refused before anything is written
