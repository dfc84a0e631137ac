"""Chaos suite: the served app under overload, a killed replica, a soak and hostile inputs.

Everything goes to 127.0.0.1 only, and every phase is bounded in time (flags below):

1. Overload: the saturation throughput of closed-loop clients, then open-loop arrivals at 1x and
   10x of it: how many requests were refused and how fast, the accepted throughput against
   saturation, and the latency of the health probes meanwhile (``PROBES``: the app's
   ``/v2/health/live`` and ``/ready``, and the HTTP front's own ``/-/healthz``).
2. Replica kill: a classifier replica killed with ``ray.kill`` under closed-loop load: requests
   sent and failed and their p99 before, during and after, and the seconds until Serve reports a
   new replica running.
3. Soak: predictions with every tenth an explanation; the RSS of every Serve process (the
   replicas, proxy and controller of this run's own Ray) sampled with psutil.
4. Hostile inputs (:func:`hostile_cases`): each one's status, and whether the server is ready
   after it.

The load client shares the machine with the server. At 10x it needs CPU of its own, which on a
small machine the server then lacks. So ``--client-cpus N`` (by default 1, on a machine of 2 CPUs
or more) keeps the last N CPUs for the client and its prober and pins the server (Ray, and every
process Ray starts) to the rest: the server has the same CPUs at every level, as with a client
on another machine. ``--client-cpus 0`` shares them all.

Statuses are recorded as the app answers them (0 is no answer: a timeout or a dropped
connection). Writes ``chaos.json`` and ``chaos.md`` under ``--out``; prints the Markdown path
last. Usage: ``python -m bench.chaos [--bundle DIR] [--port 8783] [--app key=value …]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from carclf.runtime import (
    FRONTS,
    HAPROXY,
    NBTHREAD_ENV,
    FrontLimits,
    front_in_use,
    usable_cpus,
)

HOST = "127.0.0.1"  # the suite never sends anywhere else
KEY = "chaos-key"
APP = "carclf-chaos"
REFUSED = (429, 503)  # "come back later": what an overloaded server should answer
# Probed during overload: the app's KServe V2 health, and the health that Serve's HTTP front
# (its Python proxy, or HAProxy) answers itself, which KubeRay and load balancers probe.
PROBES = {"live": "/v2/health/live", "ready": "/v2/health/ready", "front": "/-/healthz"}


# --- a small HTTP/1.1 client: cheap enough to offer 10x load from one core, and able to send
# what polite clients cannot (repeated headers, a lying Content-Length)


@dataclass
class Target:
    """Where requests go: ``HOST:port``, one model, the API key."""

    port: int
    model: str
    key: str | None = None


@dataclass
class Reply:
    """One request's outcome; ``status`` 0 when no answer came (``error`` says why)."""

    status: int
    seconds: float
    started: float = 0.0
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""


def raw_request(
    method: str,
    path: str,
    port: int,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str | None = None,
    content_length: int | None = None,
) -> bytes:
    """The bytes of one request (``Connection: close``); ``content_length`` may lie."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'{HOST}:{port}'}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    length = len(body) if content_length is None else content_length
    lines += [f"Content-Length: {length}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of a response head, without its blank line."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.1 response on a connection
    that stays open (a keep-alive client's)."""
    status, headers = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readline()
    else:
        body = await reader.read()
    return status, headers, body


def _dechunk(data: bytes) -> bytes:
    """The body of a chunked transfer encoding (``ValueError`` if it is cut short)."""
    body, at = b"", 0
    while True:
        line_end = data.index(b"\r\n", at)
        size = int(data[at:line_end].split(b";")[0], 16)
        if not size:
            return body
        start = line_end + 2
        if len(data) < start + size:
            raise ValueError("chunked body cut short")
        body, at = body + data[start : start + size], start + size + 2


