"""Chaos suite: the served app under overload, a killed replica, a soak and hostile inputs.

Everything goes to 127.0.0.1 only, and every phase is bounded in time (flags below):

1. Overload (:mod:`bench.overload`): the saturation throughput of closed-loop clients, a flood
   of 128 closed-loop clients on a new connection per request, then open-loop arrivals at 1x
   and 10x of saturation: how many requests were refused and how fast, the
   accepted throughput against saturation, and the latency of the health probes meanwhile
   (``PROBES``: the app's ``/v2/health/live`` and ``/ready``, and the HTTP front's own
   ``/-/healthz``).
2. Replica kill: a classifier replica killed with ``ray.kill`` under closed-loop load: requests
   sent and failed and their p99 before, during and after, and the seconds until Serve reports a
   new replica running.
3. Soak: predictions with every tenth an explanation; the RSS of every Serve process (the
   replicas, proxy and controller of this run's own Ray) sampled with psutil.
4. Hostile inputs (:mod:`bench.hostile`): each one's status, and whether the server is ready
   after it.

The load client shares the machine with the server. At 10x it needs CPU of its own, which on a
small machine the server then lacks. So ``--client-cpus N`` (by default 1, on a machine of 2 CPUs
or more) keeps the last N CPUs for the client and its prober and pins the server (Ray, and every
process Ray starts) to the rest: the server has the same CPUs at every level, as with a client
on another machine. ``--client-cpus 0`` shares them all.

Statuses are recorded as the app answers them (0 is no answer: a timeout or a dropped
connection). Writes ``chaos.json`` and ``chaos.md`` (:mod:`bench.chaos_report`) under ``--out``;
prints the Markdown path last. Usage: ``python -m bench.chaos [--bundle DIR] [--port 8783]
[--app section.key=value …]``, e.g. ``--app ingress.num_replicas=1``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import harness
from bench.chaos_report import markdown
from bench.hostile import hostile_cases, run_hostile
from bench.loadclient import (
    HOST,
    Reply,
    Target,
    exchange,
    explain_request,
    pct,
    predict_request,
    run_loop,
    statuses,
)
from bench.overload import Prober, overload
from carclf.runtime import usable_cpus
from serve.front import FRONTS, HAPROXY, NBTHREAD_ENV, front_in_use

KEY = "chaos-key"
APP = "carclf-chaos"


def main(argv: list[str] | None = None) -> None:
    """Run the suite; write chaos.json and chaos.md; print the Markdown's path."""
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or harness.untrained_bundle(args.arch, args.img_size, Path(tmp))
        result = run(args, bundle)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    (out / "chaos.md").write_text(markdown(result))
    print(out / "chaos.md")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The suite's flags: every size and duration."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--bundle", help="a bundle directory; default: export an untrained --arch")
    a("--arch", default="scratch_cnn", help="the toy bundle's architecture")
    a("--img-size", type=int, default=64)
    a("--port", type=int, default=8783)
    a(
        "--app",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an AppArgs field, dotted into its sections (ingress.num_replicas=1)",
    )
    a("--images", type=int, default=6, help="distinct JPEGs sent (640x480 to 1024x768)")
    a("--timeout-s", type=float, default=15.0, help="client timeout of each request")
    a("--sat-clients", type=int, default=16)
    a("--sat-s", type=float, default=8.0)
    a("--overload-factors", type=float, nargs="+", default=[1.0, 10.0])
    a("--overload-s", type=float, default=10.0)
    a("--flood-clients", type=int, default=128, help="closed-loop clients of the flood; 0: none")
    a("--flood-s", type=float, default=15.0)
    a("--overload-rounds", type=int, default=3, help="saturation then each level, this often")
    a("--max-in-flight", type=int, default=2000, help="the load client's own bound")
    a("--probe-every-s", type=float, default=0.1)
    a("--settle-s", type=float, default=5.0)
    a("--kill-clients", type=int, default=4)
    a("--kill-before-s", type=float, default=8.0)
    a("--kill-after-s", type=float, default=8.0)
    a("--kill-recover-max-s", type=float, default=60.0)
    a("--soak-clients", type=int, default=4)
    a("--soak-s", type=float, default=60.0)
    a("--soak-warmup-s", type=float, default=5.0)
    a("--rss-every-s", type=float, default=2.0)
    a("--skip", nargs="*", default=[], choices=["overload", "replica_kill", "soak"])
    a("--client-nice", type=int, default=19, help="the load client's niceness")
    a(
        "--client-cpus",
        type=int,
        default=None,
        help="CPUs kept for the load client and its prober, the server pinned to the rest; "
        "0: all shared (default: 1 on a machine of 2 CPUs or more, else 0)",
    )
    a("--front", choices=FRONTS, default="auto", help="Serve's HTTP front (carclf serve --front)")
    a("--out", default="bench/results")
    return p.parse_args(argv)


