"""Is training data-bound? Loader images/s next to the training step's images/s, for one config.

Measures, on this machine and without Ray (the per-worker code of ``carclf.train`` is plain
PyTorch):

* **loader**: the training DataLoader of ``carclf.train`` (decode with ``load_image`` + the train
  transform), iterated without a model, for each ``--loader-workers`` value;
* **loader, cached** (``data.cache``): the same loader once its in-memory cache of decoded,
  resized images is full (after one pass), without DataLoader workers;
* **Ray Data** (``--ray``, ``data.loader: ray``): ``carclf.data.raydata.build_datasets``' train
  dataset iterated with ``iter_torch_batches`` on a local Ray using every CPU, with and without
  ``data.cache``;
* **step**: ``carclf.train.train_one_epoch`` on batches already in memory (no decoding), i.e. what
  one Ray Train worker can consume.

If the loader is slower than the step, training waits on data: add DataLoader workers
(``data.num_workers``), cache decoded images, or shrink the images beforehand. Writes
``data_bench.json`` and ``data_bench.md`` into ``--out``.

    python bench/data_bench.py [--config C] [--manifest M] [--device cuda] [--ray]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from carclf.config import load_config
from carclf.data.audit import write_audit
from carclf.data.manifest import read_manifest
from carclf.data.synth import write_toy_dataset
from carclf.models import create_model, model_preprocess
from carclf.recipes import build_optimizer, build_step_tools
from carclf.train import build_loaders, train_one_epoch

WARMUP_BATCHES = 2


def loader_rate(loader: torch.utils.data.DataLoader, batches: int) -> float:
    """Images/s of iterating ``loader`` (after a warm-up that starts its worker processes)."""
    it = iter(loader)
    for _ in range(WARMUP_BATCHES):
        next(it)
    seen, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:  # a small data set: start another pass, as an epoch loop would
            it = iter(loader)
            images, _ = next(it)
        seen += len(images)
    return seen / (time.perf_counter() - start)


def cached_loader_rate(cfg, manifest, pre, batches: int) -> float:
    """Images/s of the training loader with ``data.cache`` once a full pass has filled it."""
    ccfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"num_workers": 0, "cache": True})}
    )
    train, _ = build_loaders(ccfg, manifest, pre, 0, cfg.scaling.num_workers)
    for _ in train:  # fill the cache
        pass
    return loader_rate(train, batches)


def ray_data_rates(cfg, manifest, pre, batches: int) -> dict[str, float]:
    """Images/s of the Ray Data train dataset, uncached and cached, on a local Ray."""
    import ray

    from carclf.data.raydata import build_datasets

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    batch = cfg.train.batch_size // cfg.scaling.num_workers
    rates = {}
    try:
        for cache in (False, True):
            rcfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": cache})})
            train = build_datasets(rcfg, manifest, pre)["train"]
            rates["cached" if cache else "uncached"] = loader_rate(
                _Repeat(lambda t=train: t.iter_torch_batches(batch_size=batch)), batches
            )
    finally:
        ray.shutdown()
    return rates


class _Repeat:
    """An iterable of ``(images, labels)`` that restarts a Ray Data iteration each pass."""

    def __init__(self, start) -> None:
        self.start = start

    def __iter__(self):
        return ((b["image"], b["label"]) for b in self.start())


def step_rate(cfg, num_classes: int, input_size: tuple, batches: int, device: str) -> float:
    """Images/s of ``train_one_epoch`` on random batches already on ``device``."""
    model = create_model(cfg.model, num_classes).to(device)
    batch = cfg.train.batch_size // cfg.scaling.num_workers  # one Ray Train worker's share
    data = [
        (torch.randn(batch, *input_size, device=device), torch.randint(0, num_classes, (batch,)))
        for _ in range(4)
    ]
    data = [(x, y.to(device)) for x, y in data]
    optimizer = build_optimizer(model, cfg)
    tools = build_step_tools(model, optimizer, cfg, num_classes, batches, torch.device(device))
    train_one_epoch(model, data[:WARMUP_BATCHES], optimizer, tools, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    runs = [data[i % len(data)] for i in range(batches)]
    start = time.perf_counter()
    stats = train_one_epoch(model, runs, optimizer, tools, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        return len(runs) * batch / (time.perf_counter() - start)
    return stats["images_per_s"]


def _manifest(cfg, given: str | None, scratch: Path) -> Path:
    if given:
        return Path(given)
    root = write_toy_dataset(scratch / "toy", seed=cfg.seed)  # the demo's data set
    return write_audit(root, scratch / "manifest.parquet")


def markdown(result: dict) -> str:
    """The result as a small Markdown report."""
    lines = [
        "# Data benchmark",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {result['machine']}. Model `{result['model']}` at {result['input_size']}, "
        f"{result['batch_per_worker']} images per batch per worker.",
        "",
        "| what | images/s |",
        "|---|---|",
        f"| training step on {result['device']} (data in memory) | {result['step']:.0f} |",
    ]
    for workers, rate in result["loader"].items():
        lines.append(f"| loader, {workers} DataLoader worker(s) | {rate:.0f} |")
    lines.append(f"| loader, data.cache (full), 0 workers | {result['loader_cached']:.0f} |")
    for kind, rate in result.get("ray_data", {}).items():
        lines.append(f"| Ray Data iterator, {kind}, {os.cpu_count()} CPUs | {rate:.0f} |")
    lines += ["", result["verdict"]]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/demo.yaml")
    parser.add_argument(
        "--manifest", help="default: the demo's toy data set, written to a temp dir"
    )
    parser.add_argument("--loader-workers", default="0,2", help="DataLoader workers to try")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one Ray worker's)")
    parser.add_argument("--ray", action="store_true", help="also time the Ray Data iterator")
    parser.add_argument("--out", default="bench/results")
    return parser


def _loader_rates(cfg, manifest, pre, args: argparse.Namespace) -> dict[str, float]:
    """Images/s of the training loader for each ``--loader-workers`` value, keyed by it."""
    loader = {}
    for workers in (int(w) for w in args.loader_workers.split(",")):
        wcfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": workers})})
        train, _ = build_loaders(wcfg, manifest, pre, 0, cfg.scaling.num_workers)
        loader[str(workers)] = loader_rate(train, args.batches)
        print(f"loader, {workers} workers: {loader[str(workers)]:.0f} images/s", file=sys.stderr)
    return loader


def _measure(cfg, manifest, pre, args: argparse.Namespace) -> dict:
    """Every rate of the benchmark: loader, cached loader, Ray Data (with --ray) and step."""
    loader = _loader_rates(cfg, manifest, pre, args)
    cached = cached_loader_rate(cfg, manifest, pre, args.batches)
    print(f"loader, cached: {cached:.0f} images/s", file=sys.stderr)
    ray_data = ray_data_rates(cfg, manifest, pre, args.batches) if args.ray else {}
    for kind, rate in ray_data.items():
        print(f"Ray Data, {kind}: {rate:.0f} images/s", file=sys.stderr)
    step = step_rate(cfg, len(manifest.labels), pre.input_size, args.batches, args.device)
    print(f"training step: {step:.0f} images/s", file=sys.stderr)
    return {"loader": loader, "loader_cached": cached, "ray_data": ray_data, "step": step}


def _verdict(rates: dict) -> str:
    """Whether the fastest way of loading keeps up with the training step."""
    best = max([*rates["loader"].values(), rates["loader_cached"], *rates["ray_data"].values()])
    step = rates["step"]
    if best < step:
        return (
            f"Data-bound: the fastest loader ({best:.0f}/s) is slower than the step ({step:.0f}/s)."
        )
    return f"Not data-bound: the loader ({best:.0f}/s) keeps up with the step ({step:.0f}/s)."


def _result(cfg, manifest, pre, rates: dict, args: argparse.Namespace, argv) -> dict:
    """The JSON record: the command, the machine, the config's model and batch, and the rates."""
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    return {
        "command": " ".join(["python bench/data_bench.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {device_name}, "
        f"torch {torch.__version__}, {args.threads} torch thread(s), "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "device": args.device,
        "model": cfg.model.name,
        "input_size": list(pre.input_size),
        "batch_per_worker": cfg.train.batch_size // cfg.scaling.num_workers,
        "images": len(manifest.split("train")),
        **rates,
        "verdict": _verdict(rates),
    }


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark; returns the Markdown report's path."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as scratch:
        manifest = read_manifest(_manifest(cfg, args.manifest, Path(scratch)))
        pre = model_preprocess(cfg.model)
        rates = _measure(cfg, manifest, pre, args)
    result = _result(cfg, manifest, pre, rates, args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_bench.json").write_text(json.dumps(result, indent=2))
    report = out / "data_bench.md"
    report.write_text(markdown(result))
    return report


if __name__ == "__main__":
    print(main())