def parse_reply(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a whole response (``ValueError`` if it is incomplete)."""
    end = data.index(b"\r\n\r\n")
    status, headers = parse_head(data[:end])
    body = data[end + 4 :]
    if "content-length" in headers:
        if len(body) < int(headers["content-length"]):
            raise ValueError("body shorter than its Content-Length")
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return status, headers, body


class _OneRequest(asyncio.Protocol):
    """One request on its own connection: written whole, the answer collected until its
    declared length is in or the server closes.

    A protocol, not asyncio's streams: at 10x the load client makes hundreds to thousands of
    connections a second on the server's own cores, and this way each costs about a third less
    CPU (0.12 cores instead of 0.21 at 10x on efficientnet_b0).
    """

    def __init__(self, raw: bytes, done: asyncio.Future) -> None:
        self.raw, self.done = raw, done
        self.data = bytearray()
        self.length: int | None = None  # the whole response's bytes, once its head is in
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.raw)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.length is None and (end := self.data.find(b"\r\n\r\n")) >= 0:
            _, headers = parse_head(bytes(self.data[:end]))
            declared = headers.get("content-length", "")
            self.length = end + 4 + int(declared) if declared.isdigit() else -1
        if self.length is not None and 0 <= self.length <= len(self.data):
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result((bytes(self.data), exc))


async def exchange(port: int, raw: bytes, timeout_s: float) -> Reply:
    """Send ``raw`` on a new connection to ``HOST:port`` and read the reply, within a timeout."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    done: asyncio.Future = loop.create_future()
    transport = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(lambda: _OneRequest(raw, done), HOST, port)
            data, lost = await done
        if not data:  # reset or closed before any answer: the error is its name
            raise lost or ConnectionError("closed without an answer")
        status, headers, body = parse_reply(data)
        reply = Reply(status, 0.0, start, body, headers)
    except TimeoutError:
        reply = Reply(0, 0.0, start, error="timeout")
    except (OSError, ValueError, IndexError) as exc:
        reply = Reply(0, 0.0, start, error=type(exc).__name__)
    finally:
        if transport is not None and not transport.is_closing():
            transport.abort()
    reply.seconds = time.perf_counter() - start
    return reply


def _auth(target: Target) -> list[tuple[str, str]]:
    return [("x-api-key", target.key)] if target.key else []


def predict_request(target: Target, image: bytes) -> bytes:
    """A raw-JPEG ``:predict`` request."""
    headers = [*_auth(target), ("Content-Type", "image/jpeg")]
    path = f"/v1/models/{target.model}:predict"
    return raw_request("POST", path, target.port, headers, image)


def explain_request(target: Target, image: bytes) -> bytes:
    """A raw-JPEG ``:explain`` request."""
    headers = [*_auth(target), ("Content-Type", "image/jpeg")]
    path = f"/v1/models/{target.model}:explain"
    return raw_request("POST", path, target.port, headers, image)


def get_request(target: Target, path: str) -> bytes:
    """A ``GET`` of ``path`` (with the key: health needs none, but the rest of the API does)."""
    return raw_request("GET", path, target.port, _auth(target))


# --- summaries


def pct(seconds: list[float]) -> dict[str, float | None]:
    """p50 and p99 in milliseconds (None for no values)."""
    if not seconds:
        return {"p50_ms": None, "p99_ms": None}
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def statuses(replies: list[Reply]) -> dict[str, int]:
    """Counts by status (``"0:timeout"`` and the like for no answer), sorted."""
    keys = (str(r.status) if r.status else f"0:{r.error}" for r in replies)
    return dict(sorted(Counter(keys).items()))


# --- 1. overload


async def closed_loop(
    target: Target, images: list[bytes], clients: int, seconds: float, timeout_s: float
) -> list[Reply]:
    """``clients`` clients each sending the next request as soon as the last is answered."""
    replies: list[Reply] = []
    raws = [predict_request(target, image) for image in images]
    end = time.perf_counter() + seconds

    async def client(i: int) -> None:
        while time.perf_counter() < end:
            raw = raws[len(replies) % len(raws)]
            replies.append(await exchange(target.port, raw, timeout_s))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return replies


async def open_loop(
    target: Target,
    images: list[bytes],
    rate: float,
    seconds: float,
    timeout_s: float,
    max_in_flight: int,
) -> tuple[list[Reply], int]:
    """Arrivals at ``rate`` per second for ``seconds``, whatever the answers; and how many were
    not sent because ``max_in_flight`` were already waiting (the client's own bound)."""
    tasks: list[asyncio.Task[Reply]] = []
    raws = [predict_request(target, image) for image in images]  # built once, sent many times
    in_flight, skipped = 0, 0
    start = time.perf_counter()

    async def one(raw: bytes) -> Reply:
        nonlocal in_flight
        try:
            return await exchange(target.port, raw, timeout_s)
        finally:
            in_flight -= 1

    for i in range(int(rate * seconds)):
        # Behind schedule, still yield: the replies already sent (and the probes) need the loop.
        await asyncio.sleep(max(start + i / rate - time.perf_counter(), 0.0))
        if in_flight >= max_in_flight:
            skipped += 1
            continue
        in_flight += 1
        tasks.append(asyncio.create_task(one(raws[i % len(raws)])))
    return list(await asyncio.gather(*tasks)), skipped


async def _probe_rounds(conn: Any, target: Target, every_s: float) -> list[Reply]:
    """Every path of ``PROBES`` on a new connection each, every ``every_s`` on a fixed schedule,
    until ``conn`` says stop."""
    replies: list[Reply] = []
    start, rounds = time.perf_counter(), 0
    while not conn.poll():
        for name, path in PROBES.items():
            reply = await exchange(target.port, get_request(target, path), 5.0)
            reply.headers["probe"] = name
            replies.append(reply)
        rounds += 1
        await asyncio.sleep(max(start + rounds * every_s - time.perf_counter(), 0.0))
    conn.recv()
    return replies


def _prober(conn: Any, target: Target, every_s: float) -> None:
    """The probing process: a round of probes per ``start``, its replies back at ``stop``."""
    while conn.recv() == "start":
        conn.send(asyncio.run(_probe_rounds(conn, target, every_s)))


class Prober:
    """Health probes from a process of their own, as a load balancer's would come.

    Started before the load client lowers its priority, so the probes keep nice 0 (a load
    balancer's are not slowed by the server's machine); and the client's event loop, thousands
    of connections a second at 10x, cannot delay them.
    """

    def __init__(self, target: Target, every_s: float) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # not fork: this process runs Ray's threads
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_prober, args=(child, target, every_s), daemon=True)
        self.process.start()

    def start(self) -> None:
        """Begin probing."""
        self.conn.send("start")

    async def stop(self) -> list[Reply]:
        """Stop probing; every probe's reply, ``headers["probe"]`` naming its ``PROBES`` key."""
        self.conn.send("stop")
        return await asyncio.to_thread(self.conn.recv)

    def close(self) -> None:
        """End the probing process."""
        self.conn.send("exit")
        self.process.join(10)


