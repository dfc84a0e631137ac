"""The chaos suite's overload phase: saturation, then open-loop arrivals at multiples of it.

Each round measures its own saturation throughput (closed-loop clients), then each level of
``--overload-factors``: how many requests were refused and how fast, the accepted throughput
against that round's saturation, the cores each part of the system used, and the latency of
the health probes meanwhile (:class:`Prober`, from a process of its own). Saturation moves
between runs on a shared machine, so each level is divided by its own round's, and the round
with the median ratio at the highest level is the one shown.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import numpy as np

from bench.harness import cores_used, cpu_seconds, process_roles
from bench.loadclient import (
    Reply,
    Target,
    closed_loop,
    exchange,
    get_request,
    open_loop,
    pct,
    statuses,
)

REFUSED = (429, 503)  # "come back later": what an overloaded server should answer
# Probed during overload: the app's KServe V2 health, and the health that Serve's HTTP front
# (its Python proxy, or HAProxy) answers itself, which KubeRay and load balancers probe.
PROBES = {"live": "/v2/health/live", "ready": "/v2/health/ready", "front": "/-/healthz"}


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


async def overload_round(
    target: Target, images: list[bytes], args: argparse.Namespace, prober: Prober
) -> dict:
    """Saturation throughput, then open-loop arrivals at each multiple of it; the cores each
    part of the system (and the load client, on the same machine) used at each, and the health
    probes' latency (``prober``) meanwhile."""
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
    if args.flood_clients:
        levels.append(await flood(target, images, args, prober, roles, saturation))
    for factor in args.overload_factors:
        rate = max(saturation, 1.0) * factor
        load = open_loop(target, images, rate, args.overload_s, args.timeout_s, args.max_in_flight)
        level = (f"{factor:g}x", rate, args.overload_s)
        levels.append(await _level(level, load, args, prober, roles, saturation))
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


async def flood(
    target: Target,
    images: list[bytes],
    args: argparse.Namespace,
    prober: Prober,
    roles: dict,
    saturation: float,
) -> dict[str, Any]:
    """``--flood-clients`` closed-loop clients, each request on a new connection, for
    ``--flood-s``: a crowd of clients that retry at once (issue 30's shape), far past the
    admission bound, while the probes run."""

    async def load() -> tuple[list[Reply], int]:
        clients, seconds = args.flood_clients, args.flood_s
        return await closed_loop(target, images, clients, seconds, args.timeout_s), 0

    row = await _level(("flood", None, args.flood_s), load(), args, prober, roles, saturation)
    return {**row, "clients": args.flood_clients}


async def _level(
    level: tuple[str, float | None, float],
    load: Awaitable[tuple[list[Reply], int]],
    args: argparse.Namespace,
    prober: Prober,
    roles: dict,
    saturation: float,
) -> dict[str, Any]:
    """One level's row: ``load`` (its replies, and how many were not sent) run with the
    probes, named, offered and timed by ``level`` (:func:`overload_summary`'s first three),
    the cores each part used, against ``saturation``; then ``--settle-s`` for queues to drain."""
    prober.start()
    t0, cpu0 = time.perf_counter(), cpu_seconds(roles)
    replies, skipped = await load
    cores = cores_used(roles, cpu0, time.perf_counter() - t0)
    row = overload_summary(*level, replies, skipped, await prober.stop())
    row["accepted_over_saturation"] = row["accepted_rps"] / saturation if saturation else None
    row["cores"] = cores
    await asyncio.sleep(args.settle_s)  # let queues drain before the next level
    return row


def overload_summary(
    level: str, rate: float | None, seconds: float, replies: list[Reply], skipped: int, health: list
) -> dict[str, Any]:
    """One overload level's figures: refusals, accepted throughput, health latency (``rate``
    None: a closed loop, which offers what it gets)."""
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


# --- the health probes


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


def _prober(conn: Any, target: Target, every_s: float) -> None:
    """The probing process: a round of probes per ``start``, its replies back at ``stop``."""
    while conn.recv() == "start":
        conn.send(asyncio.run(_probe_rounds(conn, target, every_s)))


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


def probe_stats(health: list[Reply]) -> dict[str, dict[str, Any]]:
    """Each probe's (``PROBES``) statuses and latency."""
    out = {}
    for name in PROBES:
        probes = [r for r in health if r.headers.get("probe") == name]
        out[name] = {"statuses": statuses(probes), **pct([r.seconds for r in probes])}
    return out
