"""The HTTP ingress (FastAPI): KServe V1 for images, Open Inference Protocol V2 health.

Decodes and checks every image once, then calls the model deployments through the handles it
receives in ``__init__``. Every error is JSON ``{"error": …}`` with the status codes of
DESIGN.md; bad input never reaches a model and never yields a 500.
"""

import asyncio
import base64
import binascii
import hmac
import io
import json
import warnings
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from carclf.data.transforms import load_image
from carclf.errors import UserInputError
from carclf.explain import METHODS

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
MAX_PIXELS = 40_000_000


class ServeSettings(BaseModel):
    """Ingress settings, part of the app builder's arguments."""

    max_body_bytes: int = 10 * 1024 * 1024
    api_key: str | None = None
    default_top_k: int = 5


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes) -> Image.Image:
    """Decode uploaded bytes into RGB, or raise a 400 that says why."""
    if not data:
        raise ApiError(400, "empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ApiError(400, f"image too large ({img.width}x{img.height} pixels)")
            img.load()
        return load_image(data)
    except ApiError:
        raise
    except Exception as exc:  # PIL raises many types for bad bytes: all are the client's fault
        raise ApiError(400, f"invalid image: {exc.__class__.__name__}") from None


def _replay(request: Request, body: bytes) -> Request:
    """A request whose body is ``body`` again: the stream was consumed by the size check."""

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


app = FastAPI(title="carclf", description="Car classification with explanations")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # A bug on our side: say so without a stack trace; the replica log has the details.
    return JSONResponse({"error": "internal error"}, status_code=500)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "malformed request"}, status_code=422)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    """Routes requests to per-model classifier and explainer handles.

    Args:
        classifiers: model name → classifier deployment handle.
        explainers: model name → explainer deployment handle.
        settings: body limit, API key, default top-k.
    """

    def __init__(
        self,
        classifiers: dict[str, DeploymentHandle],
        explainers: dict[str, DeploymentHandle],
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.classifiers = classifiers
        self.explainers = explainers
        self.settings = ServeSettings.model_validate(settings or {})

    # --- request plumbing ---------------------------------------------------------------

    def _authorise(self, request: Request) -> None:
        key = self.settings.api_key
        if key and not hmac.compare_digest(request.headers.get("x-api-key", ""), key):
            raise ApiError(401, "missing or wrong API key (header x-api-key)")

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes")
        return body

    async def _images(self, request: Request) -> tuple[list[Image.Image], dict[str, Any]]:
        """Images and options from JSON (base64), multipart (``file``) or raw image bytes."""
        self._authorise(request)
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
            return [decode_image(await upload.read())], options
        if kind in IMAGE_TYPES:
            return [decode_image(body)], dict(request.query_params)
        raise ApiError(
            415,
            f"unsupported media type {kind or '(none)'}; send JSON, multipart "
            "or image/jpeg|png|webp",
        )

    @staticmethod
    def _json_images(body: bytes) -> tuple[list[Image.Image], dict[str, Any]]:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(422, "malformed JSON") from None
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            raise ApiError(422, "JSON body needs a non-empty 'instances' list")
        images = []
        for item in instances:
            b64 = item.get("image_b64") if isinstance(item, dict) else None
            if not isinstance(b64, str):
                raise ApiError(422, "each instance needs an 'image_b64' string")
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, "image_b64 is not valid base64") from None
            images.append(decode_image(data))
        options = {k: v for k, v in payload.items() if k != "instances"}
        return images, options

    def _model(self, name: str) -> DeploymentHandle:
        if name not in self.classifiers:
            raise ApiError(404, f"unknown model {name!r}; GET /v1/models lists them")
        return self.classifiers[name]

    def _top_k(self, options: dict[str, Any]) -> int:
        try:
            k = int(options.get("top_k", self.settings.default_top_k))
        except (TypeError, ValueError):
            raise ApiError(422, "top_k must be an integer") from None
        if k < 1:
            raise ApiError(422, "top_k must be at least 1")
        return k

    # --- KServe V1 ----------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorise(request)
        return {"models": sorted(self.classifiers)}

    @app.post("/v1/models/{name}:predict")
    async def predict(self, name: str, request: Request) -> dict:
        handle = self._model(name)
        images, options = await self._images(request)
        k = self._top_k(options)
        preds = await asyncio.gather(*(handle.predict.remote(img, k) for img in images))
        return {"predictions": list(preds)}

    @app.post("/v1/models/{name}:explain")
    async def explain(self, name: str, request: Request) -> dict:
        self._model(name)
        images, options = await self._images(request)
        method = str(options.get("method", "gradcam"))
        if method not in METHODS:
            raise ApiError(422, f"unknown method {method!r}; one of {', '.join(METHODS)}")
        target = options.get("target")
        calls = [self.explainers[name].explain.remote(img, method, target) for img in images]
        try:
            explanations = await asyncio.gather(*calls)
        except UserInputError as exc:  # a target the model does not have
            raise ApiError(422, str(exc)) from None
        return {"explanations": list(explanations)}

    @app.post("/v1/analyze")
    async def analyze(self, request: Request) -> dict:
        images, options = await self._images(request)
        if len(images) != 1:
            raise ApiError(422, "analyze takes exactly one image")
        k = self._top_k(options)
        names = sorted(self.classifiers)
        preds = await asyncio.gather(
            *(self.classifiers[n].predict.remote(images[0], k) for n in names)
        )
        return {"models": dict(zip(names, preds, strict=True))}

    # --- Open Inference Protocol (V2) health ---------------------------------------------

    @app.get("/v2/health/live")
    async def live(self) -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self) -> dict:
        try:
            await asyncio.gather(*(h.metadata.remote() for h in self.classifiers.values()))
        except Exception:
            raise ApiError(503, "models not ready") from None
        return {"ready": True}
