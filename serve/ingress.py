"""The HTTP ingress (FastAPI): KServe V1 for images, Open Inference Protocol V2, the web page.

Decodes and checks every image once, preprocesses it with each model's own eval transform
(:func:`carclf.data.transforms.eval_transform` of the bundle's preprocessing; once per distinct
preprocessing), then calls the model deployments through the handles it receives in ``__init__``.
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

Each inference request is counted and timed by model, endpoint and status, and each refused
image or body by kind (:mod:`serve.metrics`, exported through Ray's metrics agent).
"""

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import logging
import re
import time
import warnings
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from carclf import __version__
from carclf.data.limits import SERVE_FORMATS
from carclf.data.limits import SERVE_MAX_ASPECT as MAX_ASPECT
from carclf.data.limits import SERVE_MAX_PIXELS as MAX_PIXELS
from carclf.data.limits import SERVE_MAX_TEXT_BYTES as MAX_TEXT_BYTES
from carclf.data.limits import SERVE_MIN_SIDE as MIN_SIDE
from carclf.data.transforms import Preprocess, eval_transform, load_image
from carclf.errors import UserInputError
from carclf.explain import METHODS, class_index
from serve import v2
from serve.metrics import ALL_MODELS, CLIENT_GONE, UNKNOWN_MODEL, IngressMetrics

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
FORMATS = SERVE_FORMATS
PAGE = Path(__file__).parent / "static" / "index.html"
MAX_TOP_K = 1000  # top_k beyond the classes is clamped; this only keeps the number small
RETRY_AFTER_S = "1"
T = TypeVar("T")
log = logging.getLogger("ray.serve")