def _span(replies: list[Reply], at_least: float) -> float:
    """Seconds from the first request sent to the last answer (at least ``at_least``)."""
    if not replies:
        return at_least
    first = min(r.started for r in replies)
    return max(max(r.started + r.seconds for r in replies) - first, at_least)


def _per_second(replies: list[Reply], t0: float) -> list[int]:
    """How many of ``replies`` were answered in each second from ``t0``: stalls show here."""
    ends = [int(r.started + r.seconds - t0) for r in replies]
    return np.bincount(ends).tolist() if ends else []


def overload_summary(
    level: str, rate: float, seconds: float, replies: list[Reply], skipped: int, health: list
) -> dict[str, Any]:
    """One overload level's figures: refusals, accepted throughput, health latency."""
    ok = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status in REFUSED]
    row: dict[str, Any] = {
        "level": level,
        "offered_rps": rate,
        "sent": len(replies),
        "sent_rps": len(replies) / seconds,
        "not_sent_client_bound": skipped,
        "statuses": statuses(replies),
        "ok": len(ok),
        "refused": len(refused),
        "accepted_rps": len(ok) / _span(replies, seconds),
        "accepted_each_s": _per_second(ok, min((r.started for r in replies), default=0.0)),
        "ok_latency": pct([r.seconds for r in ok]),
        "refuse_latency": pct([r.seconds for r in refused]),
        "retry_after": sorted({r.headers.get("retry-after", "-") for r in refused}),
    }
    return {**row, **probe_stats(health)}


def probe_stats(health: list[Reply]) -> dict[str, dict[str, Any]]:
    """Each probe's (``PROBES``) statuses and latency."""
    out = {}
    for name in PROBES:
        probes = [r for r in health if r.headers.get("probe") == name]
        out[name] = {"statuses": statuses(probes), **pct([r.seconds for r in probes])}
    return out


def niceness() -> dict[str, list[int]]:
    """Role → the niceness values of its processes (:func:`bench.serve_bench.process_roles`)."""
    import psutil

    from bench.serve_bench import process_roles

    out: dict[str, set[int]] = {}
    for pid, role in process_roles().items():
        with contextlib.suppress(psutil.Error):
            out.setdefault(role, set()).add(psutil.Process(pid).nice())
    return {role: sorted(values) for role, values in sorted(out.items())}


def cores_used(roles: dict[int, str], before: dict[int, float], seconds: float) -> dict:
    """Cores each role (:func:`bench.serve_bench.process_roles`) used since ``before``,
    processes started meanwhile included (Ray restarts HAProxy to reload its config)."""
    from bench.serve_bench import cpu_by_role, cpu_seconds, process_roles

    roles = {**roles, **process_roles()}
    after = cpu_seconds(roles)
    return {k: round(v, 3) for k, v in cpu_by_role(roles, before, after, seconds).items()}


