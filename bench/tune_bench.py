"""Does ASHA + Optuna beat plain random search for the same number of trials, and for how much less?

Runs one study of a tune config twice on the embedded toy set, with the same ``num_samples``:

* **asha+optuna**: Optuna's TPE behind a ConcurrencyLimiter, ASHA and the collapse stopper;
* **fifo+random**: Tune's random search without early stopping: every trial to its last epoch
  (FIFO), collapsed ones labelled but not stopped (``tune.stop_collapsed=false``).

Reports, for each, the best validation accuracy and the test accuracy of that trial, the number
of trial-epochs trained and that as a fraction of ``num_samples × epochs``, the wall time; and
the ratios between the arms (trial-epochs, seconds) and the gap between the two bests. Writes
``tune_bench.json`` and ``tune_bench.md`` into ``--out``. ASHA's grace period and reduction
factor and TPE's random start-up trials are flags (defaults 1, 4 and 5), applied to both arms
(only the ASHA arm uses them). Both arms train on the whole embedded training split
(``data.train_per_class=null``, not the ablation demo's 40 images per class: there the scratch
CNN is still at a fraction of its accuracy after 12 epochs, and no early rung ranks it).

    python bench/tune_bench.py [--config jobs/configs/ablation-demo.yaml] [--study scratch]
        [--samples 16] [--epochs 12] [--grace-period 1] [--reduction-factor 4] [--startup-trials 5]
        [--set train.epochs=4 …]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from carclf.config import load_config
from carclf.data.audit import write_audit
from carclf.data.synth import write_toy_dataset
from carclf.search.tune import run_tune

# The baseline is the search a user would run without carclf's scheduling: random points, each
# trained to its last epoch, collapsed ones included (labelled, not stopped).
ARMS = {
    "asha+optuna": ["tune.searcher=optuna", "tune.scheduler=asha"],
    "fifo+random": ["tune.searcher=random", "tune.scheduler=fifo", "tune.stop_collapsed=false"],
}


def run_arm(args: argparse.Namespace, manifest: Path, work: Path, arm: str) -> dict:
    """One search; its best validation accuracy and the trial-epochs it trained."""
    overrides = [
        f"train.epochs={args.epochs}",
        f"tune.grace_period={args.grace_period}",
        f"tune.reduction_factor={args.reduction_factor}",
        f"tune.startup_trials={args.startup_trials}",
        "data.train_per_class=null",
        *args.set,
        f"data.manifest={manifest}",
        f"output_dir={work / arm}",
        *ARMS[arm],
        f"tune.num_samples={args.samples}",
    ]
    cfg = load_config(args.config, overrides)
    study = cfg.tune.studies[args.study]
    # --epochs is every trial's budget here, whatever the study's own override says.
    study.overrides.pop("train.epochs", None)
    cfg.tune.studies = {args.study: study}
    start = time.perf_counter()
    out = run_tune(cfg)
    seconds = time.perf_counter() - start
    with (out / "trials.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    accs = [float(r["best_val_acc"]) for r in rows if r["best_val_acc"]]
    epochs = sum(int(r["epochs"]) for r in rows)
    budget = args.samples * cfg.train.epochs
    with (out / "comparison.csv").open(newline="") as fh:
        test = next(csv.DictReader(fh))["test_acc"]  # the best healthy trial's
    return {
        "best_val_acc": max(accs) if accs else None,
        "test_acc": float(test) if test else None,
        "trials": len(rows),
        "collapsed": sum(r["collapsed"] == "True" for r in rows),
        "trial_epochs": epochs,
        "epoch_budget": budget,
        "epoch_fraction": epochs / budget,
        "seconds": round(seconds, 1),
        # Every trial's outcome, so a gap between the arms can be read back to its trials.
        "per_trial": [
            {
                "epochs": int(r["epochs"]),
                "best_val_acc": float(r["best_val_acc"]) if r["best_val_acc"] else None,
                "collapsed": r["collapsed"] == "True",
            }
            for r in rows
        ],
    }


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_bench.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Tune benchmark: ASHA + Optuna against random search (FIFO)",
        "",
        f"`{result['command']}` on {result['machine']}; study `{result['study']}` of "
        f"`{result['config']}`, {result['samples']} trials each, toy set.",
        "",
        "| arm | best val_acc | its test_acc | trials | collapsed | trial-epochs | of budget "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in result["arms"].items():
        test = "" if r["test_acc"] is None else f"{r['test_acc']:.3f}"
        lines.append(
            f"| {arm} | {r['best_val_acc']:.3f} | {test} | {r['trials']} | {r['collapsed']} | "
            f"{r['trial_epochs']} | {r['epoch_fraction']:.0%} | {r['seconds']} |"
        )
    lines += [
        "",
        f"Gap in best val_acc (asha+optuna − fifo+random): {result['gap']:+.3f}. "
        f"asha+optuna / fifo+random: trial-epochs {result['epoch_ratio']:.2f}, "
        f"seconds {result['seconds_ratio']:.2f}.",
    ]
    (out / "tune_bench.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/ablation-demo.yaml")
    parser.add_argument("--study", default="scratch")
    parser.add_argument("--samples", type=int, default=16)
    # ASHA's rungs at 1 and 4 epochs of 12 (a third rung at 3 x 3 = 9 of 12 spent most of a
    # trial before cutting it); the ablation demo's own grace period of 3 keeps every trial
    # until the collapse check can label it, which a search for the best model does not need.
    # Longer than the demo's 6 epochs: the room that ASHA's rungs cut in.
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each trial (ASHA max_t)")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA grace period (epochs)")
    parser.add_argument("--reduction-factor", type=float, default=4.0, help="ASHA reduction")
    parser.add_argument("--startup-trials", type=int, default=5, help="TPE's random start-up")
    parser.add_argument("--set", action="append", default=[], help="config override k=v")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = write_audit(write_toy_dataset(work / "toy"), work / "manifest.parquet")
        arms = {arm: run_arm(args, manifest, work, arm) for arm in ARMS}
    best = {arm: r["best_val_acc"] or 0.0 for arm, r in arms.items()}
    result = {
        "command": "python bench/tune_bench.py "
        + " ".join(f"--set {s}" for s in args.set)
        + f" --samples {args.samples} --study {args.study} --epochs {args.epochs}"
        f" --grace-period {args.grace_period}"
        f" --reduction-factor {args.reduction_factor} --startup-trials {args.startup_trials}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "config": args.config,
        "study": args.study,
        "samples": args.samples,
        "arms": arms,
        "gap": best["asha+optuna"] - best["fifo+random"],
        "epoch_ratio": arms["asha+optuna"]["trial_epochs"] / arms["fifo+random"]["trial_epochs"],
        "seconds_ratio": arms["asha+optuna"]["seconds"] / arms["fifo+random"]["seconds"],
    }
    write_results(result, Path(args.out))
    print(Path(args.out) / "tune_bench.md")


if __name__ == "__main__":
    main()