def run(args: argparse.Namespace, bundle: str) -> dict[str, Any]:
    """Start Ray and the app, run the phases, shut both down; the results."""
    import ray
    from ray import serve

    from carclf.bundle import load_bundle

    info = load_bundle(bundle).info
    started = time.time()
    result: dict[str, Any] = {
        "model": info.name,
        "arch": info.arch,
        "input_size": list(info.input_size),
        "cpus": usable_cpus(),
        "load_average": harness.load_average(),
        "started": _now(),
        "flags": vars(args),
    }
    client_cpus = harness.default_client_cpus() if args.client_cpus is None else args.client_cpus
    split = harness.split_cpus(client_cpus)
    if split:
        result["cpus_server"], result["cpus_client"] = sorted(split[0]), sorted(split[1])
        harness.pin(split[0])  # Ray, started next, and every process it starts run on these
    try:
        target, app_args = start(bundle, args)
        if split:
            harness.pin(split[1])  # the load client and its prober
        result["app"] = app_args.model_dump(mode="json")
        result["app_summary"] = app_summary(app_args)
        prober = Prober(target, args.probe_every_s)
        # The load client shares the machine with the server it measures; at a lower priority
        # it takes CPU the server leaves idle, as a client on another machine would. Lower than
        # the server's: Ray runs its workers, every replica among them, at nice 15
        # (RAY_worker_niceness), and a client above that would outrank every replica.
        os.nice(args.client_nice)
        result["niceness"] = harness.niceness()
        try:
            result.update(run_loop(phases(target, app_args, args, prober)))
        finally:
            prober.close()
    finally:
        if ray.is_initialized():  # serve.shutdown() would start a Ray to shut down
            serve.shutdown()
            ray.shutdown()
    result["finished"] = _now()
    result["seconds"] = time.time() - started
    return result


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def start(bundle: str, args: argparse.Namespace) -> tuple[Target, Any]:
    """Ray (this process's own), then the app on ``HOST:--port``; the target and its args."""
    from carclf.bundle import load_bundle
    from serve.client import wait_ready
    from serve.front import FrontLimits
    from serve.launch import start_app

    app_args = harness.app_args([bundle], {"ingress": {"api_key": KEY}}, args.app)
    harness.start_ray(args.front, FrontLimits.of(app_args.ingress))
    base = start_app(app_args, host=HOST, port=args.port, name=APP, front=args.front)
    wait_ready(base)
    return Target(args.port, load_bundle(bundle).info.name, KEY), app_args


def app_summary(app_args: Any) -> str:
    """The app's replicas and limits, and the HTTP front that serves it, in words."""
    from serve.launch import http_front, serve_env

    front = front_in_use()
    threads = os.environ.get(NBTHREAD_ENV) if front == HAPROXY else None
    return (
        f"{app_args.ingress.num_replicas} ingress and {app_args.classifier.num_replicas} "
        f"classifier replica(s), ingress max_inflight={app_args.ingress.max_inflight}"
        f"; HTTP taken by {http_front(front, serve_env())}"
        + (f", HAProxy threads: {threads}" if threads else "")
    )


async def phases(
    target: Target, app_args: Any, args: argparse.Namespace, prober: Prober
) -> dict[str, Any]:
    """The four phases in turn (hostile inputs last, so they meet a server that was abused)."""
    from carclf.bundle import load_bundle

    images = harness.photos(args.images)
    size = list(load_bundle(app_args.bundles[0]).info.input_size)
    out: dict[str, Any] = {}
    overloaded = functools.partial(overload, prober=prober)
    for name, phase in (("overload", overloaded), ("replica_kill", replica_kill), ("soak", soak)):
        if name in args.skip:
            continue
        print(f"chaos: {name} …", file=sys.stderr)
        out[name] = await phase(target, images, args)
    ingress = app_args.ingress
    cases = hostile_cases(target, images[0], size, ingress.max_images, ingress.max_body_bytes)
    print("chaos: hostile inputs …", file=sys.stderr)
    out["hostile"] = await run_hostile(target, cases)
    return out


# --- 2. replica kill


