"""The serving settings: one schema for the carclf app, nested per deployment, and its names.

``serve/config.yaml``'s ``args``, ``carclf serve`` and every test build the same
:class:`AppArgs`. Each deployment has its own section (``classifier``, ``explainer``,
``ingress``, ``health``) holding Serve's own options under Serve's own names
(``num_replicas``, ``autoscaling_config``, ``max_ongoing_requests``, ``max_queued_requests``,
``ray_actor_options``, ...) beside carclf's settings for that deployment: the classifier's
batching, the ingress's request and load policy (docs/ARCHITECTURE.md, "HTTP API"). The health
app (:mod:`serve.health`) takes the same arguments, so its hosts, retry and poll values cannot
differ from the app's. A key of the earlier flat schema is refused with the name that replaced
it.

The deployment names in an app live here too: the builder names the deployments, and
readiness, the health app and the benchmarks find them by these names.
"""

# No ``from __future__ import annotations``: Serve reads the builders' annotations at run time
# to turn a config's ``args`` into these models, and pydantic needs real types.

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Deployment names in an app (serve/app.py names them; readiness and the benchmarks read them).
INGRESS_DEPLOYMENT = "Ingress"  # the ingress class's name, Serve's default deployment name
CLASSIFIER_PREFIX = "classifier-"  # + the model's name
EXPLAINER_PREFIX = "explainer-"  # + the model's name

# Dynamic batching on a CPU replica does not wait: onnxruntime at one thread runs a batch of 8
# no faster per image than 8 batches of 1, so waiting only idles the core; requests that queue
# while a batch runs still go together. A GPU runs a batch nearly as fast as one image, so
# there it waits a little for company.
MAX_BATCH_SIZE = 8
BATCH_WAIT_TIMEOUT_S = {"cpu": 0.0, "gpu": 0.01}
# The classifier's slots per replica and each caller's queue in front of it: 32 ongoing keep
# four batches of 8 ready; a request queued behind 64 would wait seconds on a CPU replica, and
# a 503 with Retry-After serves it better.
CLASSIFIER_MAX_ONGOING = 32
CLASSIFIER_MAX_QUEUED = 64
# The explainer's pool. Passes run one at a time per replica anyway; a second ongoing request
# waits on the lock, so the next one starts without a round trip. The queue is short because
# an explanation takes about ten predictions' time: a client behind 8 of them is better told 503.
EXPLAINER_MAX_ONGOING = 2
EXPLAINER_MAX_QUEUED = 8
# Enough ingress slots for ``max_uploads`` bodies and ``max_inflight`` requests at work with
# room to spare, so health checks and fast 503s always find one.
INGRESS_MAX_ONGOING = 128
# Decoded pixels: a request's images, summed from their headers (a per-image cap alone let 32
# images of 40 MP, 210 KB of JSON, decode to 3.8 GB), and one ingress replica's requests at
# once. An RGB pixel is 3 bytes, so 100 M is 300 MB: more than a 10 MiB body of real photos
# decodes to (JPEG is 0.1 bytes a pixel or more), and two requests of it per replica.
REQUEST_PIXELS = 100_000_000
REPLICA_PIXELS = 200_000_000
# Where the API key comes from when ``ingress.api_key`` and ``api_key_file`` are not given: an
# environment variable (in the RayService, from a Kubernetes Secret), so it need not be in a
# config file or in argv, where every user of the machine can read it.
API_KEY_ENV = "CARCLF_API_KEY"
# Autoscaling, where ``classifier.num_replicas`` is ``auto`` and no config is given: Serve's
# defaults but for the range and the target (ongoing plus queued requests per replica).
CLASSIFIER_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4.0}


class Strict(BaseModel):
    """A section that refuses unknown keys: a typo must not pass for a default."""

    model_config = ConfigDict(extra="forbid")


class ActorOptions(Strict):
    """``ray_actor_options`` of a deployment: the logical CPUs reserved per replica.

    onnxruntime and torch use ``max(1, int(num_cpus))`` threads, never more than reserved.
    """

    num_cpus: float = Field(gt=0.0)


