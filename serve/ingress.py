"""The HTTP ingress (FastAPI): KServe V1 for images, Open Inference Protocol V2, the web page.

Decodes and checks every image once, resizes and crops it with the image half of each model's
own eval transform (:func:`carclf.data.transforms.eval_resize_crop` of the bundle's
preprocessing; once per distinct preprocessing), then calls the model deployments, which
normalise the uint8 pixels, through the handles it receives in ``__init__``.
Decoding runs in a worker thread, so the event loop keeps accepting requests meanwhile. Every
error is JSON ``{"error": …}`` with the status codes of docs/ARCHITECTURE.md ("HTTP API"); bad
input never reaches a model and never yields a 500.

Image policy (what :func:`decode_image` accepts): JPEG, PNG, WebP and GIF — any other format is
refused with 400 whatever its content type says, which keeps PIL's rarer decoders unreachable.
Animated GIF, WebP and PNG count as their first frame. Images must have at least
``MIN_SIDE`` pixels per side, an aspect ratio of at most ``MAX_ASPECT``:1, at most
``MAX_PIXELS`` pixels and at most ``MAX_TEXT_BYTES`` of text metadata (the serving limits of
:mod:`carclf.data.limits`); anything else is a 400 that says which limit. Grayscale, palette,
CMYK and 16-bit images become RGB, EXIF-rotated ones are turned upright
(:func:`carclf.data.transforms.load_image`).

Request policy, checked before a body is read: the ``Host`` header must name this server (its
own address, or one of ``settings.allowed_hosts``; 421 otherwise, so a web page cannot reach a
loopback server by DNS rebinding); with ``settings.api_key`` every endpoint but health and the
page, the API docs included, needs exactly one matching ``x-api-key`` header; a declared
``Content-Length`` over ``settings.max_body_bytes`` is a 413 that closes the connection; at most
``settings.max_images`` images per request (413). JSON is parsed strictly
(:func:`serve.v2.parse_json`). Errors from the model deployments come back in the client's
terms: a bad target is a 422 with the library's own message (never Ray's text), a full
explainer queue or a restarting replica a 503 with ``Retry-After``.

Load policy (every limit per ingress replica, from ``settings``): past ``max_inflight``
requests at work, or ``max_uploads`` bodies being received, a request gets a JSON 503 with
``Retry-After`` at once, and so does an explain past ``max_explains`` explains at work (a
share of ``max_inflight``, so explains never take the slots predictions need); a body not
received within ``body_timeout_s`` is a 408; a request past its deadline (its ``timeout``
header, else ``request_timeout_s``) is a 504, with its model calls cancelled. A model call
whose replica died is retried once before a 503. Health and readiness
never wait on a model. Where HAProxy is Serve's HTTP front, it applies ``max_inflight``,
``body_timeout_s``, ``max_body_bytes`` and ``retry_after_s`` before a request gets here
(``ServeSettings.front_limits``, carclf/haproxy-front.sh), so under overload these replicas
rarely refuse anything themselves.

Each inference request is counted and timed by model, endpoint and status, and each refused
image or body by kind (:mod:`serve.metrics`, exported through Ray's metrics agent).
"""

import asyncio
import base64
import binascii
import contextlib
import contextvars
import functools
import hmac
import io
import logging
import math
import re
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.context import _get_global_client
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from carclf import __version__
from carclf.data.limits import SERVE_FORMATS
from carclf.data.limits import SERVE_MAX_ASPECT as MAX_ASPECT
from carclf.data.limits import SERVE_MAX_PIXELS as MAX_PIXELS
from carclf.data.limits import SERVE_MAX_TEXT_BYTES as MAX_TEXT_BYTES
from carclf.data.limits import SERVE_MIN_SIDE as MIN_SIDE
from carclf.data.transforms import Preprocess, eval_resize_crop, load_image
from carclf.errors import UserInputError
from carclf.explain_request import check_method, class_index
from carclf.runtime import FrontLimits
from serve import v2
from serve.metrics import ALL_MODELS, CLIENT_GONE, UNKNOWN_MODEL, IngressMetrics

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
FORMATS = SERVE_FORMATS
PAGE = Path(__file__).parent / "static" / "index.html"
# HAProxy, where it is the front, applies the same four limits first (carclf.runtime).
FRONT_DEFAULTS = FrontLimits()
MAX_TOP_K = 1000  # top_k beyond the classes is clamped; this only keeps the number small
T = TypeVar("T")
log = logging.getLogger("ray.serve")