async def overload_round(
    target: Target, images: list[bytes], args: argparse.Namespace, prober: Prober
) -> dict:
    """Saturation throughput, then open-loop arrivals at each multiple of it; the cores each
    part of the system (and the load client, on the same machine) used at each, and the health
    probes' latency (``prober``) meanwhile."""
    from bench.serve_bench import cpu_seconds, process_roles

    roles = process_roles()
    prober.start()  # throughout, as a load balancer's: its cost is the same at every level
    t0, cpu0 = time.perf_counter(), cpu_seconds(roles)
    sat = await closed_loop(target, images, args.sat_clients, args.sat_s, args.timeout_s)
    sat_cores = cores_used(roles, cpu0, time.perf_counter() - t0)
    sat_probes = probe_stats(await prober.stop())
    # Over the same span as every level (first request sent to last answer), so that the
    # answers still coming in after the clients stop count alike on both sides of the ratio.
    saturation = sum(r.status == 200 for r in sat) / _span(sat, args.sat_s)
    levels = []
    for factor in args.overload_factors:
        rate = max(saturation, 1.0) * factor
        prober.start()
        t0, cpu0 = time.perf_counter(), cpu_seconds(roles)
        replies, skipped = await open_loop(
            target, images, rate, args.overload_s, args.timeout_s, args.max_in_flight
        )
        cores = cores_used(roles, cpu0, time.perf_counter() - t0)
        row = overload_summary(
            f"{factor:g}x", rate, args.overload_s, replies, skipped, await prober.stop()
        )
        row["accepted_over_saturation"] = row["accepted_rps"] / saturation if saturation else None
        row["cores"] = cores
        levels.append(row)
        await asyncio.sleep(args.settle_s)  # let queues drain before the next level
    return {
        "saturation": {
            "clients": args.sat_clients,
            "seconds": args.sat_s,
            "statuses": statuses(sat),
            "ok_rps": saturation,
            **pct([r.seconds for r in sat if r.status == 200]),
            "cores": sat_cores,
            **sat_probes,
        },
        "levels": levels,
    }


async def overload(
    target: Target, images: list[bytes], args: argparse.Namespace, prober: Prober
) -> dict:
    """``--overload-rounds`` of :func:`overload_round`, each level's throughput divided by its
    own round's saturation (both vary from run to run on a shared machine); the round with
    the median ratio at the highest level, and every round's ratios."""
    rounds = [
        await overload_round(target, images, args, prober) for _ in range(args.overload_rounds)
    ]

    def top_ratio(i: int) -> float:
        return rounds[i]["levels"][-1]["accepted_over_saturation"] or 0.0

    median = sorted(range(len(rounds)), key=top_ratio)[len(rounds) // 2]
    return {
        **rounds[median],
        "round_shown": median + 1,
        "rounds": [
            {
                "saturation_rps": r["saturation"]["ok_rps"],
                **{lv["level"]: lv["accepted_over_saturation"] for lv in r["levels"]},
            }
            for r in rounds
        ],
    }


# --- 2. replica kill


def classifier_replicas(app: str) -> list[str]:
    """Names of the app's classifier replica actors (Serve names them ``SERVE_REPLICA::…``)."""
    import ray

    from serve.ingress import CLASSIFIER_PREFIX

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#{CLASSIFIER_PREFIX}")
    )


def running(app: str) -> int:
    """Replicas Serve reports RUNNING over the app's classifier deployments."""
    from ray import serve

    from serve.ingress import CLASSIFIER_PREFIX

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(
        d.replica_states.get("RUNNING", 0)
        for name, d in status.deployments.items()
        if name.startswith(CLASSIFIER_PREFIX)
    )


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


def window(replies: list[Reply], start: float, end: float) -> dict[str, Any]:
    """Requests started in ``[start, end)``: sent, failed, statuses, p50/p99 of all."""
    inside = [r for r in replies if start <= r.started < end]
    return {
        "sent": len(inside),
        "failed": sum(r.status != 200 for r in inside),
        "statuses": statuses(inside),
        **pct([r.seconds for r in inside]),
    }


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


# --- 3. soak


def serve_processes() -> dict[int, str]:
    """PID → role of this run's Serve processes (descendants only: other Rays are not ours)."""
    import psutil

    roles = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for marker in ("ServeReplica:", "ProxyActor", "ServeController"):
            if marker in title:
                # "ray::Class.method" while a task runs: the role is the class
                roles[proc.pid] = title.split("ray::", 1)[-1].strip().split(".")[0]
    return roles


