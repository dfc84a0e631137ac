"""Serving benchmark, measured side by side in one run on one bundle.

1. HTTP ``:predict`` throughput and p50/p99 latency at each of ``--clients`` concurrent
   clients (4 and 8 by default), against the same model's in-process decode + preprocess +
   onnxruntime throughput at the same thread count. The headline is the best of the levels,
   the saturation throughput, as a load tester's concurrency sweep reports it; each level's
   throughput and latency are in the results too.
2. onnxruntime against PyTorch eager on the same preprocessed batches, same threads: at
   ``--threads`` and batch 1 (the headline), and at 1 thread / every core × batch 1 / 8.
3. ``:explain`` latency against ``:predict`` latency, one request at a time.

Writes ``serve.json`` and ``serve.md`` (:mod:`bench.serve_report`) under ``--out``; prints the
Markdown path last.
Usage: ``python -m bench.serve_bench BUNDLE [--clients 4 8] [--requests 200] [--threads 1]``, or
``--arch efficientnet_b0`` instead of a bundle to export an untrained model of that architecture
(speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import harness
from bench.loadclient import http_load, keep_alive_load, sequential
from bench.serve_report import markdown
from carclf.bundle import load_bundle
from carclf.data.transforms import load_image
from carclf.explain import Explainer
from carclf.inference import OnnxClassifier
from carclf.runtime import usable_cpus
from serve.client import wait_ready
from serve.front import FRONTS, front_in_use
from serve.images import decode_image
from serve.launch import serve_env, start_app
from serve.settings import AppArgs, IngressSettings

# What serve.json records of the ingress: its Serve options, as of every deployment; not its
# request policy (the rest of its section: limits, deadlines, the API key).
INGRESS_SERVE_OPTIONS = {
    "num_replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "ray_actor_options",
}


def main() -> None:
    """Measure; write serve.json and serve.md under ``--out``; print the Markdown's path."""
    args = parse_args()
    info = load_bundle(args.bundle).info
    images = harness.photos(max(args.requests, 320))  # the batch-8 comparison takes 40 batches
    cpus = usable_cpus()
    print("in-process and framework comparison …", file=sys.stderr)
    grid = framework_grid(args.bundle, images, cpus)
    images = images[: args.requests]
    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python -m bench.serve_bench", *sys.argv[1:]]),
        "load_average": harness.load_average(),
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
        # Before Ray starts, for comparison: the rounds' in-process runs have the idle app
        # beside them, as the HTTP runs have.
        "in_process_alone": in_process(args.bundle, images, args.threads),
        "stages": stages(args.bundle, images[:60], args.threads),
        "onnx_vs_eager": onnx_vs_eager(args.bundle, images[:40], args.threads),
        "onnx_vs_eager_grid": grid,
    }
    print("HTTP through Ray Serve …", file=sys.stderr)
    result.update(served(args, info.name, images))
    result["serve_env"] = serve_env()  # as the Ray that served it got them
    result["front"] = front_in_use()
    result["explain_over_predict"] = (
        result["explain_latency"]["p50_ms"] / result["predict_latency"]["p50_ms"]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    (out / "serve.md").write_text(markdown(result))
    print(markdown(result), file=sys.stderr)
    print(out / "serve.md")


def parse_args() -> argparse.Namespace:
    """The flags; with ``--arch``, the bundle is exported into a temporary directory."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", nargs="?", help="a bundle directory (or use --arch)")
    p.add_argument("--arch", help="benchmark an untrained bundle of this timm architecture")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument(
        "--clients", type=int, nargs="+", default=[4, 8], help="concurrency levels to sweep"
    )
    p.add_argument("--requests", type=int, default=200)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of in-process then HTTP, side by side: the ratio is their median",
    )
    p.add_argument("--explain-requests", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime/torch threads")
    defaults = AppArgs(bundles=["-"]).classifier
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    p.add_argument("--batch-wait-timeout-s", type=float, help="default: the app's (0 on CPU)")
    p.add_argument("--port", type=int, default=8770)
    p.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an AppArgs field, dotted into its sections (ingress.num_replicas=1)",
    )
    p.add_argument("--out", default="bench/results")
    p.add_argument(
        "--front", choices=FRONTS, default="auto", help="Serve's HTTP front (carclf serve --front)"
    )
    args = p.parse_args()
    if bool(args.bundle) == bool(args.arch):
        p.error("give a bundle or --arch, not both")
    if args.arch:
        print(f"exporting an untrained {args.arch} …", file=sys.stderr)
        args.tmp = tempfile.TemporaryDirectory()  # lives as long as args
        args.bundle = harness.untrained_bundle(args.arch, args.img_size, Path(args.tmp.name))
    return args


def served(args: argparse.Namespace, name: str, images: list[bytes]) -> dict[str, Any]:
    """The app on its own Ray: ``--rounds`` rounds of in-process, then HTTP load at each level
    (with each process's CPU), side by side; then one request at a time."""
    import ray
    from ray import serve

    classifier = {
        "ray_actor_options": {"num_cpus": float(args.threads)},
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
    }
    app_args = harness.app_args([args.bundle], {"classifier": classifier}, args.app)
    harness.start_ray(args.front)
    try:
        base = start_app(app_args, port=args.port, name="bench", front=args.front)
        wait_ready(base)
        predict = f"{base}/v1/models/{name}:predict"
        sequential(predict, images[:5])  # warm-up
        roles = harness.process_roles()
        threads = harness.thread_seconds(roles)
        rounds, used = side_by_side_rounds(args, predict, images, roles)
        requests = len(images) * len(args.clients) * args.rounds
        figures = side_by_side(rounds)
        best = figures["http"]["clients"]
        policy = set(IngressSettings.model_fields) - INGRESS_SERVE_OPTIONS
        return {
            "app": app_args.model_dump(mode="json", exclude={"ingress": policy}),
            "rounds": rounds,
            **figures,
            "cpu_ms_per_request": harness.cpu_by_role(
                roles, dict.fromkeys(used, 0.0), used, requests / 1000
            ),
            "busy_threads": harness.busy_threads(roles, threads, harness.thread_seconds(roles)),
            "http_socket_client": asyncio.run(keep_alive_load(predict, images, best)),
            "predict_latency": sequential(predict, images[: args.explain_requests]),
            "explain_latency": sequential(
                f"{base}/v1/models/{name}:explain", images[: args.explain_requests]
            ),
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def side_by_side_rounds(
    args: argparse.Namespace, predict: str, images: list[bytes], roles: dict[int, str]
) -> tuple[list[dict], dict[int, float]]:
    """``--rounds`` rounds, each in-process then HTTP at every ``--clients`` level; and the CPU
    seconds of each process (``roles``) under the HTTP load only."""
    used: dict[int, float] = {}
    rounds = []
    for _ in range(args.rounds):
        local = in_process(args.bundle, images, args.threads)
        before = harness.cpu_seconds(roles)
        levels = [
            {"clients": n, **asyncio.run(http_load(predict, images, n))} for n in args.clients
        ]
        for pid, seconds in harness.cpu_seconds(roles).items():
            used[pid] = used.get(pid, 0.0) + seconds - before.get(pid, seconds)
        rounds.append({"in_process": local, "http_levels": levels})
    return rounds, used


def side_by_side(rounds: list[dict]) -> dict[str, Any]:
    """The headline figures of :func:`served`'s rounds: each level's median round, the best of
    those, the in-process median, and HTTP at the best level over in-process, round by round:
    its median is the ratio, its range the spread between rounds."""
    levels = [
        sorted(
            (lv for r in rounds for lv in r["http_levels"] if lv["clients"] == first["clients"]),
            key=lambda lv: lv["images_per_s"],
        )[len(rounds) // 2]
        for first in rounds[0]["http_levels"]
    ]
    best = max(levels, key=lambda lv: lv["images_per_s"])
    ratios = [
        next(lv for lv in r["http_levels"] if lv["clients"] == best["clients"])["images_per_s"]
        / r["in_process"]["images_per_s"]
        for r in rounds
    ]
    local = float(np.median([r["in_process"]["images_per_s"] for r in rounds]))
    return {
        "http_levels": levels,
        "http": best,
        "in_process": {"images_per_s": local},
        "http_over_in_process": float(np.median(ratios)),
        "http_over_in_process_rounds": ratios,
    }


def in_process(bundle_path: str, images: list[bytes], threads: int) -> dict[str, float]:
    """Decode + preprocess + onnxruntime, one image at a time, as a replica does at batch 1.

    The decode is the ingress's own (:func:`serve.images.decode_image`: header, limits, then
    the library's decoder), so both sides of the comparison do the same work per image.
    """
    clf = OnnxClassifier(load_bundle(bundle_path), threads=threads)
    clf.probabilities([decode_image(images[0])])  # warm-up
    start = time.perf_counter()
    for data in images:
        clf.probabilities([decode_image(data)])
    return {"images_per_s": len(images) / (time.perf_counter() - start)}


def stages(bundle_path: str, images: list[bytes], threads: int) -> dict[str, float]:
    """Milliseconds per image of each in-process stage: decode, preprocess, onnxruntime."""
    clf = OnnxClassifier(load_bundle(bundle_path), threads=threads)
    decoded = [decode_image(d) for d in images]
    tensors = [clf.transform(img).numpy()[None] for img in decoded]
    runs = {
        "decode_ms": lambda i: decode_image(images[i]),
        "preprocess_ms": lambda i: clf.transform(decoded[i]).numpy(),
        "onnxruntime_ms": lambda i: clf.raw_logits(tensors[i]),
    }
    out = {}
    for key, run in runs.items():
        run(0)  # warm-up
        start = time.perf_counter()
        for i in range(len(images)):
            run(i)
        out[key] = (time.perf_counter() - start) * 1000 / len(images)
    return out


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


if __name__ == "__main__":
    main()