class ServeSettings(BaseModel):
    """Ingress settings, part of the app builder's arguments (``AppArgs.settings``).

    The load limits are per ingress replica: past ``max_inflight`` requests at work (or
    ``max_uploads`` bodies being received) a request gets a JSON 503 with ``Retry-After`` at
    once, so the queue in front of the models stays short and health checks keep a slot.
    """

    max_body_bytes: int = Field(FRONT_DEFAULTS.max_body_bytes, ge=1)
    api_key: str | None = None
    default_top_k: int = Field(5, ge=1)
    max_images: int = Field(32, ge=1, description="images in one request (V1 instances, V2 N)")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"],
        description="Host header names served besides the server's own address; '*' allows "
        "any, '*.example.com' its subdomains",
    )
    max_inflight: int = Field(
        FRONT_DEFAULTS.max_inflight,
        ge=1,
        description="inference requests one ingress replica works on at once",
    )
    max_uploads: int = Field(
        64, ge=1, description="request bodies one ingress replica receives at once"
    )
    max_explains: int | None = Field(
        None,
        ge=1,
        description="explain requests one ingress replica works on at once, within "
        "max_inflight (default a quarter of it): the rest stays free for predictions",
    )
    body_timeout_s: float = Field(
        FRONT_DEFAULTS.body_timeout_s,
        gt=0,
        description="seconds to receive a whole request body; slower is a 408",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="deadline of a request without a `timeout` header; a 504 past it"
    )
    max_request_timeout_s: float = Field(
        120.0, gt=0, description="the longest deadline a client's `timeout` header may ask for"
    )
    decode_threads: int = Field(
        2, ge=1, description="threads per ingress replica that parse, decode and preprocess"
    )
    retry_after_s: int = Field(
        FRONT_DEFAULTS.retry_after_s, ge=1, description="the Retry-After of every 503"
    )
    health_poll_s: float = Field(
        1.0, gt=0, description="how often readiness asks Serve which replicas are running"
    )

    @property
    def explain_slots(self) -> int:
        """Explains at work at once per ingress replica: ``max_explains`` or its default."""
        return self.max_explains or max(1, self.max_inflight // 4)

    @model_validator(mode="after")
    def _explains_leave_room(self) -> "ServeSettings":
        if self.max_explains is not None and self.max_explains >= self.max_inflight:
            raise ValueError(
                f"max_explains ({self.max_explains}) must be under max_inflight "
                f"({self.max_inflight}), so a flood of explains cannot take every slot"
            )
        return self

    @model_validator(mode="after")
    def _timeouts_agree(self) -> "ServeSettings":
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(
                f"request_timeout_s ({self.request_timeout_s:g}) is over "
                f"max_request_timeout_s ({self.max_request_timeout_s:g})"
            )
        return self

    def front_limits(self) -> FrontLimits:
        """The limits HAProxy applies before a request reaches an ingress replica, where it is
        Serve's HTTP front (:func:`carclf.runtime.use_front`)."""
        return FrontLimits(
            max_inflight=self.max_inflight,
            body_timeout_s=self.body_timeout_s,
            max_body_bytes=self.max_body_bytes,
            retry_after_s=self.retry_after_s,
        )


class ApiError(Exception):
    """An error response: HTTP status, a one-line message for the client and extra headers.

    ``kind`` marks a refused image or body (one of :data:`serve.metrics.DECODE_ERROR_KINDS`),
    counted in ``carclf_decode_errors``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.kind = kind


# Terminal colour codes and other control characters never belong in a client's message.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def clean_message(text: str, limit: int = 300) -> str:
    """A message fit for a client: its first line, without control characters, cut short."""
    lines = _ANSI.sub("", text).strip().splitlines()
    line = _CONTROL.sub(" ", lines[0] if lines else "").strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _hostname(value: str) -> str | None:
    """The name in a ``Host`` header (no port, no IPv6 brackets, lower case), or None."""
    try:
        return urlsplit("//" + value).hostname
    except ValueError:  # e.g. an unclosed "[" of an IPv6 literal
        return None


def host_allowed(host: str | None, server: str | None, allowed: list[str]) -> bool:
    """Whether a request's ``Host`` header names this server.

    Args:
        host: the ``Host`` header, None when absent or repeated.
        server: the address the request arrived on (the proxy's own), always allowed.
        allowed: names from ``settings.allowed_hosts``: exact, ``*`` or ``*.domain``.
    """
    name = _hostname(host) if host else None
    if not name:
        return False
    for pattern in [*allowed, *([server] if server else [])]:
        pattern = pattern.strip().strip("[]").lower()
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


WRONG_HOST = "this server does not answer for that Host header"


def request_host_allowed(request: Request, allowed: list[str]) -> bool:
    """:func:`host_allowed` for a request: exactly one ``Host`` header, naming this server."""
    hosts = request.headers.getlist("host")
    server = request.scope.get("server")
    return host_allowed(
        hosts[0] if len(hosts) == 1 else None, server[0] if server else None, allowed
    )


def decode_image(data: bytes) -> Image.Image:
    """Decode uploaded bytes into an upright RGB image, or raise a 400 that says why."""
    if not data:
        raise ApiError(400, "empty image", kind="empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
            _check_limits(header)
            return load_image(data)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(400, "image too large (decompression bomb)", kind="too_large") from None
    except UnidentifiedImageError:
        raise ApiError(400, "not a JPEG, PNG, WebP or GIF image", kind="undecodable") from None
    except Exception as exc:  # PIL raises many types for bad bytes: all are the client's fault
        reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise ApiError(400, f"invalid image: {reason}", kind="invalid") from None


def _check_limits(img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ApiError(
            400, f"image too large ({w}x{h} pixels, at most {MAX_PIXELS})", kind="too_large"
        )
    if min(w, h) < MIN_SIDE:
        raise ApiError(
            400,
            f"image too small ({w}x{h}); each side needs {MIN_SIDE} px or more",
            kind="too_small",
        )
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ApiError(400, f"aspect ratio of {w}x{h} is over {MAX_ASPECT:.0f}:1", kind="aspect")
    text = sum(len(v) for v in img.info.values() if isinstance(v, (str, bytes)))
    if text > MAX_TEXT_BYTES:
        raise ApiError(400, f"image metadata too large ({text} bytes of text)", kind="metadata")


def client_error(exc: BaseException, what: str, retry: dict[str, str]) -> BaseException:
    """A deployment call's failure in the client's terms (an :class:`ApiError`), else ``exc``.

    Ray wraps an exception raised in a replica in a ``RayTaskError`` whose text carries the
    replica's actor name, a traceback and terminal colours: only the cause's own message
    (a :class:`UserInputError`'s) goes back to the client.
    """
    if isinstance(exc, BackPressureError):
        return ApiError(503, f"{what} is busy; retry shortly", retry)
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return ApiError(503, f"{what} is restarting; retry shortly", retry)
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, UserInputError):
        return ApiError(422, str(exc.cause))
    return exc


async def _cancelling(response: Awaitable[T]) -> T:
    """Await a deployment call; when the awaiting is cancelled, cancel the call too.

    Awaiting a ``DeploymentResponse`` does not cancel the replica's work by itself: a request
    past its deadline (or whose client left) must not keep a model busy.
    """
    try:
        return await response
    except asyncio.CancelledError:
        cancel = getattr(response, "cancel", None)
        if cancel is not None:
            cancel()
        raise


async def _all(calls: list[Awaitable[T]]) -> list[T]:
    """Every call's result, in order; the first failure cancels the others."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


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


def not_ready(
    running: dict[str, int] | None, age_s: float, stale_s: float, names: list[str]
) -> list[str]:
    """The models of ``names`` without a running classifier replica.

    Args:
        running: model name → running classifier replicas, as Serve last reported them;
            None before the first report.
        age_s: seconds since that report.
        stale_s: a report older than this counts for nothing (Serve's controller is not
            answering), so every model is reported not ready.
        names: the models to check.
    """
    if running is None or age_s > stale_s:
        return list(names)
    return [n for n in names if running.get(n, 0) < 1]


def running_replicas(app: str) -> dict[str, int]:
    """Deployment name → running replicas in ``app``, asked of Serve's controller; empty when
    ``app`` is not deployed.

    Reads the controller's instance details as the plain dict it sends: ``serve.status()``
    builds the same facts into pydantic models, pickling every deployment's request router on
    the way, ~50 ms of CPU per call against ~1 ms; every ingress and health replica asks each
    ``settings.health_poll_s``, idle or not. Blocking (a call to the controller): run it in a
    thread.
    """
    details = _get_global_client().get_serve_details()
    found = details.get("applications", {}).get(app, {}).get("deployments", {})
    return {
        name: sum(getattr(r["state"], "value", r["state"]) == "RUNNING" for r in d["replicas"])
        for name, d in found.items()
    }


def unready_message(models: list[str]) -> str:
    """The 503's message when ``models`` have no running classifier replica."""
    return f"not ready: no running replica of model {', '.join(repr(m) for m in models)}"


class ReplicaWatch:
    """A Serve app's running replicas per deployment, as its controller last reported them.

    :meth:`watch` (started by :meth:`start`) asks every ``every_s``; a report older than
    ``stale_s`` counts for nothing, so readiness turns 503 when the controller stops answering.
    Shared by the ingress (model readiness) and the health app (:mod:`serve.health`).
    """

    def __init__(self, app: str, every_s: float) -> None:
        self.app = app
        self.every_s = every_s
        self.stale_s = max(5 * every_s, 5.0)
        self.counts: dict[str, int] | None = None  # None before the first report
        self._at = 0.0

    @property
    def age_s(self) -> float:
        """Seconds since the last report."""
        return time.monotonic() - self._at

    def not_ready(self, deployments: dict[str, str]) -> list[str]:
        """The names of ``deployments`` (name → deployment) without a running replica."""
        if self.counts is None:
            return list(deployments)
        running = {n: self.counts.get(d, 0) for n, d in deployments.items()}
        return not_ready(running, self.age_s, self.stale_s, list(deployments))

    def start(self) -> "ReplicaWatch":
        """Run :meth:`watch` on this thread's event loop; the watch itself."""
        self._task = asyncio.get_running_loop().create_task(self.watch())
        return self

    async def watch(self) -> None:
        """Ask Serve's controller for the counts every ``every_s``, forever."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # The default executor, not a decode pool: a flood of images cannot delay it.
                self.counts = await loop.run_in_executor(None, running_replicas, self.app)
                self._at = time.monotonic()
            except Exception as exc:  # the controller restarting: readiness turns 503 when stale
                log.warning("cannot read the replicas' status: %s", clean_message(str(exc)))
            await asyncio.sleep(self.every_s)


def _replay(request: Request, body: bytes) -> Request:
    """A request whose body is ``body`` again: the stream was consumed by the size check."""

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


# The docs pages are routes of the ingress below, behind the same checks as the API.
app = FastAPI(
    title="carclf",
    description="Car classification with explanations",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(
        {"error": clean_message(exc.message)}, status_code=exc.status, headers=exc.headers
    )


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": clean_message(str(exc.detail))},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug on our side: say so without a stack trace; the replica log gets the details.
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error"}, status_code=500)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "malformed request"}, status_code=422)


def _openapi_url(request: Request) -> str:
    # Defined above the class: Serve captures the ingress's routes when the class is decorated.
    return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"


# Serve's defaults for the ingress (the app builder sets its own from ``AppArgs``): enough
# slots for ``max_uploads`` bodies and ``max_inflight`` requests at work with room to spare, so
# health checks and fast 503s always find one.
INGRESS_MAX_ONGOING = 128
# Deployment names in an app (serve/app.py names them; readiness and the benchmarks read them).
INGRESS_DEPLOYMENT = "Ingress"  # the class's name, Serve's default deployment name
CLASSIFIER_PREFIX = "classifier-"  # + the model's name
EXPLAINER_PREFIX = "explainer-"  # + the model's name


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress(app)
class Ingress:
    """Routes requests to per-model classifier and explainer handles.

    The event loop only routes, counts and awaits: parsing, decoding and preprocessing run in
    a pool of ``settings.decode_threads`` threads, and health and readiness never wait on a
    model (readiness reads the replica counts a background task asks Serve for), so they
    answer at once whatever the load.

    Args:
        classifiers: model name → classifier deployment handle.
        explainers: model name → explainer deployment handle.
        preprocess: model name → the bundle's preprocessing (:class:`Preprocess` fields).
        settings: body limit, API key, default top-k, load limits and deadlines.
    """

    def __init__(
        self,
        classifiers: dict[str, DeploymentHandle],
        explainers: dict[str, DeploymentHandle],
        preprocess: dict[str, dict[str, Any]],
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.classifiers = classifiers
        self.explainers = explainers
        specs = {n: Preprocess.model_validate(p) for n, p in preprocess.items()}
        # Models with the same preprocessing share one key, so an image is transformed once.
        self._spec_key = {n: p.model_dump_json() for n, p in specs.items()}
        self._crops = {self._spec_key[n]: eval_resize_crop(p) for n, p in specs.items()}
        self.settings = ServeSettings.model_validate(settings or {})
        self.page = PAGE.read_text(encoding="utf-8")
        self._metadata: dict[str, dict[str, Any]] = {}
        self._retry = {"retry-after": str(self.settings.retry_after_s)}
        self.metrics = IngressMetrics()  # once per replica: Ray keeps one series set per process
        self._pool = ThreadPoolExecutor(self.settings.decode_threads, "carclf-decode")
        self._inflight = 0  # requests past their body, at work (the event loop is one thread)
        self._explaining = 0  # of which explains
        self._uploads = 0  # bodies being received
        self._replicas = self._start_watching()

    def _start_watching(self) -> ReplicaWatch | None:
        """Start asking Serve for the app's running replicas (inside a replica only)."""
        try:
            asyncio.get_running_loop()
            app_name = serve.get_replica_context().app_name
        except (RuntimeError, RayServeException):  # built outside a replica (unit tests)
            return None
        return ReplicaWatch(app_name, self.settings.health_poll_s).start()

    def _unready(self, names: list[str]) -> list[str]:
        if self._replicas is None:
            return list(names)
        return self._replicas.not_ready({n: self.classifiers[n].deployment_name for n in names})

    # --- request plumbing ---------------------------------------------------------------

    def _authorise(self, request: Request, key_needed: bool = True) -> None:
        """The request policy that needs no body: the Host allow-list, then the API key."""
        if not request_host_allowed(request, self.settings.allowed_hosts):
            raise ApiError(421, WRONG_HOST)
        key = self.settings.api_key
        if not key or not key_needed:
            return
        # Exactly one header: with two ("right, wrong"), which one a proxy checks is a guess.
        sent = request.headers.getlist("x-api-key")
        # Bytes, not str: compare_digest refuses non-ASCII str, and headers arrive as latin-1.
        if len(sent) != 1 or not hmac.compare_digest(sent[0].encode("latin-1"), key.encode()):
            raise ApiError(401, "missing, repeated or wrong API key (send one x-api-key header)")

    @contextlib.asynccontextmanager
    async def _observed(self, endpoint: str, name: str | None = None) -> AsyncIterator[None]:
        """Count the request its block answers, time it, and count a refused image or body.

        Args:
            endpoint: the ``endpoint`` tag (:data:`serve.metrics.ENDPOINTS`).
            name: the model named in the path; None for every model (``/v1/analyze``).
        """
        # Only served names become tag values, so random names cannot grow the series.
        known = name in self.classifiers
        model = ALL_MODELS if name is None else name if known else UNKNOWN_MODEL
        start, status = time.perf_counter(), 500
        try:
            yield
            status = 200
        except ApiError as exc:
            status = exc.status
            if exc.kind:
                self.metrics.decode_error(endpoint, exc.kind)
            raise
        except HTTPException as exc:  # e.g. Starlette's 400 for a broken multipart body
            status = exc.status_code
            raise
        except asyncio.CancelledError:  # the client went away; no answer is sent
            status = CLIENT_GONE
            raise
        finally:
            self.metrics.request(model, endpoint, status, time.perf_counter() - start)

    @contextlib.asynccontextmanager
    async def _work(self, request: Request, explain: bool = False) -> AsyncIterator[bytes]:
        """An inference request's deadline, body and admission; yields the body.

        The deadline (the ``timeout`` header, else ``settings.request_timeout_s``) covers
        everything from here on and cancels the model calls it interrupts (504). A request
        is refused with 503 while ``settings.max_inflight`` others are at work (an explain
        also while ``settings.max_explains`` explains are): before its body is read, and
        again after, since others may have been admitted meanwhile.
        """
        s = self.settings
        seconds = deadline_s(
            request.headers.get("timeout"), s.request_timeout_s, s.max_request_timeout_s
        )
        try:
            async with asyncio.timeout(seconds) as timer:
                self._refuse_if_busy(explain)
                body = await self._body(request)
                self._refuse_if_busy(explain)
                self._inflight += 1
                self._explaining += explain
                try:
                    yield body
                finally:
                    self._inflight -= 1
                    self._explaining -= explain
        except TimeoutError:
            if not timer.expired():
                raise
            raise ApiError(
                504, f"no answer within the request's deadline ({seconds:g} s)"
            ) from None

    def _refuse_if_busy(self, explain: bool) -> None:
        if self._inflight >= self.settings.max_inflight:
            raise ApiError(503, "the server is busy; retry shortly", self._retry)
        # Explains hold their slot for a backward pass each: capped apart, they cannot take
        # the slots predictions need.
        if explain and self._explaining >= self.settings.explain_slots:
            raise ApiError(503, "too many explanations in progress; retry shortly", self._retry)

    async def _body(self, request: Request) -> bytes:
        """The request's body within the size limit (413) and ``settings.body_timeout_s`` (408)."""
        limit = self.settings.max_body_bytes
        # Closing the connection stops the client's upload: otherwise the server would read
        # (and drop) the rest of the body to keep the connection alive for the next request.
        close = {"connection": "close"}
        too_large = ApiError(413, f"request body over {limit} bytes", close, "body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise too_large  # refused on the header, before a byte of the body is read
        if self._uploads >= self.settings.max_uploads:
            raise ApiError(503, "too many uploads in progress; retry shortly", self._retry)
        self._uploads += 1
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
            self._uploads -= 1
        return bytes(body)

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the decode pool, with this request's context (Serve's request id)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def _remote(self, call: Awaitable[T], what: str) -> T:
        """Await a deployment call; its failures as errors in the client's terms."""
        try:
            return await call
        except Exception as exc:
            raise client_error(exc, what, self._retry) from None

    async def _ask(self, make: Callable[[], Awaitable[T]], what: str) -> T:
        """One deployment call (``make()``), retried once if its replica died under it.

        Serve's router stops choosing a replica that died, so the retry goes to a live one, or
        waits for the restarted one within the request's deadline.
        """
        try:
            return await _cancelling(make())
        except RayActorError:  # ActorDiedError, ActorUnavailableError
            log.warning("a replica of %s died during a request; retrying it once", what)
        except Exception as exc:
            raise client_error(exc, what, self._retry) from None
        return await self._remote(_cancelling(make()), what)

    async def _images(
        self, request: Request, body: bytes
    ) -> tuple[list[Image.Image], dict[str, Any]]:
        """Decoded images and options from JSON (base64), multipart (``file``) or raw bytes."""
        encoded, options = await self._encoded(request, body)
        return await self._offload(lambda: [decode_image(d) for d in encoded]), options

    async def _encoded(self, request: Request, body: bytes) -> tuple[list[bytes], dict[str, Any]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            return await self._offload(self._json_images, body)
        if kind == "multipart/form-data":
            form = await _replay(request, body).form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "multipart upload needs a file field named 'file'")
            options = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
            return [await upload.read()], options
        if kind in IMAGE_TYPES:
            return [body], dict(request.query_params)
        raise ApiError(
            415,
            f"unsupported media type {kind or '(none)'}; send JSON, multipart "
            "or image/jpeg|png|webp|gif",
            kind="unsupported_type",
        )

    def _json_images(self, body: bytes) -> tuple[list[bytes], dict[str, Any]]:
        try:
            payload = v2.parse_json(body)
        except v2.ProtocolError as exc:
            raise ApiError(422, str(exc)) from None
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            raise ApiError(422, "JSON body needs a non-empty 'instances' list")
        self._check_count(len(instances))
        encoded = []
        for item in instances:
            b64 = item.get("image_b64") if isinstance(item, dict) else None
            if not isinstance(b64, str):
                raise ApiError(422, "each instance needs an 'image_b64' string")
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, "image_b64 is not valid base64", kind="bad_base64") from None
            encoded.append(data)
        options = {k: v for k, v in payload.items() if k != "instances"}
        return encoded, options

    async def _inputs(self, names: list[str], images: list[Image.Image]) -> dict[str, np.ndarray]:
        """Each model's resized and cropped uint8 ``[N, H, W, C]`` pixels, once per distinct
        preprocessing.

        The classifier normalises them (:func:`carclf.data.transforms.to_model_input`): a
        quarter of the float tensor's bytes to serialise and send per image.
        """

        def run() -> dict[str, np.ndarray]:
            by_spec: dict[str, np.ndarray] = {}
            for name in names:
                key = self._spec_key[name]
                if key not in by_spec:
                    by_spec[key] = np.stack([np.asarray(self._crops[key](i)) for i in images])
            return {n: by_spec[self._spec_key[n]] for n in names}

        return await self._offload(run)

    def _check_count(self, n: int) -> None:
        limit = self.settings.max_images
        if n > limit:
            raise ApiError(
                413, f"{n} images in one request; at most {limit}", kind="too_many_images"
            )

    def _model(self, name: str) -> DeploymentHandle:
        if name not in self.classifiers:
            raise ApiError(404, f"unknown model {name!r}; GET /v1/models lists them")
        return self.classifiers[name]

    def _top_k(self, options: dict[str, Any]) -> int:
        k = options.get("top_k", self.settings.default_top_k)
        # "5" from multipart or a query string, 5.0 from JSON; not "²", inf or 1e999.
        digits = isinstance(k, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", k)
        if digits or (isinstance(k, float) and k.is_integer()):
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise ApiError(422, "top_k must be an integer")
        if k < 1:
            raise ApiError(422, "top_k must be at least 1")
        return min(k, MAX_TOP_K)

    # --- KServe V1 ----------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorise(request)
        return {"models": sorted(self.classifiers)}

    @app.post("/v1/models/{name}:predict")
    async def predict(self, name: str, request: Request) -> dict:
        async with self._observed("v1_predict", name):
            self._authorise(request)  # before anything, so unknown names reveal nothing
            handle = self._model(name)
            async with self._work(request) as body:
                images, options = await self._images(request, body)
                k = self._top_k(options)
                batch = (await self._inputs([name], images))[name]
                what = f"model {name!r}"
                calls = [self._ask(lambda x=x: handle.predict.remote(x, k), what) for x in batch]
                return {"predictions": await _all(calls)}

    @app.post("/v1/models/{name}:explain")
    async def explain(self, name: str, request: Request) -> dict:
        async with self._observed("v1_explain", name):
            self._authorise(request)
            self._model(name)  # a 404 before the body is read
            async with self._work(request, explain=True) as body:
                labels = (await self._model_info(name))["labels"]
                images, options = await self._images(request, body)
                try:  # checked here, so a bad request costs no explainer slot
                    method = check_method(options.get("method", "gradcam"))
                    target = class_index(options.get("target"), labels)
                except UserInputError as exc:
                    raise ApiError(422, str(exc)) from None
                # One call per request, not per image: the explainer's queue counts requests.
                explainer = self.explainers[name]
                explanations = await self._ask(
                    lambda: explainer.explain.remote(images, method, target),
                    f"the explainer of {name!r}",
                )
                return {"explanations": explanations}

    @app.post("/v1/analyze")
    async def analyze(self, request: Request) -> dict:
        async with self._observed("analyze"):
            self._authorise(request)
            async with self._work(request) as body:
                images, options = await self._images(request, body)
                if len(images) != 1:
                    raise ApiError(422, "analyze takes exactly one image")
                k = self._top_k(options)
                names = sorted(self.classifiers)
                inputs = await self._inputs(names, images)
                calls = [
                    self._ask(
                        lambda n=n: self.classifiers[n].predict.remote(inputs[n][0], k), "a model"
                    )
                    for n in names
                ]
                return {"models": dict(zip(names, await _all(calls), strict=True))}

    # --- Open Inference Protocol (V2) ---------------------------------------------------

    @app.get("/v2/health/live")
    async def live(self, request: Request) -> dict:
        self._authorise(request, key_needed=False)
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self, request: Request) -> dict:
        # Never a call to a model: under load it would queue behind inference.
        self._authorise(request, key_needed=False)
        missing = self._unready(sorted(self.classifiers))
        if missing:
            raise ApiError(503, unready_message(missing), self._retry)
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata(self, request: Request) -> dict:
        self._authorise(request)
        return {"name": "carclf", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    async def model_metadata(self, name: str, request: Request) -> dict:
        self._authorise(request)
        meta = await self._model_info(name)
        facts = {"execution_provider": meta["provider"], "temperature": meta["temperature"]}
        return v2.model_metadata(name, meta["input_size"], len(meta["labels"]), facts)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str, request: Request) -> dict:
        self._authorise(request)
        self._model(name)
        if self._unready([name]):
            raise ApiError(503, f"model {name!r} not ready", self._retry)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> Response:
        async with self._observed("v2_infer", name):
            payload, header_length = await self._infer_payload(name, request)
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={v2.HEADER_LENGTH: str(header_length)},
        )

    async def _infer_payload(self, name: str, request: Request) -> tuple[bytes, int | None]:
        """The encoded V2 response and its binary header length (None for plain JSON)."""
        self._authorise(request)
        handle = self._model(name)
        limit = self.settings.max_images
        header_length = request.headers.get(v2.HEADER_LENGTH)
        async with self._work(request) as body:
            try:
                req = await self._offload(v2.decode_request, body, header_length, limit)
                results = await self._infer(name, handle, req)
                return await self._offload(v2.encode_response, name, req, results)
            except v2.TooManyError as exc:
                raise ApiError(413, str(exc), kind="too_many_images") from None
            except v2.ProtocolError as exc:
                raise ApiError(422, str(exc)) from None

    async def _model_info(self, name: str) -> dict[str, Any]:
        """The classifier's metadata, asked once per model."""
        handle = self._model(name)
        if name not in self._metadata:
            meta = await self._ask(lambda: handle.metadata.remote(), f"model {name!r}")
            self._metadata[name] = meta
        return self._metadata[name]

    async def _infer(
        self, name: str, handle: DeploymentHandle, req: v2.InferRequest
    ) -> dict[str, np.ndarray]:
        """Run the one input ``input``: BYTES ``[N]`` encoded images or FP32 ``[N,C,H,W]``."""
        if set(req.inputs) != {"input"}:
            raise v2.ProtocolError(
                f"the model takes one input named 'input', got {sorted(req.inputs)}"
            )
        tensor, datatype = req.inputs["input"], req.datatypes["input"]
        if tensor.size == 0:
            raise v2.ProtocolError("input 'input' is empty")
        if datatype == "BYTES":
            if tensor.ndim != 1:
                raise v2.ProtocolError(f"BYTES input must have shape [N], got {list(tensor.shape)}")
            images = await self._offload(lambda: [decode_image(item) for item in tensor])
            tensor = (await self._inputs([name], images))[name]
        else:
            size = list((await self._model_info(name))["input_size"])
            if datatype != "FP32" or tensor.ndim != 4 or list(tensor.shape[1:]) != size:
                raise v2.ProtocolError(
                    f"input 'input' must be FP32 [N, {', '.join(map(str, size))}] or BYTES [N]; "
                    f"got {datatype} {list(tensor.shape)}"
                )
            if not np.isfinite(tensor).all():
                raise v2.ProtocolError("input 'input' holds NaN or infinite values")
        results = await self._ask(lambda: handle.infer.remote(tensor), f"model {name!r}")
        if not all(np.isfinite(out).all() for out in results.values()):
            # Finite but extreme inputs can overflow the model; JSON has no NaN to say so.
            raise v2.ProtocolError("the input's values drive the model's outputs to NaN or inf")
        return results

    # --- the web page --------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def page(self, request: Request) -> HTMLResponse:
        # Static and data-free, so it needs no key; the page sends the key it is given.
        self._authorise(request, key_needed=False)
        return HTMLResponse(self.page)

    # --- the API docs, behind the key like the API they describe ------------------------

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._authorise(request)
        return JSONResponse(request.app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._authorise(request)
        return get_swagger_ui_html(openapi_url=_openapi_url(request), title="carclf API")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        self._authorise(request)
        return get_redoc_html(openapi_url=_openapi_url(request), title="carclf API")
