"""Admission: what an ingress replica lets in, how long it may take, and its body.

Load policy (every limit per ingress replica, from the ``ingress`` settings): past
``max_inflight`` requests at work, or ``max_uploads`` bodies being received, a request gets a
JSON 503 with ``Retry-After`` at once, and so does an explain past ``max_explains`` explains at
work (a share of ``max_inflight``, so explains never take the slots predictions need); a
declared ``Content-Length`` over ``max_body_bytes`` is a 413 that closes the connection (one
that is not ASCII digits, a 400 that closes it: :func:`serve.v2.byte_count`); a body
not received within ``body_timeout_s`` is a 408; a request past its deadline (its ``timeout``
header, else ``request_timeout_s``) is a 504, with its model calls cancelled. A request's images
are sized from their headers before any is decoded (:meth:`Admission.take_pixels`): over
``max_request_pixels`` decoded pixels it is a 413, since it would never fit; past what
``max_replica_pixels`` leaves beside the requests decoding now, a 503 with ``Retry-After``,
since it fits once they are done. Where HAProxy is
Serve's HTTP front it applies the first four limits before a request gets here
(:mod:`serve.front`), so under overload these replicas rarely refuse anything themselves.

One :class:`Admission` per replica owns the counters; the replica's event loop is one thread,
so they need no lock.
"""

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable

from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect, Request

from serve.errors import ApiError
from serve.metrics import CLIENT_GONE
from serve.settings import IngressSettings
from serve.v2 import byte_count


def deadline_s(header: str | None, default_s: float, max_s: float) -> float:
    """Seconds a request may take: its ``timeout`` header (capped at ``max_s``) or the default.

    Raises:
        ApiError: 422 for a header that is not a positive, finite number of seconds.
    """
    if header is None:
        return default_s
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ApiError(422, "the timeout header must be a positive number of seconds")
    return min(seconds, max_s)


class Admission:
    """One ingress replica's admission: its counters, the deadlines and body reading.

    Args:
        settings: the ingress's limits.
    """

    def __init__(self, settings: IngressSettings) -> None:
        self.settings = settings
        self.retry = settings.retry_headers
        self.inflight = 0  # requests past their body, at work
        self.explaining = 0  # of which explains
        self.uploads = 0  # bodies being received
        self.pixels = 0  # decoded pixels reserved by requests between their headers and crops

    @contextlib.asynccontextmanager
    async def work(self, request: Request, explain: bool = False) -> AsyncIterator[bytes]:
        """An inference request's deadline, body and admission; yields the body.

        The deadline (the ``timeout`` header, else ``request_timeout_s``) covers everything
        from here on and cancels the model calls it interrupts (504). A request is refused
        with 503 while ``max_inflight`` others are at work (an explain also while
        ``max_explains`` explains are): before its body is read, and again after, since others
        may have been admitted meanwhile.
        """
        s = self.settings
        seconds = deadline_s(
            request.headers.get("timeout"), s.request_timeout_s, s.max_request_timeout_s
        )
        try:
            async with asyncio.timeout(seconds) as timer:
                self.refuse_if_busy(explain)
                body = await self.body(request)
                self.refuse_if_busy(explain)
                self.inflight += 1
                self.explaining += explain
                try:
                    yield body
                finally:
                    self.inflight -= 1
                    self.explaining -= explain
        except TimeoutError:
            if not timer.expired():
                raise
            raise ApiError(
                504, f"no answer within the request's deadline ({seconds:g} s)"
            ) from None

    def refuse_if_busy(self, explain: bool) -> None:
        """A 503 while every slot (or, for an explain, every explain slot) is taken."""
        if self.inflight >= self.settings.max_inflight:
            raise ApiError(503, "the server is busy; retry shortly", self.retry)
        # Explains hold their slot for a backward pass each: capped apart, they cannot take
        # the slots predictions need.
        if explain and self.explaining >= self.settings.explain_slots:
            raise ApiError(503, "too many explanations in progress; retry shortly", self.retry)

    def take_pixels(self, pixels: int) -> Callable[[], None]:
        """Reserve the decoded pixels of a request's images, read from their headers, before
        any is decoded; returns the release (once is enough, more do nothing).

        A per-image cap alone let one request of many large images hold gigabytes; this bounds
        one request and every request of the replica together. The reservation covers the
        whole decode and crop, though a request holds one decoded image at a time: the bound
        is then on the decode work queued as well as on memory.

        Raises:
            ApiError: 413 over ``max_request_pixels`` (retrying cannot help); 503 with
                ``Retry-After`` where the replica's other requests leave too few of
                ``max_replica_pixels`` (a retry can fit).
        """
        s = self.settings
        if pixels > s.max_request_pixels:
            raise ApiError(
                413,
                f"the request's images hold {pixels} pixels; at most {s.max_request_pixels}",
                kind="too_many_pixels",
            )
        if self.pixels + pixels > s.max_replica_pixels:
            raise ApiError(503, "too many images being decoded; retry shortly", self.retry)
        self.pixels += pixels
        held = [pixels]

        def release() -> None:
            self.pixels -= held.pop() if held else 0

        return release

    async def body(self, request: Request) -> bytes:
        """The request's body within ``max_body_bytes`` (413) and ``body_timeout_s`` (408);
        a ``Content-Length`` that is no byte count is a 400."""
        limit = self.settings.max_body_bytes
        # Closing the connection stops the client's upload: otherwise the server would read
        # (and drop) the rest of the body to keep the connection alive for the next request.
        close = {"connection": "close"}
        too_large = ApiError(413, f"request body over {limit} bytes", close, "body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:  # refused on the header, before a byte of the body is read
            length = byte_count(declared, limit)
            if length is None:
                # HTTP's rule for a length that frames nothing (RFC 9112, 6.3): 400 and close.
                raise ApiError(400, "Content-Length must be a byte count in ASCII digits", close)
            if length > limit:
                raise too_large
        if self.uploads >= self.settings.max_uploads:
            raise ApiError(503, "too many uploads in progress; retry shortly", self.retry)
        self.uploads += 1
        seconds = self.settings.body_timeout_s
        body = bytearray()
        try:
            # A slow sender holds one upload slot for at most this long, never the server.
            async with asyncio.timeout(seconds) as timer:
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise too_large
        except TimeoutError:
            if not timer.expired():
                raise
            raise ApiError(408, f"request body not received within {seconds:g} s", close) from None
        except (ClientDisconnect, TaskCancelledError):
            # The client left mid-upload: Starlette says so, or Ray does where Serve's Python
            # proxy cancelled the body's transfer. No one waits for an answer: a 499, not an
            # internal error, and the request ends without an error Ray logs as unhandled.
            raise ApiError(CLIENT_GONE, "the client left before its body was in") from None
        finally:
            self.uploads -= 1
        return bytes(body)
