"""The transfer benchmark's parts without training: its levers are valid config changes of the
recipe, runs resume from the JSON, and the table is made from the JSON alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import transfer_bench, transfer_report
from carclf.config import load_config

RECIPE = Path(__file__).parents[1] / "jobs" / "configs" / "finetune-cpu.yaml"


@pytest.mark.parametrize("lever", transfer_bench.LEVERS, ids=lambda lever: lever[0])
def test_every_lever_is_a_valid_change_of_the_recipe(lever: tuple, tmp_path: Path) -> None:
    name, overrides, _ = lever
    cfg = transfer_bench.run_config(RECIPE, tmp_path / "m.parquet", 3, overrides, tmp_path)
    assert cfg.seed == 3 and cfg.scaling.num_workers == 1 and cfg.data.root is None
    plain = load_config(RECIPE)
    if name == "recipe":
        assert cfg.train == plain.train and cfg.model == plain.model


def _run(lever: str, seed: int, test: float, probe: float, epoch: int = 3) -> dict:
    return {
        "lever": lever,
        "seed": seed,
        "overrides": [] if lever == "recipe" else [f"train.{lever}"],
        "val_acc": 0.5,
        "best_epoch": epoch,
        "backbone_trained": epoch >= 1,
        "val_curve": [0.4, 0.5],
        "train_s": 120.0,
        "test_acc": test,
        "test_acc_flip": test + 0.01,
        "probe_test_acc": probe,
        "probe_flip_test_acc": probe + 0.02,
        "gain": test - probe,
        "gain_flip": test + 0.01 - probe,
    }


def test_the_table_has_one_row_per_lever_with_its_spread_and_gain(tmp_path: Path) -> None:
    runs = [_run("recipe", 0, 0.60, 0.50), _run("recipe", 1, 0.70, 0.60, epoch=0)]
    runs += [_run("lr=1", 0, 0.55, 0.50), _run("lr=1", 1, 0.75, 0.60)]
    rows = transfer_report.lever_rows(runs)
    assert [r["lever"] for r in rows] == ["recipe", "lr=1"]
    recipe, lever = rows
    assert recipe["test acc"] == "65.0 ± 7.1" and recipe["gain over probe"] == "10.0 ± 0.0"
    assert recipe["backbone epoch kept"] == "1/2" and recipe["worst gain"] == "+10.0"
    assert lever["vs recipe"] == "0.0 ± 7.1" and lever["probe + flip"] == "57.0 ± 7.1"
    path = transfer_report.write_markdown({"runs": runs, "recipe": "r.yaml"}, tmp_path / "t.md")
    text = path.read_text()
    assert "| recipe | — | 2 | 65.0 ± 7.1 |" in text and "0.40 0.50" in text


def test_runs_already_measured_are_kept_and_the_markdown_rewritten(tmp_path: Path) -> None:
    out = tmp_path / "transfer"
    results = {"runs": [_run("recipe", 0, 0.6, 0.5)], "probes": {}}
    transfer_bench.save(results, out)
    assert transfer_bench.load_results(out.with_suffix(".json")) == results
    transfer_bench.main(["--out", str(out), "--report-only"])
    assert "| recipe |" in out.with_suffix(".md").read_text()


def test_a_changed_recipe_reuses_the_runs_it_repeats_and_sets_the_rest_apart(
    tmp_path: Path,
) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(RECIPE.read_text().replace("  lr: 0.0003\n", "  lr: 0.0001\n"))
    work, out = tmp_path / "work", tmp_path / "transfer"
    results = {"runs": [], "probes": {}}
    sha = transfer_bench.remember_recipe(results, old)
    for lever, overrides in [("lr=3e-4", ["train.lr=0.0003"]), ("ema", ["train.ema_decay=0.9"])]:
        cfg = transfer_bench.run_config(old, work / "split0" / "m.parquet", 0, overrides, work)
        key = transfer_bench.run_key(cfg)
        results["runs"].append(_run(lever, 0, 0.6, 0.5) | {"key": key, "recipe_sha": sha})
    # Where a run writes and which scratch directory holds its split are not part of it.
    moved = transfer_bench.run_config(old, tmp_path / "split0" / "x.parquet", 0, [], tmp_path)
    assert transfer_bench.run_key(moved) == transfer_bench.run_key(
        transfer_bench.run_config(old, work / "split0" / "m.parquet", 0, [], work)
    )
    args = transfer_bench.parse_args(["--recipe", str(RECIPE), "--out", str(out)])
    transfer_bench.remember_recipe(results, RECIPE)
    transfer_bench.mark_current(results, args, work)
    again, earlier = results["runs"]
    assert again["lever"] == "recipe" and again["current"] and not earlier["current"]
    text = out.with_suffix(".md").read_text()
    assert "| recipe | — | 1 |" in text
    assert "## Measured on an earlier recipe" in text and "`train.lr=0.0001`" in text