class DeploymentOptions(Strict):
    """Serve's options every carclf deployment has, under Serve's names."""

    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(ge=1)
    max_queued_requests: int = Field(ge=1)
    ray_actor_options: ActorOptions

    def serve_options(self) -> dict[str, Any]:
        """These options as ``Deployment.options`` takes them."""
        return self.model_dump(include=set(DeploymentOptions.model_fields))


class ClassifierOptions(DeploymentOptions):
    """The ONNX classifier of each bundle: replicas, queues, batching (``user_config``)."""

    num_replicas: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve's autoscaling_config; only with num_replicas: auto"
    )
    max_ongoing_requests: int = Field(CLASSIFIER_MAX_ONGOING, ge=1)
    max_queued_requests: int = Field(CLASSIFIER_MAX_QUEUED, ge=1)
    # How often Serve runs each classifier's check_health (one blank inference): also how soon
    # a dead replica is noticed, replaced and out of readiness.
    health_check_period_s: float = Field(10.0, gt=0)
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.5))
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float | None = Field(
        None, ge=0.0, description="how long a batch waits to fill; default 0 on CPU, 10 ms on GPU"
    )

    @field_validator("autoscaling_config")
    @classmethod
    def _serve_checks_it(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        from ray.serve.config import AutoscalingConfig  # here: `carclf --help` loads no Ray

        # Serve's own model: its names, its checks (min over max, ...), its defaults.
        return AutoscalingConfig(**{**CLASSIFIER_AUTOSCALING, **value}).model_dump(
            include={*CLASSIFIER_AUTOSCALING, *value}
        )

    @model_validator(mode="after")
    def _autoscaling_needs_auto(self) -> "ClassifierOptions":
        if self.autoscaling_config is not None and self.num_replicas != "auto":
            raise ValueError("classifier.autoscaling_config needs classifier.num_replicas: auto")
        return self

    def serve_options(self) -> dict[str, Any]:
        options = {**super().serve_options(), "health_check_period_s": self.health_check_period_s}
        if self.num_replicas == "auto":
            options["autoscaling_config"] = self.autoscaling_config or dict(CLASSIFIER_AUTOSCALING)
        return options

    def batching(self, use_gpu: bool) -> dict[str, Any]:
        """The classifier's ``user_config``: batch size and wait (changeable at run time)."""
        wait = self.batch_wait_timeout_s
        if wait is None:
            wait = BATCH_WAIT_TIMEOUT_S["gpu" if use_gpu else "cpu"]
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": wait}


class ExplainerOptions(DeploymentOptions):
    """The Grad-CAM explainer of each bundle: its own bounded pool (serve/deployments.py), so
    past its slots and each caller's queue an explain is a fast 503 and predictions never wait
    behind it."""

    max_ongoing_requests: int = Field(EXPLAINER_MAX_ONGOING, ge=1)
    max_queued_requests: int = Field(EXPLAINER_MAX_QUEUED, ge=1)
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.25))


class HealthOptions(Strict):
    """The health app's replicas (serve/health.py): two, so one dying does not fail probes."""

    num_replicas: int = Field(2, ge=1)


