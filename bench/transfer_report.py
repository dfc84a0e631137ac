"""The Markdown of the transfer benchmark (:mod:`bench.transfer_bench`), from its JSON alone."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml

from carclf.tables import markdown_table


def _mean_sd(values: list[float], scale: float = 100.0) -> str:
    """``mean ± sd`` in points (sd over seeds; none for one)."""
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def _probe_flips(runs: list[dict[str, Any]]) -> list[float]:
    """The probes' flip-TTA accuracies, where every run of the lever has one."""
    found = [r.get("probe_flip_test_acc") for r in runs]
    return [] if None in found else found


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.0001, …}`` of a nested config."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {
        k: v
        for key, sub in tree.items()
        for k, v in _flat(sub, f"{prefix}.{key}" if prefix else str(key)).items()
    }


def recipe_change(results: dict[str, Any], sha: str | None) -> str:
    """How the recipe of digest ``sha`` differed from the current one (``train.lr=0.0001``)."""
    texts = results.get("recipes", {})
    if sha not in texts or results.get("recipe_sha") not in texts:
        return "?"
    was = _flat(yaml.safe_load(texts[sha]))
    now = _flat(yaml.safe_load(texts[results["recipe_sha"]]))
    keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
    return " ".join(f"`{k}={was.get(k)}`" for k in keys) or "—"


def lever_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per lever, the recipe first, then in the order they were measured: means over
    its seeds."""
    order = sorted(dict.fromkeys(r["lever"] for r in runs), key=lambda lever: lever != "recipe")
    base = {r["seed"]: r for r in runs if r["lever"] == "recipe"}
    rows = []
    for lever in order:
        mine = [r for r in runs if r["lever"] == lever]
        vs_recipe = [r["test_acc"] - base[r["seed"]]["test_acc"] for r in mine if r["seed"] in base]
        rows.append(
            {
                "lever": lever,
                "change": " ".join(f"`{o}`" for o in mine[0]["overrides"]) or "—",
                "seeds": len(mine),
                "test acc": _mean_sd([r["test_acc"] for r in mine]),
                "probe": _mean_sd([r["probe_test_acc"] for r in mine]),
                "gain over probe": _mean_sd([r["gain"] for r in mine]),
                "worst gain": f"{min(r['gain'] for r in mine) * 100:+.1f}",
                "vs recipe": _mean_sd(vs_recipe) if vs_recipe and lever != "recipe" else "—",
                "flip TTA": _mean_sd([r["test_acc_flip"] for r in mine]),
                "flip gain": _mean_sd([r["gain_flip"] for r in mine]),
                "probe + flip": _mean_sd(flips) if (flips := _probe_flips(mine)) else "—",
                "val acc": _mean_sd([r["val_acc"] for r in mine]),
                "backbone epoch kept": f"{sum(r['backbone_trained'] for r in mine)}/{len(mine)}",
                "train min": f"{statistics.fmean(r['train_s'] for r in mine) / 60:.1f}",
            }
        )
    return rows


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    """``transfer.md``: the lever table, then every run's validation curve."""
    runs = [r for r in results.get("runs", []) if r.get("current", True)]
    earlier = [r for r in results.get("runs", []) if not r.get("current", True)]
    lines = [
        "# Fine-tuning levers on real photos, each beside its linear probe",
        "",
        f"Recipe `{results.get('recipe', '?')}` on `{results.get('data', '?')}`, split 60/20/20 "
        f"per seed (the seed also seeds training); {results.get('machine', '')}. Accuracies "
        "in points on each split's test images, mean ± sd over seeds. *probe*: logistic "
        "regression on the frozen weights of the same backbone at the same resolution "
        "(`carclf baseline`); *vs recipe*: the change against the recipe on the same seeds; "
        "*flip TTA*: the kept checkpoint scored on each image and its mirror (*flip gain*: "
        "over the probe without it; *probe + flip*: the probe scored the same way); *backbone "
        "epoch "
        "kept*: runs whose kept checkpoint (best validation accuracy) comes from an epoch that "
        "trained the backbone. Made by `python -m bench.transfer_bench` "
        "(`make bench-transfer`).",
        "",
    ]
    if runs:
        lines += markdown_table(lever_rows(runs), lambda _k, v: str(v))
        lines += ["", "## Validation accuracy per epoch", ""]
        curves = [
            {
                "lever": r["lever"],
                "seed": r["seed"],
                "kept epoch": r["best_epoch"],
                "val acc by epoch": " ".join(f"{v:.2f}" for v in r["val_curve"]),
            }
            for r in runs
        ]
        lines += markdown_table(curves, lambda _k, v: str(v))
    if earlier:
        lines += [
            "",
            "## Measured on an earlier recipe",
            "",
            "Runs of a lever on a recipe that has since changed, and that no lever of the "
            "current recipe repeats; *recipe was*: how that recipe differed from the current "
            "one. Each beside the probe of its own split.",
            "",
        ]
        rows = lever_rows(earlier)
        for row in rows:
            shas = {r.get("recipe_sha") for r in earlier if r["lever"] == row["lever"]}
            row["recipe was"] = " ".join(recipe_change(results, sha) for sha in shas)
            row.pop("vs recipe")
        lines += markdown_table(rows, lambda _k, v: str(v))
    path.write_text("\n".join(lines) + "\n")
    return path
