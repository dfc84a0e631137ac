"""Serving benchmark, measured side by side in one run on one bundle.

1. HTTP ``:predict`` throughput and p50/p99 latency with N concurrent clients, against the same
   model's in-process decode + preprocess + onnxruntime throughput at the same thread count.
2. onnxruntime against PyTorch eager on the same preprocessed batches, same threads: at
   ``--threads`` and batch 1 (the headline), and at 1 thread / every core × batch 1 / 8.
3. ``:explain`` latency against ``:predict`` latency, one request at a time.

Writes ``serve.json`` and ``serve.md`` under ``--out``; prints the Markdown path last.
Usage: ``python -m bench.serve_bench BUNDLE [--clients 4] [--requests 200] [--threads 1]``, or
``--arch efficientnet_b0`` instead of a bundle to export an untrained model of that architecture
(speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from carclf.bundle import load_bundle
from carclf.config import validate_config
from carclf.data.audit import write_audit
from carclf.data.synth import write_toy_dataset
from carclf.data.transforms import load_image
from carclf.explain import Explainer
from carclf.export import export_run
from carclf.inference import OnnxClassifier
from carclf.train import init_run
from serve.app import AppArgs
from serve.client import wait_ready
from serve.launch import start_app


def photos(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of a few photo-like sizes (smooth noise, so they compress like photos)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = [(640, 480), (800, 600), (1024, 768)][i % 3]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(seconds: list[float]) -> dict[str, float]:
    """Latency percentiles in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def untrained_bundle(arch: str, img_size: int, out: Path) -> str:
    """Export an untrained ``arch`` through the real export path (parity check included)."""
    root = write_toy_dataset(out / "toy", per_class=(4, 2, 2), size=img_size)
    manifest = write_audit(root, out / "manifest.parquet")
    cfg = validate_config(
        {
            "output_dir": str(out / "run"),
            "data": {"manifest": str(manifest)},
            "model": {"name": arch, "pretrained": False, "img_size": img_size},
            "train": {"batch_size": 4},
            "export": {"parity_images": 4},
        }
    )
    return str(export_run(init_run(cfg), out / "bundle", name=arch).path)


def in_process(bundle_path: str, images: list[bytes], threads: int) -> dict[str, float]:
    """Decode + preprocess + onnxruntime, one image at a time, as a replica does at batch 1."""
    clf = OnnxClassifier(load_bundle(bundle_path), threads=threads)
    clf.probabilities([load_image(images[0])])  # warm-up
    start = time.perf_counter()
    for data in images:
        clf.probabilities([load_image(data)])
    return {"images_per_s": len(images) / (time.perf_counter() - start)}


def onnx_vs_eager(
    bundle_path: str, images: list[bytes], threads: int, batch: int = 1, block: int = 5
) -> dict[str, float]:
    """Forward passes only, on the same preprocessed batches, at the same thread count.

    The two run in alternating blocks of ``block`` batches: a busy neighbour slows both alike,
    and neither runs while the other's thread pool is still spinning down.
    """
    bundle = load_bundle(bundle_path)
    clf = OnnxClassifier(bundle, threads=threads)
    model = Explainer.from_bundle(bundle).model
    torch.set_num_threads(threads)
    decoded = [load_image(d) for d in images]
    batches = [clf.preprocess(decoded[i : i + batch]) for i in range(0, len(decoded), batch)]
    batches = [b for b in batches if len(b) == batch]

    def eager(b: np.ndarray) -> None:
        with torch.inference_mode():
            model(torch.from_numpy(b))

    runs = {"eager": eager, "onnx": clf.logits}
    seconds = dict.fromkeys(runs, 0.0)
    for run in runs.values():  # warm-up: first-call allocations and kernel selection
        run(batches[0])
    for i in range(0, len(batches), block):
        for key, run in runs.items():
            t0 = time.perf_counter()
            for b in batches[i : i + block]:
                run(b)
            seconds[key] += time.perf_counter() - t0
    onnx, eager_rate = (len(batches) * batch / seconds[k] for k in ("onnx", "eager"))
    return {
        "threads": threads,
        "batch": batch,
        "onnx_images_per_s": onnx,
        "eager_images_per_s": eager_rate,
        "onnx_over_eager": onnx / eager_rate,
    }


def framework_grid(bundle_path: str, images: list[bytes], cpus: int) -> list[dict[str, float]]:
    """onnxruntime against eager at one thread and at every core, at batch 1 and 8."""
    return [
        onnx_vs_eager(bundle_path, images[: 40 * batch], threads, batch)
        for threads in sorted({1, cpus})
        for batch in (1, 8)
    ]


async def http_load(url: str, images: list[bytes], clients: int) -> dict[str, float]:
    """``clients`` concurrent clients sending raw JPEGs to ``:predict`` until all are sent."""
    queue = list(images)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            data = queue.pop()
            t0 = time.perf_counter()
            r = await http.post(url, content=data, headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"images_per_s": len(images) / elapsed, **rate(latencies)}