class IngressSettings(DeploymentOptions):
    """The FastAPI ingress: Serve's options, then the request and load policy of each replica.

    The load limits are per ingress replica: past ``max_inflight`` requests at work (or
    ``max_uploads`` bodies being received) a request gets a JSON 503 with ``Retry-After`` at
    once, so the queue in front of the models stays short and health checks keep a slot.
    Decoded pixels are budgeted the same way, from the images' headers before any is decoded:
    a request over ``max_request_pixels`` is a 413 (it never fits), one that would take the
    replica past ``max_replica_pixels`` a 503 (it fits once others are done).
    Where HAProxy is Serve's HTTP front it applies ``max_inflight``, ``body_timeout_s``,
    ``max_body_bytes`` and ``retry_after_s`` first (:mod:`serve.front`).
    """

    num_replicas: int = Field(2, ge=1, description="two, so one dying or draining is no outage")
    max_ongoing_requests: int = Field(INGRESS_MAX_ONGOING, ge=1)
    # Requests Serve's proxy holds before it has handed them to an ingress replica; past them
    # its own plain-text 503. The ingress's admission gives the JSON 503s: this bound is a
    # last resort, wide enough for a burst of new connections not yet handed out.
    max_queued_requests: int = Field(512, ge=1)
    # Two ingress replicas share what one had.
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.05))
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    api_key: str | None = Field(
        None,
        description="the key every endpoint but health and the page needs in x-api-key; "
        f"default the file api_key_file, else the environment variable {API_KEY_ENV}",
    )
    api_key_file: str | None = Field(
        None, description="a file holding the API key (a mounted Secret), read at start"
    )
    allow_unauthenticated: bool = Field(
        False,
        description="serve without an API key on an address other than loopback; off, "
        "such a server is refused",
    )
    default_top_k: int = Field(5, ge=1)
    max_images: int = Field(32, ge=1, description="images in one request (V1 instances, V2 N)")
    max_request_pixels: int = Field(
        REQUEST_PIXELS,
        ge=1,
        description="decoded pixels of one request's images, summed from their headers "
        "before any is decoded; more is a 413",
    )
    max_replica_pixels: int = Field(
        REPLICA_PIXELS,
        ge=1,
        description="decoded pixels one ingress replica's requests hold at once, from the "
        "headers to the last crop; a request that would go over it is a 503 with Retry-After",
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"],
        description="Host header names served besides the server's own address; '*' allows "
        "any, '*.example.com' its subdomains",
    )
    max_inflight: int = Field(
        32, ge=1, description="inference requests one ingress replica works on at once"
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
        10.0, gt=0, description="seconds to receive a whole request body; slower is a 408"
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
    retry_after_s: int = Field(1, ge=1, description="the Retry-After of every 503")
    health_poll_s: float = Field(
        1.0, gt=0, description="how often readiness asks Serve which replicas are running"
    )

    @property
    def explain_slots(self) -> int:
        """Explains at work at once per ingress replica: ``max_explains`` or its default."""
        return self.max_explains or max(1, self.max_inflight // 4)

    @property
    def retry_headers(self) -> dict[str, str]:
        """The headers of every 503."""
        return {"retry-after": str(self.retry_after_s)}

    @model_validator(mode="after")
    def _one_key(self) -> "IngressSettings":
        """Resolve the key from its file or the environment into ``api_key``, once; refuse an
        empty one, which would otherwise turn authentication off."""
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give ingress.api_key or ingress.api_key_file, not both")
        if self.api_key is not None:
            self.api_key = checked_key(self.api_key, "api_key")
        elif self.api_key_file is not None:
            self.api_key = checked_key(_read_key_file(self.api_key_file), self.api_key_file)
        elif API_KEY_ENV in os.environ:
            self.api_key = checked_key(os.environ[API_KEY_ENV], f"${API_KEY_ENV}")
        self.api_key_file = None  # resolved: the replicas get the key, not a path on this node
        return self

    @model_validator(mode="after")
    def _limits_agree(self) -> "IngressSettings":
        if self.max_explains is not None and self.max_explains >= self.max_inflight:
            raise ValueError(
                f"max_explains ({self.max_explains}) must be under max_inflight "
                f"({self.max_inflight}), so a flood of explains cannot take every slot"
            )
        if self.max_request_pixels > self.max_replica_pixels:
            raise ValueError(
                f"ingress.max_request_pixels ({self.max_request_pixels}) is over "
                f"ingress.max_replica_pixels ({self.max_replica_pixels}): such a request "
                "would never fit, and would be told to retry"
            )
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(
                f"request_timeout_s ({self.request_timeout_s:g}) is over "
                f"max_request_timeout_s ({self.max_request_timeout_s:g})"
            )
        if self.max_ongoing_requests <= self.max_inflight + self.max_uploads:
            raise ValueError(
                f"ingress.max_ongoing_requests ({self.max_ongoing_requests}) must be over "
                f"ingress.max_inflight + ingress.max_uploads ({self.max_inflight} + "
                f"{self.max_uploads}), so health checks and fast 503s always find a slot"
            )
        return self


def checked_key(key: str, source: str) -> str:
    """``key`` as given, refused where it would not protect anything or cannot be sent.

    Raises:
        ValueError: an empty key, or one with spaces at its ends or control characters
            (a header cannot carry them, so no client could ever match it).
    """
    if not key.strip():
        raise ValueError(f"{source}: the API key is empty, which would turn authentication off")
    if key != key.strip() or not key.isprintable():
        raise ValueError(f"{source}: the API key has spaces at its ends or control characters")
    return key


def _read_key_file(path: str) -> str:
    """The key in ``path``, without the line end that ``echo`` and editors add."""
    try:
        return Path(path).expanduser().read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise ValueError(f"{path}: cannot read the API key file ({why})") from None


# The flat schema's keys and where each went; ``settings.X`` became ``ingress.X``.
RENAMED = {
    "settings": "ingress",
    "max_batch_size": "classifier.max_batch_size",
    "batch_wait_timeout_s": "classifier.batch_wait_timeout_s",
    "classifier_replicas": "classifier.num_replicas",
    "classifier_cpus": "classifier.ray_actor_options.num_cpus",
    "explainer_replicas": "explainer.num_replicas",
    "explainer_cpus": "explainer.ray_actor_options.num_cpus",
    "ingress_replicas": "ingress.num_replicas",
    "ingress_cpus": "ingress.ray_actor_options.num_cpus",
    **{
        f"classifier_{key}": f"classifier.autoscaling_config.{key}"
        for key in (
            "min_replicas",
            "max_replicas",
            "target_ongoing_requests",
            "upscale_delay_s",
            "downscale_delay_s",
            "look_back_period_s",
            "metrics_interval_s",
        )
    },
    **{
        f"{deployment}_{key}": f"{deployment}.{key}"
        for deployment in ("classifier", "explainer", "ingress")
        for key in ("max_ongoing_requests", "max_queued_requests")
    },
    "classifier_health_check_period_s": "classifier.health_check_period_s",
}


def refuse_renamed(raw: Any, renamed: dict[str, str]) -> Any:
    """``raw`` as it is, or a ValueError naming the key that replaced an old one in it."""
    old = sorted(set(raw) & set(renamed)) if isinstance(raw, dict) else []
    if old:
        key = old[0]
        hint = " (its keys moved up one level)" if key == "settings" else ""
        raise ValueError(f"{key!r} is now {renamed[key]!r}{hint}; see serve/config.yaml")
    return raw


class AppArgs(Strict):
    """Arguments of the carclf Serve application (``serve.app:build_app``)."""

    bundles: list[str] = Field(
        min_length=1, description="bundle directories (or path@sha256:<hex>, pinned), one each"
    )
    classifier: ClassifierOptions = Field(default_factory=ClassifierOptions)
    explainer: ExplainerOptions = Field(default_factory=ExplainerOptions)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    health: HealthOptions = Field(default_factory=HealthOptions)
    use_gpu: bool = False
    # A replica being replaced or scaled down stops getting requests, then waits this long for
    # its in-flight ones (checking every wait loop): at least the longest request deadline.
    graceful_shutdown_timeout_s: float = Field(130.0, gt=0)
    graceful_shutdown_wait_loop_s: float = Field(0.5, gt=0)
    # Serve's access log, a line per request in every replica: off, since
    # ``carclf_requests_total`` and the latency series already count every request by model,
    # endpoint and status, and the lines cost CPU in each replica and in Ray's log forwarding.
    access_log: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_flat_keys(cls, raw: Any) -> Any:
        return refuse_renamed(raw, RENAMED)

    @model_validator(mode="after")
    def _shutdown_outlasts_requests(self) -> "AppArgs":
        longest = self.ingress.max_request_timeout_s
        if self.graceful_shutdown_timeout_s < longest:
            raise ValueError(
                f"graceful_shutdown_timeout_s ({self.graceful_shutdown_timeout_s:g}) is under "
                f"ingress.max_request_timeout_s ({longest:g}): a replica shutting down would "
                "cut off requests still within their deadline"
            )
        return self

    def every_deployment(self) -> dict[str, Any]:
        """The options every deployment shares: graceful shutdown and access logging."""
        return {
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "logging_config": {"enable_access_log": self.access_log},
        }
