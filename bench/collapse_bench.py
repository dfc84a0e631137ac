"""Are the collapse labels right? Rerun every trial a search labelled collapsed, unstopped.

A search (default: the ablation demo, ``jobs/configs/ablation-demo.yaml``, on the embedded toy
set, into a temporary directory; or ``--search DIR``, an experiment directory a
``carclf tune`` already wrote) stops a trial as soon as :func:`carclf.collapse.detect_collapse`
labels it. This benchmark takes each labelled trial's own ``config.yaml`` from its run
directory and trains it again to its full epoch budget, in this process, without the stopper.
A trial that then leaves chance (the collapse rule, applied to its last epoch, no longer fires)
was a false positive. Writes ``collapse_labels.json`` and ``collapse_labels.md`` into ``--out``.

    python -m bench.collapse_bench [--search runs/ablation-demo] [--out bench/results]
        [--set tune.num_samples=16 …]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from carclf.collapse import CollapseRule, detect_collapse
from carclf.config import Config, load_config
from carclf.data.audit import write_audit
from carclf.data.manifest import read_manifest
from carclf.data.synth import write_toy_dataset
from carclf.runs import read_epochs
from carclf.search.tune import run_tune
from carclf.tables import markdown_table, number_cell
from carclf.train import fit_local, prepare_run


def run_search(config: str, overrides: list[str], work: Path) -> Path:
    """The search whose labels are checked, on the embedded toy set; its experiment directory."""
    root = write_toy_dataset(work / "toy")
    manifest = write_audit(root, work / "toy.parquet")
    cfg = load_config(config, [*overrides, f"data.manifest={manifest}", f"output_dir={work / 's'}"])
    return run_tune(cfg)


def trial_rows(search: Path) -> list[dict[str, str]]:
    """Every trial of ``search``'s ``trials.csv``."""
    with (search / "trials.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def rerun(row: dict[str, str], rule: CollapseRule, work: Path) -> dict[str, Any]:
    """Train one labelled trial's config again to its last epoch; the verdict at the end."""
    run_dir = Path(row["run_dir"])
    raw = load_config(run_dir / "config.yaml").model_dump(mode="json")
    raw["output_dir"] = str(work / run_dir.name)
    raw["scaling"] |= {"num_workers": 1, "cpus_per_worker": float(os.cpu_count() or 1)}
    cfg = Config.model_validate(raw)
    started = time.perf_counter()
    fit_local(cfg, prepare_run(cfg), lambda _m: None)
    history = read_epochs(Path(cfg.output_dir))
    classes = len(read_manifest(cfg.data.manifest).labels)
    verdict = detect_collapse(history, classes, rule)
    return {
        "trial": row["trial"],
        "study": row["study"],
        "label": row["collapse_reason"],
        "labelled_at_epoch": int(row["epochs"]),
        "epochs_rerun": len(history),
        "best_val_acc": max(float(h["val_acc"]) for h in history),
        "last_val_acc": float(history[-1]["val_acc"]),
        "chance": 1.0 / classes,
        "verdict_at_end": verdict or "",
        "false_positive": verdict is None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _minutes(seconds: float | None) -> str:
    return "search time not measured here" if seconds is None else f"search {seconds / 60:.1f} min"


def write_results(result: dict[str, Any], out: Path) -> None:
    """``collapse_labels.json`` and its Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "collapse_labels.json").write_text(json.dumps(result, indent=1))
    trials = result["trials"]
    lines = [
        "# Collapse labels checked: every labelled trial rerun to its full budget, unstopped",
        "",
        f"Search `{result['search']}` ({result['trials_in_search']} trials, "
        f"{len(trials)} labelled collapsed, {_minutes(result['search_s'])}); "
        f"{result['machine']}. A false positive is a "
        "labelled trial that, trained to its last epoch without the stopper, no longer "
        "shows collapse at the end. Made by `python -m bench.collapse_bench`.",
        "",
        f"**False positives: {result['false_positives']} of {len(trials)}.**",
        "",
    ]
    if trials:
        # Tune's directory name; its first parts are the trial's id.
        shown = [t | {"trial": "_".join(t["trial"].split("_")[:3])} for t in trials]
        lines += markdown_table(shown, number_cell(digits=3))
    (out / "collapse_labels.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--search", help="an experiment directory of `carclf tune` (default: run one)")
    p.add_argument("--config", default="jobs/configs/ablation-demo.yaml")
    p.add_argument("--set", action="append", default=[], help="override of the search's config")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="collapse-bench-"))
    started = time.perf_counter()
    search = Path(args.search) if args.search else run_search(args.config, args.set, work)
    search_s = None if args.search else round(time.perf_counter() - started, 1)
    if not args.search:  # the search's own comparison, kept beside the labels' check
        Path(args.out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(search / "comparison.md", Path(args.out) / "ablation_comparison.md")
    if not (search / "trials.csv").is_file():
        raise SystemExit(f"{search}: no trials.csv (not a finished `carclf tune` experiment)")
    rows = trial_rows(search)
    rule = load_config(search / "config.yaml").tune.collapse  # the rule that labelled them
    trials = [rerun(r, rule, work / "rerun") for r in rows if r["collapsed"] == "True"]
    write_results(
        {
            "search": str(args.search or f"{args.config} on the toy set"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "trials_in_search": len(rows),
            "search_s": search_s,
            "false_positives": sum(t["false_positive"] for t in trials),
            "trials": trials,
        },
        Path(args.out),
    )


if __name__ == "__main__":
    main()