def rss_mb(pids: list[int]) -> dict[int, float]:
    """Resident set size of each PID in MiB (NaN for one that is gone)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            out[pid] = float("nan")
    return out


def rss_growth(roles: dict[int, str], samples: list[tuple[float, dict[int, float]]]) -> list:
    """Per process: RSS at the first and last sample, growth and its least-squares slope."""
    rows = []
    for pid, role in sorted(roles.items(), key=lambda kv: kv[1]):
        t = np.array([s[0] for s in samples])
        mb = np.array([s[1].get(pid, np.nan) for s in samples])
        keep = np.isfinite(mb)
        slope = np.polyfit(t[keep], mb[keep], 1)[0] * 60 if keep.sum() >= 2 else None
        rows.append(
            {
                "process": role,
                "pid": pid,
                "rss_start_mb": float(mb[keep][0]) if keep.any() else None,
                "rss_end_mb": float(mb[keep][-1]) if keep.any() else None,
                "growth_mb": float(mb[keep][-1] - mb[keep][0]) if keep.any() else None,
                "slope_mb_per_min": float(slope) if slope is not None else None,
            }
        )
    return rows


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

    roles = serve_processes()
    tasks = [asyncio.create_task(client()) for _ in range(args.soak_clients)]
    await asyncio.sleep(args.soak_warmup_s)  # first calls allocate; growth counts after them
    t0, samples = time.perf_counter(), []
    while time.perf_counter() < end:
        samples.append((time.perf_counter() - t0, rss_mb(list(roles))))
        await asyncio.sleep(args.rss_every_s)
    await asyncio.gather(*tasks)
    samples.append((time.perf_counter() - t0, rss_mb(list(roles))))
    return {
        "clients": args.soak_clients,
        "seconds": args.soak_s,
        "warmup_s": args.soak_warmup_s,
        **{
            kind: {"sent": len(rs), "statuses": statuses(rs), **pct([r.seconds for r in rs])}
            for kind, rs in replies.items()
        },
        "rss": rss_growth(roles, samples),
    }


# --- 4. hostile inputs


def _json_post(target: Target, path: str, body: bytes, **kw: Any) -> bytes:
    headers = [*kw.pop("headers", _auth(target)), ("Content-Type", "application/json")]
    return raw_request("POST", path, target.port, headers, body, **kw)


def _v2_body(b64: str, shape: list, datatype: str = "BYTES", data: list | None = None) -> bytes:
    spec = {"name": "input", "shape": shape, "datatype": datatype, "data": data or [b64]}
    return json.dumps({"inputs": [spec]}).encode()


def _v1_cases(target: Target, b64: str) -> list[tuple[str, bytes]]:
    predict, explain = f"/v1/models/{target.model}:predict", f"/v1/models/{target.model}:explain"
    nested = b"[" * 100_000 + b"]" * 100_000
    inst = json.dumps({"instances": [{"image_b64": b64}]}).encode()[:-1]  # without its "}"
    cases = [
        ("V1 JSON nested 100,000 deep", b'{"instances": ' + nested + b"}"),
        ("top_k 1e999", inst + b', "top_k": 1e999}'),
        ("top_k of 5000 digits", inst + b', "top_k": ' + b"9" * 5000 + b"}"),
    ]
    out = [(name, _json_post(target, predict, body)) for name, body in cases]
    for t in ("²", [], {}, -1, 1_000_000_000, "nope"):
        body = json.dumps({"instances": [{"image_b64": b64}], "target": t}).encode()
        name = f"explain target {json.dumps(t, ensure_ascii=False)}"
        out.append((name, _json_post(target, explain, body)))
    return out


def _v2_cases(target: Target, b64: str, input_size: list[int]) -> list[tuple[str, bytes]]:
    nested = b"[" * 100_000 + b"]" * 100_000
    zeros = _v2_body(b64, [1, *input_size], "FP32", [0.0] * int(np.prod(input_size)))
    cases = [
        ("V2 JSON nested 100,000 deep", b'{"inputs": ' + nested + b"}"),
        ("V2 BYTES shape [2^63-1, 2^63-1]", _v2_body(b64, [2**63 - 1, 2**63 - 1])),
        ("V2 BYTES shape [2^64]", _v2_body(b64, [2**64])),
        ("V2 BYTES shape of 100 dimensions", _v2_body(b64, [1] * 100)),
        ("V2 BYTES shape [true]", _v2_body(b64, [True])),
        ("V2 FP32 input with a NaN", zeros.replace(b"0.0", b"NaN", 1)),
    ]
    infer = f"/v2/models/{target.model}/infer"
    return [(name, _json_post(target, infer, body)) for name, body in cases]


def _request_cases(
    target: Target, b64: str, max_images: int, max_body_bytes: int
) -> list[tuple[str, bytes]]:
    predict = f"/v1/models/{target.model}:predict"
    one = json.dumps({"instances": [{"image_b64": b64}]}).encode()
    many = json.dumps({"instances": [{"image_b64": b64}] * (max_images + 1)}).encode()
    keys = [("x-api-key", target.key or "none"), ("x-api-key", "wrong")]
    return [
        ("duplicate x-api-key", _json_post(target, predict, one, headers=keys)),
        ("bad Host", _json_post(target, predict, one, host="evil.example")),
        (
            "declared Content-Length over the cap",
            _json_post(target, predict, b"{", content_length=max_body_bytes + 1),
        ),
        (f"{max_images + 1} images (cap {max_images})", _json_post(target, predict, many)),
    ]


def hostile_cases(
    target: Target, image: bytes, input_size: list[int], max_images: int, max_body_bytes: int
) -> list[tuple[str, bytes]]:
    """The hostile-input list: (name, raw request). A good server answers each with a 4xx.

    Args:
        target: the server and model.
        image: a valid encoded image, for the cases where only one field is hostile.
        input_size: the model's ``[C, H, W]``, for the NaN tensor.
        max_images: the server's images-per-request cap (one more is sent).
        max_body_bytes: the server's body cap (a Content-Length one over it is declared).
    """
    b64 = base64.b64encode(image).decode()
    return [
        *_v1_cases(target, b64),
        *_v2_cases(target, b64, input_size),
        *_request_cases(target, b64, max_images, max_body_bytes),
    ]


async def run_hostile(
    target: Target, cases: list[tuple[str, bytes]], timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Each case in turn: its status and time, then the status of ``/v2/health/ready``."""
    rows = []
    for name, raw in cases:
        reply = await exchange(target.port, raw, timeout_s)
        ready = await exchange(target.port, get_request(target, PROBES["ready"]), timeout_s)
        try:
            error = json.loads(reply.body).get("error", "") if reply.body else reply.error
        except (ValueError, AttributeError):
            error = reply.body[:80].decode("latin-1")  # not JSON: recorded as it came
        rows.append(
            {
                "case": name,
                "status": reply.status,
                "ms": reply.seconds * 1000,
                "ready_after": ready.status,
                "error": " ".join(str(error).replace("|", "/").split())[:100],
            }
        )
    return rows


