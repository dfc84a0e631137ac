"""Serving benchmark, measured side by side in one run on one bundle.

1. HTTP ``:predict`` throughput and p50/p99 latency at each of ``--clients`` concurrent
   clients (4 and 8 by default), against the same model's in-process decode + preprocess +
   onnxruntime throughput at the same thread count. The headline is the best of the levels,
   the saturation throughput, as a load tester's concurrency sweep reports it; each level's
   throughput and latency are in the results too.
2. onnxruntime against PyTorch eager on the same preprocessed batches, same threads: at
   ``--threads`` and batch 1 (the headline), and at 1 thread / every core × batch 1 / 8.
3. ``:explain`` latency against ``:predict`` latency, one request at a time.

Writes ``serve.json`` and ``serve.md`` under ``--out``; prints the Markdown path last.
Usage: ``python -m bench.serve_bench BUNDLE [--clients 4 8] [--requests 200] [--threads 1]``, or
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
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
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
from carclf.runtime import FRONTS, front_in_use
from carclf.tables import markdown_table, number_cell
from carclf.train import init_run
from serve.app import AppArgs
from serve.client import wait_ready
from serve.ingress import decode_image
from serve.launch import http_front, serve_env, start_app


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
    """Decode + preprocess + onnxruntime, one image at a time, as a replica does at batch 1.

    The decode is the ingress's own (:func:`serve.ingress.decode_image`: header, limits, then
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


# Roles of the processes of this benchmark's own Ray, by process title (ray::…) or binary.
ROLES = {
    "ProxyActor": "Serve proxy",
    "bin/haproxy": "HAProxy",
    ":Ingress": "ingress replicas",
    ":classifier-": "classifier replica",
    ":explainer-": "explainer replica",
    ":Health": "health replicas",
    "ServeController": "Serve controller",
    "raylet/raylet ": "raylet",
    "gcs/gcs_server ": "GCS",
}


def process_roles() -> dict[int, str]:
    """PID → role of this process and its descendants (another Ray on the machine is not ours)."""
    me = psutil.Process()
    roles = {me.pid: "load client (this process)"}
    for proc in me.children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        roles[proc.pid] = next((r for m, r in ROLES.items() if m in title), "other Ray processes")
    return roles


def cpu_seconds(roles: dict[int, str]) -> dict[int, float]:
    """User + system CPU seconds so far of each PID (gone processes are left out)."""
    out = {}
    for pid in roles:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = t.user + t.system
    return out


def thread_seconds(roles: dict[int, str]) -> dict[tuple[int, int], float]:
    """CPU seconds so far of each thread of the classifier and ingress replicas."""
    out = {}
    for pid, role in roles.items():
        if role not in ("classifier replica", "ingress replicas"):
            continue
        try:
            out.update(
                {(pid, t.id): t.user_time + t.system_time for t in psutil.Process(pid).threads()}
            )
        except psutil.Error:
            continue
    return out


def busy_threads(
    roles: dict[int, str], before: dict[tuple[int, int], float], after: dict[tuple[int, int], float]
) -> dict[str, int]:
    """Threads per replica process that did a tenth or more of its CPU work during the load:
    the check that onnxruntime (and the ingress) ran on the threads they were given."""
    per_pid: dict[int, dict[int, float]] = {}
    for (pid, tid), seconds in after.items():
        per_pid.setdefault(pid, {})[tid] = seconds - before.get((pid, tid), 0.0)
    out = {}
    for pid, used in per_pid.items():
        total = sum(used.values()) or 1.0
        out[f"{roles[pid]} {pid}"] = sum(u >= 0.1 * total for u in used.values())
    return out


def cpu_by_role(
    roles: dict[int, str], before: dict[int, float], after: dict[int, float], per: float = 1.0
) -> dict[str, float]:
    """CPU seconds by role between two :func:`cpu_seconds` readings, divided by ``per``
    (requests, or seconds for cores), most first. A process in ``after`` only started in
    between (HAProxy's reloads start a new one): all its CPU counts."""
    out: dict[str, float] = {}
    for pid, seconds in after.items():
        role = roles[pid]
        out[role] = out.get(role, 0.0) + (seconds - before.get(pid, 0.0)) / per
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


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