class ServeSettings(BaseModel):
    """Ingress settings, part of the app builder's arguments (``AppArgs.settings``)."""

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    api_key: str | None = None
    default_top_k: int = Field(5, ge=1)
    max_images: int = Field(32, ge=1, description="images in one request (V1 instances, V2 N)")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"],
        description="Host header names served besides the server's own address; '*' allows "
        "any, '*.example.com' its subdomains",
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


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    """Routes requests to per-model classifier and explainer handles.

    Args:
        classifiers: model name → classifier deployment handle.
        explainers: model name → explainer deployment handle.
        preprocess: model name → the bundle's preprocessing (:class:`Preprocess` fields).
        settings: body limit, API key, default top-k.
    """

    def __init__(
        self,
        classifiers: dict[str, DeploymentHandle],
        explainers: dict[str, DeploymentHandle],
        preprocess: dict[str, dict[str, Any]],
        settings: dict[str, Any] | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(1)  # the transforms' tensor ops; the ingress has a sliver of a CPU
        self.classifiers = classifiers
        self.explainers = explainers
        specs = {n: Preprocess.model_validate(p) for n, p in preprocess.items()}
        # Models with the same preprocessing share one key, so an image is transformed once.
        self._spec_key = {n: p.model_dump_json() for n, p in specs.items()}
        self._transforms = {self._spec_key[n]: eval_transform(p) for n, p in specs.items()}
        self.settings = ServeSettings.model_validate(settings or {})
        self.page = PAGE.read_text(encoding="utf-8")
        self._metadata: dict[str, dict[str, Any]] = {}
        self._retry = {"retry-after": RETRY_AFTER_S}
        self.metrics = IngressMetrics()  # once per replica: Ray keeps one series set per process

    # --- request plumbing ---------------------------------------------------------------

    def _authorise(self, request: Request, key_needed: bool = True) -> None:
        """The request policy that needs no body: the Host allow-list, then the API key."""
        hosts = request.headers.getlist("host")
        server = request.scope.get("server")
        if not host_allowed(
            hosts[0] if len(hosts) == 1 else None,
            server[0] if server else None,
            self.settings.allowed_hosts,
        ):
            raise ApiError(421, "this server does not answer for that Host header")
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

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        # Closing the connection stops the client's upload: otherwise the server would read
        # (and drop) the rest of the body to keep the connection alive for the next request.
        too_large = ApiError(
            413, f"request body over {limit} bytes", {"connection": "close"}, "body_too_large"
        )
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise too_large  # refused on the header, before a byte of the body is read
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def _remote(self, call: Awaitable[T], what: str) -> T:
        """Await a deployment call; its failures as errors in the client's terms.

        Ray wraps an exception raised in a replica in a ``RayTaskError`` whose text carries the
        replica's actor name, a traceback and terminal colours: only the cause's own message
        (a :class:`UserInputError`'s) goes back to the client.
        """
        try:
            return await call
        except BackPressureError:
            raise ApiError(503, f"{what} is busy; retry shortly", self._retry) from None
        except (RayActorError, DeploymentUnavailableError):
            raise ApiError(503, f"{what} is restarting; retry shortly", self._retry) from None
        except RayTaskError as exc:
            if isinstance(exc.cause, UserInputError):
                raise ApiError(422, str(exc.cause)) from None
            raise

    async def _images(self, request: Request) -> tuple[list[Image.Image], dict[str, Any]]:
        """Decoded images and options from JSON (base64), multipart (``file``) or raw bytes."""
        encoded, options = await self._encoded(request)
        return await asyncio.to_thread(lambda: [decode_image(d) for d in encoded]), options

    async def _encoded(self, request: Request) -> tuple[list[bytes], dict[str, Any]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await self._body(request)
        if kind == "application/json":
            return self._json_images(body)
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
        """Each model's ``[N, C, H, W]`` input, transformed once per distinct preprocessing."""

        def run() -> dict[str, np.ndarray]:
            by_spec: dict[str, np.ndarray] = {}
            for name in names:
                key = self._spec_key[name]
                if key not in by_spec:
                    batch = [self._transforms[key](img).numpy() for img in images]
                    by_spec[key] = np.stack(batch)
            return {n: by_spec[self._spec_key[n]] for n in names}

        return await asyncio.to_thread(run)

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
            images, options = await self._images(request)
            k = self._top_k(options)
            batch = (await self._inputs([name], images))[name]
            calls = asyncio.gather(*(handle.predict.remote(x, k) for x in batch))
            preds = await self._remote(calls, f"model {name!r}")
            return {"predictions": list(preds)}

    @app.post("/v1/models/{name}:explain")
    async def explain(self, name: str, request: Request) -> dict:
        async with self._observed("v1_explain", name):
            self._authorise(request)
            labels = (await self._model_info(name))["labels"]
            images, options = await self._images(request)
            method = options.get("method", "gradcam")
            if not isinstance(method, str) or method not in METHODS:
                shown = v2.shown(method)
                raise ApiError(422, f"unknown method {shown}; one of {', '.join(METHODS)}")
            try:  # checked here, so a bad target costs no explainer slot
                target = class_index(options.get("target"), labels)
            except UserInputError as exc:
                raise ApiError(422, str(exc)) from None
            # One call per request, not per image: the explainer's queue counts requests.
            call = self.explainers[name].explain.remote(images, method, target)
            return {"explanations": await self._remote(call, f"the explainer of {name!r}")}

    @app.post("/v1/analyze")
    async def analyze(self, request: Request) -> dict:
        async with self._observed("analyze"):
            self._authorise(request)
            images, options = await self._images(request)
            if len(images) != 1:
                raise ApiError(422, "analyze takes exactly one image")
            k = self._top_k(options)
            names = sorted(self.classifiers)
            inputs = await self._inputs(names, images)
            calls = asyncio.gather(
                *(self.classifiers[n].predict.remote(inputs[n][0], k) for n in names)
            )
            preds = await self._remote(calls, "a model")
            return {"models": dict(zip(names, preds, strict=True))}

    # --- Open Inference Protocol (V2) ---------------------------------------------------

    @app.get("/v2/health/live")
    async def live(self, request: Request) -> dict:
        self._authorise(request, key_needed=False)
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self, request: Request) -> dict:
        self._authorise(request, key_needed=False)
        try:
            await asyncio.gather(*(h.metadata.remote() for h in self.classifiers.values()))
        except Exception:
            raise ApiError(503, "models not ready") from None
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
        handle = self._model(name)
        try:
            await handle.metadata.remote()
        except Exception:
            raise ApiError(503, f"model {name!r} not ready") from None
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
        body = await self._body(request)
        limit = self.settings.max_images
        try:
            req = v2.decode_request(body, request.headers.get(v2.HEADER_LENGTH), limit)
            results = await self._infer(name, handle, req)
            return v2.encode_response(name, req, results)
        except v2.TooManyError as exc:
            raise ApiError(413, str(exc), kind="too_many_images") from None
        except v2.ProtocolError as exc:
            raise ApiError(422, str(exc)) from None

    async def _model_info(self, name: str) -> dict[str, Any]:
        """The classifier's metadata, asked once per model."""
        handle = self._model(name)
        if name not in self._metadata:
            meta = await self._remote(handle.metadata.remote(), f"model {name!r}")
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
            images = await asyncio.to_thread(lambda: [decode_image(item) for item in tensor])
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
        results = await self._remote(handle.infer.remote(tensor), f"model {name!r}")
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