# --- the run


def toy_bundle(arch: str, img_size: int, out: Path) -> str:
    """An untrained ``arch`` exported through the real export path (parity check included)."""
    from bench.serve_bench import untrained_bundle

    return untrained_bundle(arch, img_size, out)


def app_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values as JSON, else text) for :class:`serve.app.AppArgs` fields."""
    from serve.app import AppArgs

    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in AppArgs.model_fields:
            raise SystemExit(f"--app {key}: AppArgs has no such field")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def init_ray(front: str = "auto", limits: FrontLimits | None = None, attempts: int = 3) -> None:
    """``ray.init`` of a local Ray with Serve's ``front`` and its ``limits``
    (:func:`carclf.runtime.use_front`), retried: on a busy machine the raylet can miss Ray's
    fixed 30 s start-up limit; a failed start's processes (this process's children) are ended."""
    import psutil
    import ray

    from carclf.runtime import use_serve_env

    use_serve_env(front, limits)  # the Serve mode and front of the Rays carclf starts
    for attempt in range(1, attempts + 1):
        try:
            ray.init(include_dashboard=False, logging_config=ray.LoggingConfig(log_level="WARNING"))
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            print(f"Ray did not start (attempt {attempt}): {exc}", file=sys.stderr)
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            time.sleep(5)


def start(bundle: str, args: argparse.Namespace) -> tuple[Target, Any]:
    """Ray (this process's own), then the app on ``HOST:--port``; the target and its args."""

    from carclf.bundle import load_bundle
    from serve.app import AppArgs
    from serve.client import wait_ready
    from serve.launch import start_app

    overrides = app_overrides(args.app)
    settings = {"api_key": KEY, **overrides.pop("settings", {})}
    app_args = AppArgs(bundles=[bundle], settings=settings, **overrides)
    init_ray(args.front, app_args.settings.front_limits())
    base = start_app(app_args, host=HOST, port=args.port, name=APP, front=args.front)
    wait_ready(base)
    return Target(args.port, load_bundle(bundle).info.name, KEY), app_args


async def phases(
    target: Target, app_args: Any, args: argparse.Namespace, prober: Prober
) -> dict[str, Any]:
    """The four phases in turn (hostile inputs last, so they meet a server that was abused)."""
    from bench.serve_bench import photos
    from carclf.bundle import load_bundle

    images = photos(args.images)
    size = list(load_bundle(app_args.bundles[0]).info.input_size)
    out: dict[str, Any] = {}
    overloaded = functools.partial(overload, prober=prober)
    for name, phase in (("overload", overloaded), ("replica_kill", replica_kill), ("soak", soak)):
        if name in args.skip:
            continue
        print(f"chaos: {name} …", file=sys.stderr)
        out[name] = await phase(target, images, args)
    s = app_args.settings
    cases = hostile_cases(target, images[0], size, s.max_images, s.max_body_bytes)
    print("chaos: hostile inputs …", file=sys.stderr)
    out["hostile"] = await run_hostile(target, cases)
    return out


# --- the report


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def _ms(p: dict[str, float | None]) -> str:
    if p.get("p50_ms") is None:
        return "-"
    return f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f}"


def overload_rows(o: dict[str, Any]) -> list[dict[str, Any]]:
    """The overload table: one row per level, saturation first."""
    sat = o["saturation"]
    rows = [
        {
            "load": f"saturation ({sat['clients']} closed-loop clients)",
            "offered rps": "-",
            "sent": sum(sat["statuses"].values()),
            "statuses": _counts(sat["statuses"]),
            "refused": "-",
            "refuse p50 / p99 ms": "-",
            "accepted rps": sat["ok_rps"],
            "accepted / saturation": 1.0,
            "ok p50 / p99 ms": _ms(sat),
            **_probe_cells(sat),
        }
    ]
    for lv in o["levels"]:
        rows.append(
            {
                "load": f"{lv['level']} open-loop",
                "offered rps": f"{lv['offered_rps']:.0f} (sent {lv['sent_rps']:.0f})",
                "sent": lv["sent"],
                "statuses": _counts(lv["statuses"]),
                "refused": lv["refused"],
                "refuse p50 / p99 ms": _ms(lv["refuse_latency"]),
                "accepted rps": lv["accepted_rps"],
                "accepted / saturation": lv["accepted_over_saturation"],
                "ok p50 / p99 ms": _ms(lv["ok_latency"]),
                **_probe_cells(lv),
            }
        )
    return rows