async def replica_kill(target: Target, images: list[bytes], args: argparse.Namespace) -> dict:
    """Closed-loop load; a classifier replica killed in the middle; until a new one runs."""
    replies: list[Reply] = []
    raws = [predict_request(target, image) for image in images]
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            raw = raws[len(replies) % len(raws)]
            replies.append(await exchange(target.port, raw, args.timeout_s))

    wanted = await asyncio.to_thread(running, APP)
    t0 = time.perf_counter()
    clients = [asyncio.create_task(client()) for _ in range(args.kill_clients)]
    await asyncio.sleep(args.kill_before_s)
    t_kill = time.perf_counter()
    victim, before = await asyncio.to_thread(kill_replica, APP)
    found = await asyncio.to_thread(wait_replaced, APP, before, wanted, args.kill_recover_max_s)
    t_new = time.perf_counter()
    new_s = None if found is None else t_new - t_kill
    await asyncio.sleep(args.kill_after_s)
    stop.set()
    await asyncio.gather(*clients)
    return {
        "clients": args.kill_clients,
        "killed": victim.split("#")[-1],
        "replicas_running_before": wanted,
        "seconds_to_new_running_replica": new_s,
        "before": window(replies, t0, t_kill),
        "during": window(replies, t_kill, t_new),
        "after": window(replies, t_new, t_new + args.kill_after_s),
    }


def kill_replica(app: str) -> tuple[str, list[str]]:
    """Kill one classifier replica (Serve must replace it); its name and the names before."""
    import ray

    before = classifier_replicas(app)
    if not before:
        raise RuntimeError(f"no classifier replica of {app!r} to kill")
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    return before[0], before


def wait_replaced(app: str, before: list[str], wanted: int, max_s: float) -> float | None:
    """Seconds until a replica not in ``before`` runs and ``wanted`` run in all (None: never)."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        fresh = set(classifier_replicas(app)) - set(before)
        if fresh and running(app) >= wanted:
            return time.perf_counter() - start
        time.sleep(0.2)
    return None


def classifier_replicas(app: str) -> list[str]:
    """Names of the app's classifier replica actors (Serve names them ``SERVE_REPLICA::…``)."""
    import ray

    from serve.settings import CLASSIFIER_PREFIX

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#{CLASSIFIER_PREFIX}")
    )


def running(app: str) -> int:
    """Replicas Serve reports RUNNING over the app's classifier deployments."""
    from ray import serve

    from serve.settings import CLASSIFIER_PREFIX

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(
        d.replica_states.get("RUNNING", 0)
        for name, d in status.deployments.items()
        if name.startswith(CLASSIFIER_PREFIX)
    )


def window(replies: list[Reply], start: float, end: float) -> dict[str, Any]:
    """Requests started in ``[start, end)``: sent, failed, statuses, p50/p99 of all."""
    inside = [r for r in replies if start <= r.started < end]
    return {
        "sent": len(inside),
        "failed": sum(r.status != 200 for r in inside),
        "statuses": statuses(inside),
        **pct([r.seconds for r in inside]),
    }


# --- 3. soak


async def soak(target: Target, images: list[bytes], args: argparse.Namespace) -> dict:
    """Closed-loop predictions, every tenth an explanation; RSS of each Serve process."""
    replies: dict[str, list[Reply]] = {"predict": [], "explain": []}
    raws = {
        "predict": [predict_request(target, image) for image in images],
        "explain": [explain_request(target, image) for image in images],
    }
    count = 0
    end = time.perf_counter() + args.soak_warmup_s + args.soak_s

    async def client() -> None:
        nonlocal count
        while time.perf_counter() < end:
            count += 1
            kind = "explain" if count % 10 == 0 else "predict"
            reply = await exchange(target.port, raws[kind][count % len(images)], 60)
            replies[kind].append(reply)

    roles = harness.serve_processes()
    tasks = [asyncio.create_task(client()) for _ in range(args.soak_clients)]
    await asyncio.sleep(args.soak_warmup_s)  # first calls allocate; growth counts after them
    t0, samples = time.perf_counter(), []
    while time.perf_counter() < end:
        samples.append((time.perf_counter() - t0, harness.rss_mb(list(roles))))
        await asyncio.sleep(args.rss_every_s)
    await asyncio.gather(*tasks)
    samples.append((time.perf_counter() - t0, harness.rss_mb(list(roles))))
    return {
        "clients": args.soak_clients,
        "seconds": args.soak_s,
        "warmup_s": args.soak_warmup_s,
        **{
            kind: {"sent": len(rs), "statuses": statuses(rs), **pct([r.seconds for r in rs])}
            for kind, rs in replies.items()
        },
        "rss": harness.rss_growth(roles, samples),
    }


if __name__ == "__main__":
    main()
