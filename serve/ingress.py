"""The HTTP ingress (FastAPI): the routes of KServe V1 for images, Open Inference Protocol V2,
the web page and the API docs.

Each route reads as the request's story: authorise it (:mod:`serve.errors`: Host, API key),
admit it and read its body (:mod:`serve.admission`), read its images' headers and take their
decoded pixels from the replica's budget (:mod:`serve.admission`), decode them
(:mod:`serve.images`), crop them with the image half of each model's own eval transform
(:func:`carclf.data.transforms.eval_resize_crop` of the bundle's preprocessing, once per
distinct preprocessing; the explainer gets these crops too), call the model deployments
through the handles received in ``__init__`` (:mod:`serve.calls`), and count it
(:mod:`serve.metrics`). Parsing, decoding and cropping run in a pool of ``decode_threads``
threads, so the event loop only routes, counts and awaits; readiness reads the replica counts
a background task asks Serve for (:mod:`serve.readiness`). With ``api_key`` every endpoint
but health and the page, the API docs included, needs exactly one matching ``x-api-key``
header. docs/ARCHITECTURE.md ("Which file owns which HTTP concern") maps every concern to
its module.
"""

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from carclf import __version__
from carclf.errors import UserInputError
from carclf.explain_request import check_method, class_index
from serve import v2
from serve.admission import Admission
from serve.calls import ask, gather_all
from serve.errors import ApiError, authorise, install_handlers
from serve.images import Crops, open_images, pixel_count, top_k, v1_images
from serve.metrics import IngressMetrics, observed
from serve.readiness import ReplicaWatch, unready_message
from serve.settings import INGRESS_MAX_ONGOING, IngressSettings

PAGE = Path(__file__).parent / "static" / "index.html"
T = TypeVar("T")


