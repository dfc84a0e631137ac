"""The chaos suite's own parts, without Ray: what its HTTP client (bench/loadclient.py) makes
of each way a server can answer (a small asyncio server on 127.0.0.1), how overload rounds are
summed up (bench/overload.py, bench/chaos_report.py), and the harness's CPU split and ``--app``
overrides (bench/harness.py)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bench import chaos_report, harness, overload
from bench.loadclient import HOST, Reply, Target, exchange, parse_reply, raw_request
from carclf.config import apply_overrides

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run_against(handler: Handler, timeout_s: float = 5.0) -> Reply:
    """One ``exchange`` with a server that answers as ``handler`` does."""

    async def main() -> Reply:
        server = await asyncio.start_server(handler, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await exchange(port, raw_request("POST", "/x", port, body=b"abc"), timeout_s)

    return asyncio.run(main())


async def _request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    return await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split()[0]))


def test_an_answer_with_a_length_is_read_without_waiting_for_the_close() -> None:
    """A server that keeps the connection open after its answer: the client stops at the
    declared length instead of waiting out its timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-A: b\r\n\r\necho:" + body)
        await writer.drain()
        await reader.read()  # closes only after the client has

    reply = run_against(handler, timeout_s=5.0)
    assert (reply.status, reply.body, reply.headers["x-a"]) == (200, b"echo:abc", "b")
    assert reply.seconds < 2.0


def test_a_chunked_answer_read_to_the_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
        writer.close()

    reply = run_against(handler)
    assert (reply.status, reply.body) == (503, b"abcde")


def test_no_answer_is_status_0_and_says_why() -> None:
    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.close()

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        writer.close()

    assert (run_against(closes).status, run_against(closes).error) == (0, "ConnectionError")
    timed_out = run_against(never, timeout_s=0.3)
    assert (timed_out.status, timed_out.error) == (0, "timeout")
    assert 0.3 <= timed_out.seconds < 2.0
    assert (run_against(cut_short).status, run_against(cut_short).error) == (0, "ValueError")


def test_nothing_listening_is_status_0() -> None:
    async def main() -> Reply:
        server = await asyncio.start_server(lambda r, w: None, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await exchange(port, b"GET / HTTP/1.1\r\n\r\n", 2.0)

    reply = asyncio.run(main())
    assert (reply.status, reply.error) == (0, "ConnectionRefusedError")


@pytest.mark.parametrize(
    "data",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab", b"HTTP/1.1 200 OK\r\nContent-", b""],
)
def test_an_incomplete_response_is_an_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_reply(data)


def test_overload_shows_the_round_with_the_median_ratio_at_the_highest_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each round's levels are divided by its own saturation; the table is the median round's
    by the last level (10x), and every round's ratios are listed under it."""
    ratios = iter([(40.0, 0.99, 0.76), (50.0, 1.0, 0.93), (45.0, 0.97, 0.88)])

    async def one_round(*_: Any) -> dict:
        sat, one, ten = next(ratios)
        levels = [{"level": "1x", "accepted_over_saturation": one}]
        levels.append({"level": "10x", "accepted_over_saturation": ten})
        return {"saturation": {"ok_rps": sat}, "levels": levels}

    monkeypatch.setattr(overload, "overload_round", one_round)
    args = argparse.Namespace(overload_rounds=3)
    out = asyncio.run(overload.overload(None, [], args, None))
    assert out["round_shown"] == 3 and out["saturation"]["ok_rps"] == 45.0
    assert [r["10x"] for r in out["rounds"]] == [0.76, 0.93, 0.88]
    line = chaos_report._rounds_lines(out)[0]
    assert "round 3, the median" in line
    assert "40.0 req/s, 1x 0.99, 10x 0.76; 50.0 req/s" in line


def test_the_client_cpus_are_the_last_ones_and_the_server_keeps_at_least_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(harness.os, "sched_getaffinity", lambda pid: {3, 0, 2, 1})
    assert harness.split_cpus(0) is None  # all shared
    assert harness.split_cpus(1) == ({0, 1, 2}, {3})
    assert harness.split_cpus(3) == ({0}, {1, 2, 3})
    with pytest.raises(SystemExit, match="leaves the server none of 4 CPUs"):
        harness.split_cpus(4)


def test_app_flags_reach_into_the_sections_and_old_keys_name_their_successor() -> None:
    """``--app ingress.num_replicas=1`` is a key of the ingress section; a whole section as
    JSON and a dotted key merge, the later winning; the suite's own defaults stay under them."""
    got = apply_overrides(
        {}, ["ingress.num_replicas=1", 'ingress={"max_inflight": 4}', "ingress.max_inflight=8"]
    )
    assert got == {"ingress": {"max_inflight": 8}}
    pairs = ["ingress.num_replicas=1", "classifier.autoscaling_config.max_replicas=3"]
    pairs.append("classifier.num_replicas=auto")
    args = harness.app_args(["b"], {"ingress": {"api_key": "k", "max_inflight": 4}}, pairs)
    assert (args.ingress.num_replicas, args.ingress.api_key, args.ingress.max_inflight) == (
        1,
        "k",
        4,
    )
    assert args.classifier.num_replicas == "auto"
    assert args.classifier.autoscaling_config["max_replicas"] == 3
    with pytest.raises(SystemExit, match=r"is now 'ingress\.num_replicas'"):
        harness.app_args(["b"], {}, ["ingress_replicas=1"])
    with pytest.raises(SystemExit, match=r"ingress\.no_such_key"):
        harness.app_args(["b"], {}, ["ingress.no_such_key=1"])


def test_the_flood_opens_a_connection_per_request_and_its_row_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flood level (issue 30's shape): closed-loop clients, each request on a new
    connection, and its row in the overload table says so, with no offered rate."""
    connections = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n")
        await writer.drain()
        writer.close()

    class Probes:
        def start(self) -> None:
            pass

        async def stop(self) -> list[Reply]:
            return []

    async def main() -> dict:
        server = await asyncio.start_server(handler, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        args = argparse.Namespace(flood_clients=4, flood_s=0.3, timeout_s=2.0, settle_s=0.0)
        async with server:
            return await overload.flood(Target(port, "body"), [b"x"], args, Probes(), {}, 10.0)

    row = asyncio.run(main())
    assert row["sent"] == len(connections) > 4  # each request came on its own connection
    assert row["statuses"] == {"503": row["sent"]} and row["refused"] == row["sent"]
    table = chaos_report.overload_rows(
        {"saturation": {"clients": 2, "statuses": {}, "ok_rps": 10.0}, "levels": [row]}
    )
    assert table[1]["load"] == "flood (4 closed-loop clients, a new connection each)"
    assert table[1]["offered rps"].startswith("- (sent ")
