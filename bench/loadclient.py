"""The benchmarks' HTTP load client: every request the chaos suite and the serving benchmark send.

Three clients, each for what it measures:

* :func:`exchange`, a bare asyncio protocol, one request per new connection: cheap enough to
  offer 10x overload from one core, and able to send what polite clients cannot (repeated
  headers, a lying ``Content-Length``). :func:`closed_loop` and :func:`open_loop` drive it.
* :func:`keep_alive_load`, a socket client on kept-alive connections: the serving benchmark's
  diagnostic of how much of the HTTP figure is httpx's own CPU.
* :func:`http_load` and :func:`sequential`, httpx: the serving benchmark's headline, a client
  as users of the API would write it.

Every request goes to ``HOST`` (127.0.0.1) only.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

HOST = "127.0.0.1"  # the benchmarks never send anywhere else
JPEG = [("Content-Type", "image/jpeg")]


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


# --- the bytes of requests and replies


def raw_request(
    method: str,
    path: str,
    port: int,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str | None = None,
    content_length: int | None = None,
    close: bool = True,
) -> bytes:
    """The bytes of one request (with ``Connection: close`` unless ``close`` is false);
    ``content_length`` may lie."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'{HOST}:{port}'}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    length = len(body) if content_length is None else content_length
    lines += [f"Content-Length: {length}", *(["Connection: close"] if close else []), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _auth(target: Target) -> list[tuple[str, str]]:
    return [("x-api-key", target.key)] if target.key else []


def predict_request(target: Target, image: bytes) -> bytes:
    """A raw-JPEG ``:predict`` request."""
    return _image_post(target, "predict", image)


def explain_request(target: Target, image: bytes) -> bytes:
    """A raw-JPEG ``:explain`` request."""
    return _image_post(target, "explain", image)


def _image_post(target: Target, verb: str, image: bytes) -> bytes:
    path = f"/v1/models/{target.model}:{verb}"
    return raw_request("POST", path, target.port, [*_auth(target), *JPEG], image)


def get_request(target: Target, path: str) -> bytes:
    """A ``GET`` of ``path`` (with the key: health needs none, but the rest of the API does)."""
    return raw_request("GET", path, target.port, _auth(target))


def json_post(target: Target, path: str, body: bytes, **kw: Any) -> bytes:
    """A JSON ``POST`` with the key, or with ``headers`` instead; the rest as
    :func:`raw_request` takes it (``host``, ``content_length``)."""
    headers = [*kw.pop("headers", _auth(target)), ("Content-Type", "application/json")]
    return raw_request("POST", path, target.port, headers, body, **kw)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of a response head, without its blank line."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers


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


# --- one request per connection


class _OneRequest(asyncio.Protocol):
    """One request on its own connection: written whole, the answer collected until its
    declared length is in or the server closes.

    A protocol, not asyncio's streams: at 10x the load client makes hundreds to thousands of
    connections a second on the server's own cores, and this way each costs about a third less
    CPU than on streams.
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


def run_loop(main: Any) -> Any:
    """``asyncio.run(main)``, on uvloop where installed (Ray Serve's uvicorn brings it): the
    load client shares the server's cores, and uvloop spends about half of asyncio's CPU per
    connection, which the server then has."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# --- kept-alive connections, and httpx


async def keep_alive_load(url: str, images: list[bytes], clients: int) -> dict[str, float]:
    """:func:`http_load` with a bare keep-alive socket client instead of httpx.

    The load generator shares the server's cores; this one costs far less CPU per request than
    httpx, so the difference between the two is the client's share, not the server's.
    """
    parts = urlsplit(url)  # the port is in its netloc, the Host header
    queue = list(images)
    latencies: list[float] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while queue:
                data = queue.pop()
                raw = raw_request("POST", parts.path, 0, JPEG, data, host=parts.netloc, close=False)
                t0 = time.perf_counter()
                writer.write(raw)
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
    return {"images_per_s": len(images) / elapsed, **pct(latencies)}


async def http_load(url: str, images: list[bytes], clients: int) -> dict[str, float]:
    """``clients`` concurrent httpx clients sending raw JPEGs to ``url`` until all are sent."""
    import httpx

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
    return {"images_per_s": len(images) / elapsed, **pct(latencies)}


def sequential(url: str, images: list[bytes]) -> dict[str, float]:
    """One httpx request at a time: p50 and p99 latency of ``images`` posted to ``url``."""
    import httpx

    latencies = []
    with httpx.Client(timeout=120) as http:
        for data in images:
            t0 = time.perf_counter()
            r = http.post(url, content=data, headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
    return pct(latencies)


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