def _probe_cells(level: dict[str, Any]) -> dict[str, str]:
    """The probes' columns of a row ("-" for results written before saturation had them)."""
    if "ready" not in level:
        return dict.fromkeys(
            ("live p50 / p99 ms", "ready p50 / p99 ms (statuses)", "front p50 / p99 ms"), "-"
        )
    ready = level["ready"]
    return {
        "live p50 / p99 ms": _ms(level["live"]),
        "ready p50 / p99 ms (statuses)": f"{_ms(ready)} ({_counts(ready['statuses'])})",
        "front p50 / p99 ms": _ms(level["front"]),
    }


def cores_rows(o: dict[str, Any]) -> list[dict[str, Any]]:
    """Cores used at each overload level, by role (the load client shares the machine)."""
    levels = [("saturation", o["saturation"]), *((lv["level"], lv) for lv in o["levels"])]
    roles = list(dict.fromkeys(role for _, lv in levels for role in lv.get("cores", {})))
    return [
        {"load": name, **{role: lv.get("cores", {}).get(role, "-") for role in roles}}
        for name, lv in levels
    ]


def _rounds_lines(o: dict[str, Any]) -> list[str]:
    """Each round's saturation and accepted / saturation, under the table of the median one."""
    if "rounds" not in o:  # results written before the suite ran rounds
        return []
    each = "; ".join(
        f"{r['saturation_rps']:.1f} req/s, "
        + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "saturation_rps" and v)
        for r in o["rounds"]
    )
    return [
        f"{len(o['rounds'])} rounds, each its saturation then every level; the table shows "
        f"round {o['round_shown']}, the median by accepted / saturation at the highest level. "
        f"Each round's saturation and accepted / saturation: {each}.",
        "",
    ]


def kill_rows(k: dict[str, Any]) -> list[dict[str, Any]]:
    """The replica-kill table: before, during (kill to new replica running), after."""
    return [
        {
            "window": name,
            "sent": k[name]["sent"],
            "failed": k[name]["failed"],
            "statuses": _counts(k[name]["statuses"]),
            "p50 / p99 ms": _ms(k[name]),
        }
        for name in ("before", "during", "after")
    ]


def _where_client(r: dict[str, Any]) -> str:
    if "cpus_client" not in r:
        return "the load client runs on the same machine, on the same CPUs"
    return (
        f"the server pinned to CPUs {r['cpus_server']}, the load client and its prober to "
        f"{r['cpus_client']}: `--client-cpus`"
    )


def markdown(r: dict[str, Any]) -> str:
    """chaos.md: the settings, then a table per phase."""
    from carclf.tables import markdown_table, number_cell

    cell = number_cell(2, missing="-")
    lines = [f"# Chaos suite: {r['model']} ({r['arch']}, input {r['input_size']})", ""]
    lines += [
        f"Run {r['started']} to {r['finished']} ({r['seconds']:.0f} s), {r['cpus']} CPUs, "
        f"load average {r['load_average']} at the start; app: {r['app_summary']}.",
        "",
    ]
    if "overload" in r:
        o = r["overload"]
        lines += ["## Overload", "", *markdown_table(overload_rows(o), cell), ""]
        lines += [
            *_rounds_lines(o),
            "Probes, from a process of their own at nice 0, on new connections "
            f"every {r['flags']['probe_every_s']:g} s through saturation and each level: live "
            "and ready are the app's `/v2/health/live` and `/ready` (its health app, where it "
            "has one); front is `/-/healthz`, answered by the HTTP front itself (what KubeRay "
            "probes).",
            "",
            f"Cores used during each level, by part ({_where_client(r)}):",
            "",
            *markdown_table(cores_rows(r["overload"]), cell),
            "",
        ]
        if "niceness" in r:
            nice = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in r["niceness"].items())
            lines += [f"Niceness of each part: {nice}.", ""]
    if "replica_kill" in r:
        k = r["replica_kill"]
        new = k["seconds_to_new_running_replica"]
        lines += ["## Classifier replica killed under load", ""]
        lines += [
            f"{k['clients']} closed-loop clients; replica {k['killed']} killed with "
            f"`ray.kill`; a new replica running after "
            f"{'never (within the limit)' if new is None else f'{new:.1f} s'}.",
            "",
        ]
        lines += [*markdown_table(kill_rows(k), cell), ""]
    if "soak" in r:
        s = r["soak"]
        lines += ["## Soak", ""]
        lines += [
            f"{s['seconds']:g} s after {s['warmup_s']:g} s of warm-up, {s['clients']} "
            f"clients; predict {_counts(s['predict']['statuses'])} (p50 / p99 "
            f"{_ms(s['predict'])} ms), explain {_counts(s['explain']['statuses'])} "
            f"(p50 / p99 {_ms(s['explain'])} ms).",
            "",
        ]
        lines += [*markdown_table(s["rss"], cell), ""]
    lines += ["## Hostile inputs", "", *markdown_table(r["hostile"], cell), ""]
    return "\n".join(lines)