async def socket_load(url: str, images: list[bytes], clients: int) -> dict[str, float]:
    """:func:`http_load` with a bare keep-alive socket client instead of httpx.

    The load generator shares the server's cores; this one costs far less CPU per request than
    httpx, so the difference between the two is the client's share, not the server's.
    """
    from bench.chaos import read_reply

    parts = urlsplit(url)
    queue = list(images)
    latencies: list[float] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while queue:
                data = queue.pop()
                head = (
                    f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                    f"Content-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                )
                t0 = time.perf_counter()
                writer.write(head.encode() + data)
                status, headers, _ = await read_reply(reader)
                if status != 200:
                    raise RuntimeError(f"HTTP {status} from {url}")
                latencies.append(time.perf_counter() - t0)
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    return {"images_per_s": len(images) / elapsed, **rate(latencies)}


def sequential(url: str, images: list[bytes]) -> dict[str, float]:
    """One request at a time: p50 and p99 latency of ``images`` posted to ``url``."""
    latencies = []
    with httpx.Client(timeout=120) as http:
        for data in images:
            t0 = time.perf_counter()
            r = http.post(url, content=data, headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
    return rate(latencies)


def served(args: argparse.Namespace, name: str, images: list[bytes]) -> dict[str, Any]:
    """The app on its own Ray: ``--rounds`` rounds of in-process, then HTTP load at each level
    (with each process's CPU), side by side; then one request at a time."""
    import ray
    from ray import serve

    from bench.chaos import app_overrides, init_ray

    init_ray(args.front)
    try:
        app_args = AppArgs(
            bundles=[args.bundle],
            classifier_cpus=float(args.threads),
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_timeout_s,
            **app_overrides(args.app),
        )
        base = start_app(app_args, port=args.port, name="bench", front=args.front)
        wait_ready(base)
        predict = f"{base}/v1/models/{name}:predict"
        sequential(predict, images[:5])  # warm-up
        roles = process_roles()
        threads = thread_seconds(roles)
        used: dict[int, float] = {}  # CPU seconds of each process under HTTP load only
        rounds = []
        for _ in range(args.rounds):
            local = in_process(args.bundle, images, args.threads)
            before = cpu_seconds(roles)
            levels = [
                {"clients": n, **asyncio.run(http_load(predict, images, n))} for n in args.clients
            ]
            for pid, seconds in cpu_seconds(roles).items():
                used[pid] = used.get(pid, 0.0) + seconds - before.get(pid, seconds)
            rounds.append({"in_process": local, "http_levels": levels})
        requests = len(images) * len(args.clients) * args.rounds
        figures = side_by_side(rounds)
        best = figures["http"]["clients"]
        return {
            "app": app_args.model_dump(mode="json", exclude={"settings"}),
            "rounds": rounds,
            **figures,
            "cpu_ms_per_request": cpu_by_role(
                roles, dict.fromkeys(used, 0.0), used, requests / 1000
            ),
            "busy_threads": busy_threads(roles, threads, thread_seconds(roles)),
            "http_socket_client": asyncio.run(socket_load(predict, images, best)),
            "predict_latency": sequential(predict, images[: args.explain_requests]),
            "explain_latency": sequential(
                f"{base}/v1/models/{name}:explain", images[: args.explain_requests]
            ),
        }
    finally:
        serve.shutdown()
        ray.shutdown()


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


def _wait(seconds: float | None) -> str:
    return "the app's default wait" if seconds is None else f"waiting at most {seconds * 1000:g} ms"


def _measures(r: dict) -> list[dict[str, str]]:
    http, local, fw = r["http"], r["in_process"], r["onnx_vs_eager"]
    alone = r["in_process_alone"]
    pred, expl, sock = r["predict_latency"], r["explain_latency"], r["http_socket_client"]
    levels = [
        (
            f"HTTP predict, {lv['clients']} clients: throughput; p50 / p99",
            f"{lv['images_per_s']:.1f} img/s; {lv['p50_ms']:.1f} / {lv['p99_ms']:.1f} ms",
        )
        for lv in r["http_levels"]
    ]
    rows = [
        *levels,
        ("HTTP predict throughput (the best level)", f"{http['images_per_s']:.1f} img/s"),
        (
            "in-process decode+preprocess+onnxruntime (median round)",
            f"{local['images_per_s']:.1f} img/s",
        ),
        (
            f"**HTTP / in-process** (median of {len(r['rounds'])} rounds; each round)",
            f"**{r['http_over_in_process']:.2f}** "
            f"({', '.join(f'{x:.2f}' for x in r['http_over_in_process_rounds'])})",
        ),
        (
            "in-process before Ray started; HTTP (the best level) over it",
            f"{alone['images_per_s']:.1f} img/s; "
            f"{http['images_per_s'] / alone['images_per_s']:.2f}",
        ),
        (
            f"HTTP predict throughput, bare socket client, {http['clients']} clients (diagnostic)",
            f"{sock['images_per_s']:.1f} img/s ({sock['images_per_s'] / local['images_per_s']:.2f}"
            " of in-process)",
        ),
        ("onnxruntime forward", f"{fw['onnx_images_per_s']:.1f} img/s"),
        ("PyTorch eager forward", f"{fw['eager_images_per_s']:.1f} img/s"),
        ("**onnxruntime / eager**", f"**{fw['onnx_over_eager']:.2f}**"),
        ("predict p50 (one at a time)", f"{pred['p50_ms']:.1f} ms"),
        ("explain p50 (one at a time)", f"{expl['p50_ms']:.1f} ms"),
        ("**explain / predict (p50)**", f"**{r['explain_over_predict']:.2f}**"),
    ]
    return [{"measure": m, "value": v} for m, v in rows]


def _where(r: dict) -> list[dict[str, object]]:
    """In-process stages per image, then CPU per HTTP request by process."""
    rows: list[dict[str, object]] = [
        {"where": f"in process: {k.removesuffix('_ms')}", "ms per image": v}
        for k, v in r["stages"].items()
    ]
    rows += [
        {"where": f"HTTP, CPU of: {role}", "ms per image": ms}
        for role, ms in r["cpu_ms_per_request"].items()
    ]
    total = sum(r["cpu_ms_per_request"].values())
    rows.append({"where": "**HTTP, CPU of all processes**", "ms per image": total})
    # Over every round and level, as the CPU times are.
    levels = [lv for rnd in r["rounds"] for lv in rnd["http_levels"]]
    wall = 1000 * r["cpus"] * sum(1 / lv["images_per_s"] for lv in levels) / len(levels)
    rows.append({"where": f"HTTP, {r['cpus']} cores x wall time", "ms per image": wall})
    return rows


def markdown(r: dict) -> str:
    """serve.md: the headline measures, where the time goes, the framework grid."""
    cell = number_cell(1)
    grid = [
        {
            "threads": g["threads"],
            "batch": g["batch"],
            "onnxruntime img/s": g["onnx_images_per_s"],
            "eager img/s": g["eager_images_per_s"],
            "onnxruntime / eager": f"**{g['onnx_over_eager']:.2f}**",
        }
        for g in r["onnx_vs_eager_grid"]
    ]
    busy = ", ".join(f"{k}: {v}" for k, v in r["busy_threads"].items())
    app = r.get("app", {})
    return "\n".join(
        [
            f"# Serving benchmark: {r['model']} ({r['arch']}, input {r['input_size']})",
            "",
            f"{len(r['rounds'])} rounds, each the same {r['requests']} JPEGs (640x480 to "
            "1024x768) in process, then over HTTP at each of "
            f"{', '.join(str(n) for n in r['clients'])} concurrent clients (the median round "
            "of each is shown), "
            f"{r['threads']} onnxruntime/torch thread(s), {r['cpus']} CPUs, batches of up to "
            f"{r['max_batch_size']} ({_wait(r['batch_wait_timeout_s'])}), "
            f"{app.get('ingress_replicas', 1)} ingress and {app.get('classifier_replicas')} "
            "classifier replica(s); "
            f"the bundle's model.onnx is {r['precision']}; HTTP taken by "
            f"{http_front(r['front'], r.get('serve_env'))}.",
            "",
            *markdown_table(_measures(r), cell),
            "",
            "Where the time goes: each in-process stage alone (one image at a time), and the CPU "
            "time of every process of the benchmark's Ray during the HTTP load, per request "
            f"(threads doing a tenth or more of a replica's work: {busy}):",
            "",
            *markdown_table(_where(r), cell),
            "",
            "onnxruntime against PyTorch eager, forward passes only, alternating blocks:",
            "",
            *markdown_table(grid, cell),
            "",
            f"Measured {r.get('measured_at', '?')} with `{r.get('command', '?')}` "
            f"(load average {r.get('load_average', '?')} at the start).",
            "",
        ]
    )


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
    defaults = AppArgs(bundles=["-"])
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    p.add_argument("--batch-wait-timeout-s", type=float, help="default: the app's (0 on CPU)")
    p.add_argument("--port", type=int, default=8770)
    p.add_argument(
        "--app", action="append", default=[], metavar="KEY=VALUE", help="an AppArgs field"
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
        args.bundle = untrained_bundle(args.arch, args.img_size, Path(args.tmp.name))
    return args


def main() -> None:
    """Measure; write serve.json and serve.md under ``--out``; print the Markdown's path."""
    args = parse_args()
    info = load_bundle(args.bundle).info
    images = photos(max(args.requests, 320))  # the batch-8 comparison takes 40 batches
    cpus = len(os.sched_getaffinity(0))
    print("in-process and framework comparison …", file=sys.stderr)
    grid = framework_grid(args.bundle, images, cpus)
    images = images[: args.requests]
    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python -m bench.serve_bench", *sys.argv[1:]]),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
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


if __name__ == "__main__":
    main()