def sequential(url: str, images: list[bytes]) -> dict[str, float]:
    latencies = []
    with httpx.Client(timeout=120) as http:
        for data in images:
            t0 = time.perf_counter()
            r = http.post(url, content=data, headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
    return rate(latencies)


def served(args: argparse.Namespace, name: str, images: list[bytes]) -> dict[str, dict]:
    import ray
    from ray import serve

    ray.init(include_dashboard=False, logging_config=ray.LoggingConfig(log_level="WARNING"))
    try:
        app_args = AppArgs(
            bundles=[args.bundle],
            classifier_cpus=float(args.threads),
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_timeout_s,
        )
        base = start_app(app_args, port=args.port, name="bench")
        wait_ready(base)
        predict = f"{base}/v1/models/{name}:predict"
        sequential(predict, images[:5])  # warm-up
        return {
            "http": asyncio.run(http_load(predict, images, args.clients)),
            "predict_latency": sequential(predict, images[: args.explain_requests]),
            "explain_latency": sequential(
                f"{base}/v1/models/{name}:explain", images[: args.explain_requests]
            ),
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait(seconds: float | None) -> str:
    return "the app's default wait" if seconds is None else f"waiting at most {seconds * 1000:g} ms"


def markdown(r: dict) -> str:
    http, local, fw = r["http"], r["in_process"], r["onnx_vs_eager"]
    pred, expl = r["predict_latency"], r["explain_latency"]
    return "\n".join(
        [
            f"# Serving benchmark: {r['model']} ({r['arch']}, input {r['input_size']})",
            "",
            f"{r['requests']} JPEGs (640x480 to 1024x768), {r['clients']} HTTP clients, "
            f"{r['threads']} onnxruntime/torch thread(s), {r['cpus']} CPUs, batches of up to "
            f"{r['max_batch_size']} ({_wait(r['batch_wait_timeout_s'])}); "
            f"the bundle's model.onnx is {r['precision']}.",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| HTTP predict throughput | {http['images_per_s']:.1f} img/s |",
            f"| HTTP predict p50 / p99 | {http['p50_ms']:.1f} / {http['p99_ms']:.1f} ms |",
            f"| in-process decode+preprocess+onnxruntime | {local['images_per_s']:.1f} img/s |",
            f"| **HTTP / in-process** | **{r['http_over_in_process']:.2f}** |",
            f"| onnxruntime forward | {fw['onnx_images_per_s']:.1f} img/s |",
            f"| PyTorch eager forward | {fw['eager_images_per_s']:.1f} img/s |",
            f"| **onnxruntime / eager** | **{fw['onnx_over_eager']:.2f}** |",
            f"| predict p50 (one at a time) | {pred['p50_ms']:.1f} ms |",
            f"| explain p50 (one at a time) | {expl['p50_ms']:.1f} ms |",
            f"| **explain / predict (p50)** | **{r['explain_over_predict']:.2f}** |",
            "",
            "onnxruntime against PyTorch eager, forward passes only, alternating blocks:",
            "",
            "| threads | batch | onnxruntime img/s | eager img/s | onnxruntime / eager |",
            "| --- | --- | --- | --- | --- |",
            *(
                f"| {g['threads']} | {g['batch']} | {g['onnx_images_per_s']:.1f} | "
                f"{g['eager_images_per_s']:.1f} | **{g['onnx_over_eager']:.2f}** |"
                for g in r["onnx_vs_eager_grid"]
            ),
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", nargs="?", help="a bundle directory (or use --arch)")
    p.add_argument("--arch", help="benchmark an untrained bundle of this timm architecture")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--explain-requests", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime/torch threads")
    defaults = AppArgs(bundles=["-"])
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    p.add_argument("--batch-wait-timeout-s", type=float, help="default: the app's (0 on CPU)")
    p.add_argument("--port", type=int, default=8770)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if bool(args.bundle) == bool(args.arch):
        p.error("give a bundle or --arch, not both")
    if args.arch:
        print(f"exporting an untrained {args.arch} …", file=sys.stderr)
        tmp = tempfile.TemporaryDirectory()
        args.bundle = untrained_bundle(args.arch, args.img_size, Path(tmp.name))
    info = load_bundle(args.bundle).info
    images = photos(max(args.requests, 320))  # the batch-8 comparison takes 40 batches
    cpus = len(os.sched_getaffinity(0))
    print("in-process and framework comparison …", file=sys.stderr)
    grid = framework_grid(args.bundle, images, cpus)
    images = images[: args.requests]
    result = {
        "model": info.name,
        "arch": info.arch,
        "input_size": list(info.input_size),
        "requests": args.requests,
        "clients": args.clients,
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "cpus": cpus,
        "precision": "int8" if info.metrics.get("quantization", {}).get("kept") else "fp32",
        "in_process": in_process(args.bundle, images, args.threads),
        "onnx_vs_eager": onnx_vs_eager(args.bundle, images[:40], args.threads),
        "onnx_vs_eager_grid": grid,
    }
    print("HTTP through Ray Serve …", file=sys.stderr)
    result.update(served(args, info.name, images))
    result["http_over_in_process"] = (
        result["http"]["images_per_s"] / result["in_process"]["images_per_s"]
    )
    result["explain_over_predict"] = (
        result["explain_latency"]["p50_ms"] / result["predict_latency"]["p50_ms"]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    (out / "serve.md").write_text(markdown(result))
    print(markdown(result), file=sys.stderr)
    print(out / "serve.md")


if __name__ == "__main__":
    main()