# --- the command line


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The suite's flags: every size and duration."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--bundle", help="a bundle directory; default: export an untrained --arch")
    a("--arch", default="scratch_cnn", help="the toy bundle's architecture")
    a("--img-size", type=int, default=64)
    a("--port", type=int, default=8783)
    a("--app", action="append", default=[], metavar="KEY=VALUE", help="an AppArgs field")
    a("--images", type=int, default=6, help="distinct JPEGs sent (640x480 to 1024x768)")
    a("--timeout-s", type=float, default=15.0, help="client timeout of each request")
    a("--sat-clients", type=int, default=16)
    a("--sat-s", type=float, default=8.0)
    a("--overload-factors", type=float, nargs="+", default=[1.0, 10.0])
    a("--overload-s", type=float, default=10.0)
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


def run_loop(main: Any) -> Any:
    """``asyncio.run(main)``, on uvloop where installed (Ray Serve's uvicorn brings it): the
    load client shares the server's cores, and uvloop spends about half of asyncio's CPU per
    connection, which the server then has."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def default_client_cpus() -> int:
    """One CPU for the load client where the server would keep one or more, else none."""
    return 1 if usable_cpus() >= 2 else 0


def split_cpus(client_cpus: int) -> tuple[set[int], set[int]] | None:
    """This process's CPUs split in two: the server's, then the load client's last
    ``client_cpus`` of them; None where ``client_cpus`` is 0 (all shared).

    Raises:
        SystemExit: the split would leave the server no CPU.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if client_cpus <= 0:
        return None
    if client_cpus >= len(cpus):
        raise SystemExit(f"--client-cpus {client_cpus} leaves the server none of {len(cpus)} CPUs")
    return set(cpus[:-client_cpus]), set(cpus[-client_cpus:])


def pin(cpus: set[int]) -> None:
    """Every thread of this process to ``cpus``; processes it starts from now on inherit them
    (Linux's affinity is per thread, and Ray's threads are already running)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cpus)


def app_summary(app_args: Any) -> str:
    """The app's replicas and limits, and the HTTP front that serves it, in words."""
    from serve.launch import http_front, serve_env

    front = front_in_use()
    threads = os.environ.get(NBTHREAD_ENV) if front == HAPROXY else None
    return (
        f"{app_args.ingress_replicas} ingress and {app_args.classifier_replicas} classifier "
        f"replica(s), settings max_inflight={getattr(app_args.settings, 'max_inflight', '-')}"
        f"; HTTP taken by {http_front(front, serve_env())}"
        + (f", HAProxy threads: {threads}" if threads else "")
    )


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
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "flags": vars(args),
    }
    split = split_cpus(default_client_cpus() if args.client_cpus is None else args.client_cpus)
    if split:
        result["cpus_server"], result["cpus_client"] = sorted(split[0]), sorted(split[1])
        pin(split[0])  # Ray, started next, and every process it starts run on these
    try:
        target, app_args = start(bundle, args)
        if split:
            pin(split[1])  # the load client and its prober
        result["app"] = app_args.model_dump(mode="json")
        result["app_summary"] = app_summary(app_args)
        prober = Prober(target, args.probe_every_s)
        # The load client shares the machine with the server it measures; at a lower priority
        # it takes CPU the server leaves idle, as a client on another machine would. Lower than
        # the server's: Ray runs its workers, every replica among them, at nice 15
        # (RAY_worker_niceness), and a client at 10 had outranked them all.
        os.nice(args.client_nice)
        result["niceness"] = niceness()
        try:
            result.update(run_loop(phases(target, app_args, args, prober)))
        finally:
            prober.close()
    finally:
        if ray.is_initialized():  # serve.shutdown() would start a Ray to shut down
            serve.shutdown()
            ray.shutdown()
    result["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    result["seconds"] = time.time() - started
    return result


def main(argv: list[str] | None = None) -> None:
    """Run the suite; write chaos.json and chaos.md; print the Markdown's path."""
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or toy_bundle(args.arch, args.img_size, Path(tmp))
        result = run(args, bundle)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    (out / "chaos.md").write_text(markdown(result))
    print(out / "chaos.md")


if __name__ == "__main__":
    main()