async def offloaded(
    pool: ThreadPoolExecutor,
    fn: Callable[..., T],
    *args: Any,
    done: Callable[[], None] | None = None,
) -> T:
    """``fn(*args)`` in ``pool`` (the decode threads), with this request's context (Serve's
    request id).

    ``done`` runs on the event loop once the pool is through with the call: finished, or
    dropped before it started. Not when the request is: a request cancelled by its deadline
    leaves a running call behind, and what that call holds must stay counted until it ends.
    """
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    loop = asyncio.get_running_loop()
    try:
        future = pool.submit(call)
    except BaseException:  # a pool shut down: nothing runs, so nothing stays held
        if done is not None:
            done()
        raise
    if done is not None:
        future.add_done_callback(lambda _: _call_on(loop, done))
    return await asyncio.wrap_future(future)


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """``fn()`` on ``loop``, from any thread; nothing once the loop is closed (a replica
    shutting down has no counters left to keep)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


# The docs pages are routes of the ingress below, behind the same checks as the API.
app = FastAPI(
    title="carclf",
    description="Car classification with explanations",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
install_handlers(app)


def _openapi_url(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress(app)
class Ingress:
    """Routes requests to per-model classifier and explainer handles.

    Args:
        classifiers: model name → classifier deployment handle.
        explainers: model name → explainer deployment handle.
        preprocess: model name → the bundle's preprocessing (:class:`Preprocess` fields).
        settings: the ``ingress`` section of the app's arguments (:class:`IngressSettings`).
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
        self._crops = Crops(preprocess)
        self.settings = IngressSettings.model_validate(settings or {})
        self.admission = Admission(self.settings)
        self.page = PAGE.read_text(encoding="utf-8")
        self._metadata: dict[str, dict[str, Any]] = {}
        self.metrics = IngressMetrics()  # once per replica: Ray keeps one series set per process
        self._pool = ThreadPoolExecutor(self.settings.decode_threads, "carclf-decode")
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
        key = self.settings.api_key if key_needed else None
        authorise(request, self.settings.allowed_hosts, key)

    def _observed(self, endpoint: str, name: str | None = None) -> Any:
        return observed(self.metrics, endpoint, name, self.classifiers)

    async def _offload(
        self, fn: Callable[..., T], *args: Any, done: Callable[[], None] | None = None
    ) -> T:
        return await offloaded(self._pool, fn, *args, done=done)

    def _ask(self, make: Callable[[], Awaitable[T]], what: str) -> Awaitable[T]:
        return ask(make, what, self.admission.retry)

    async def _encoded(self, request: Request, body: bytes) -> tuple[list[bytes], dict[str, Any]]:
        """Encoded images and options from JSON (base64), multipart (``file``) or raw bytes."""
        return await v1_images(request, body, self.settings.max_images, self._offload)

    async def _inputs(self, names: list[str], encoded: list[bytes]) -> dict[str, np.ndarray]:
        """Each model's cropped uint8 pixels of the encoded images (:class:`serve.images.Crops`).

        Headers first: the request's decoded pixels are taken from the replica's budget (413
        or 503, :meth:`Admission.take_pixels`) before any is decoded; only the crops go on."""
        opened = await self._offload(open_images, encoded)
        release = self.admission.take_pixels(pixel_count(opened))
        return await self._offload(self._crops.decode_and_crop, names, opened, done=release)

    def _model(self, name: str) -> DeploymentHandle:
        if name not in self.classifiers:
            raise ApiError(404, f"unknown model {name!r}; GET /v1/models lists them")
        return self.classifiers[name]

    async def _model_info(self, name: str) -> dict[str, Any]:
        """The classifier's metadata, asked once per model."""
        handle = self._model(name)
        if name not in self._metadata:
            meta = await self._ask(lambda: handle.metadata.remote(), f"model {name!r}")
            self._metadata[name] = meta
        return self._metadata[name]

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
            async with self.admission.work(request) as body:
                encoded, options = await self._encoded(request, body)
                k = top_k(options, self.settings.default_top_k)
                batch = (await self._inputs([name], encoded))[name]
                what = f"model {name!r}"
                calls = [self._ask(lambda x=x: handle.predict.remote(x, k), what) for x in batch]
                return {"predictions": await gather_all(calls)}

    @app.post("/v1/models/{name}:explain")
    async def explain(self, name: str, request: Request) -> dict:
        async with self._observed("v1_explain", name):
            self._authorise(request)
            self._model(name)  # a 404 before the body is read
            async with self.admission.work(request, explain=True) as body:
                labels = (await self._model_info(name))["labels"]
                encoded, options = await self._encoded(request, body)
                try:  # checked here, so a bad request costs no decode and no explainer slot
                    method = check_method(options.get("method", "gradcam"))
                    target = class_index(options.get("target"), labels)
                except UserInputError as exc:
                    raise ApiError(422, str(exc)) from None
                # The crops the classifier would get, not the originals: a 224 px crop is
                # 147 KiB, a 40 MP image 120 MB through the object store (and again on a retry).
                crops = (await self._inputs([name], encoded))[name]
                # One call per request, not per image: the explainer's queue counts requests.
                explainer = self.explainers[name]
                explanations = await self._ask(
                    lambda: explainer.explain.remote(crops, method, target),
                    f"the explainer of {name!r}",
                )
                return {"explanations": explanations}

    @app.post("/v1/analyze")
    async def analyze(self, request: Request) -> dict:
        async with self._observed("analyze"):
            self._authorise(request)
            async with self.admission.work(request) as body:
                encoded, options = await self._encoded(request, body)
                if len(encoded) != 1:
                    raise ApiError(422, "analyze takes exactly one image")
                k = top_k(options, self.settings.default_top_k)
                names = sorted(self.classifiers)
                inputs = await self._inputs(names, encoded)
                calls = [
                    self._ask(
                        lambda n=n: self.classifiers[n].predict.remote(inputs[n][0], k), "a model"
                    )
                    for n in names
                ]
                return {"models": dict(zip(names, await gather_all(calls), strict=True))}

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
            raise ApiError(503, unready_message(missing), self.admission.retry)
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
            raise ApiError(503, f"model {name!r} not ready", self.admission.retry)
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
        async with self.admission.work(request) as body:
            try:
                req = await self._offload(v2.decode_request, body, header_length, limit)
                tensor = await self._infer_input(name, req)
                results = await self._ask(lambda: handle.infer.remote(tensor), f"model {name!r}")
                if not all(np.isfinite(out).all() for out in results.values()):
                    # Finite but extreme inputs can overflow the model; JSON has no NaN for it.
                    raise v2.ProtocolError(
                        "the input's values drive the model's outputs to NaN or inf"
                    )
                return await self._offload(v2.encode_response, name, req, results)
            except v2.TooManyError as exc:
                raise ApiError(413, str(exc), kind="too_many_images") from None
            except v2.ProtocolError as exc:
                raise ApiError(422, str(exc)) from None

    async def _infer_input(self, name: str, req: v2.InferRequest) -> np.ndarray:
        """The model's input from V2's one input: BYTES ``[N]`` encoded images, decoded and
        cropped here, or an FP32 ``[N,C,H,W]`` tensor of the model's input size."""
        tensor, datatype = v2.the_input(req)
        if datatype == "BYTES":
            return (await self._inputs([name], list(tensor)))[name]
        v2.check_tensor(tensor, datatype, list((await self._model_info(name))["input_size"]))
        return tensor

    # --- the web page and the API docs (behind the key like the API they describe) -------

    @app.get("/", response_class=HTMLResponse)
    async def page(self, request: Request) -> HTMLResponse:
        # Static and data-free, so it needs no key; the page sends the key it is given.
        self._authorise(request, key_needed=False)
        return HTMLResponse(self.page)

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
