"""The app builder: pydantic arguments → the Serve application for a list of bundles.

Used by ``serve run serve/config.yaml``, ``serve deploy`` and ``carclf serve`` alike.

Every deployment is bounded: the ingress takes at most ``ingress_max_ongoing_requests`` per
replica (its own admission in ``settings`` answers a JSON 503 well before that), and each
caller queues at most ``classifier_max_queued_requests`` / ``explainer_max_queued_requests``
in front of a model (past that the ingress answers 503 with ``Retry-After``). Two ingress
replicas by default, so one dying or draining is no outage.
"""

# No ``from __future__ import annotations`` here: Serve reads the builder's annotation at run
# time to turn a config's ``args`` into ``AppArgs``, and a string annotation would hand the
# builder a plain dict.

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator
from ray.serve import Application

from carclf.bundle import load_ref
from carclf.errors import UserInputError
from serve.deployments import (
    BATCH_WAIT_TIMEOUT_S,
    CLASSIFIER_MAX_ONGOING,
    CLASSIFIER_MAX_QUEUED,
    EXPLAINER_MAX_ONGOING,
    EXPLAINER_MAX_QUEUED,
    MAX_BATCH_SIZE,
    ClassifierDeployment,
    ExplainerDeployment,
)
from serve.ingress import (
    CLASSIFIER_PREFIX,
    EXPLAINER_PREFIX,
    INGRESS_MAX_ONGOING,
    Ingress,
    ServeSettings,
)

# Set only with ``classifier_replicas: auto``: anywhere else they would be silently ignored.
AUTOSCALING_FIELDS = (
    "classifier_min_replicas",
    "classifier_max_replicas",
    "classifier_target_ongoing_requests",
    "classifier_upscale_delay_s",
    "classifier_downscale_delay_s",
    "classifier_look_back_period_s",
    "classifier_metrics_interval_s",
)


class AppArgs(BaseModel):
    """Arguments of the carclf Serve application."""

    bundles: list[str] = Field(
        min_length=1, description="bundle directories (or path@sha256:<hex>, pinned), one each"
    )
    settings: ServeSettings = Field(default_factory=ServeSettings)
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float | None = Field(
        None, ge=0.0, description="how long a batch waits to fill; default 0 on CPU, 10 ms on GPU"
    )
    # A number, or "auto" for Serve's autoscaling between the min and max below.
    classifier_replicas: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    classifier_min_replicas: int = Field(1, ge=1)
    classifier_max_replicas: int = Field(2, ge=1)
    classifier_target_ongoing_requests: float = Field(
        4.0, gt=0, description="ongoing plus queued requests per replica autoscaling aims for"
    )
    classifier_upscale_delay_s: float = Field(30.0, ge=0)
    classifier_downscale_delay_s: float = Field(600.0, ge=0)
    classifier_look_back_period_s: float = Field(30.0, gt=0)
    classifier_metrics_interval_s: float = Field(10.0, gt=0)
    classifier_max_ongoing_requests: int = Field(CLASSIFIER_MAX_ONGOING, ge=1)
    classifier_max_queued_requests: int = Field(CLASSIFIER_MAX_QUEUED, ge=1)
    # How often Serve runs each classifier's check_health (one blank inference): also how soon
    # a dead replica is noticed, replaced and out of readiness.
    classifier_health_check_period_s: float = Field(10.0, gt=0)
    # The explainer is its own bounded pool (serve/deployments.py): past its replicas' slots
    # and each caller's queue, an explain is a fast 503, and predictions never wait behind it.
    explainer_replicas: int = Field(1, ge=1)
    explainer_max_ongoing_requests: int = Field(EXPLAINER_MAX_ONGOING, ge=1)
    explainer_max_queued_requests: int = Field(EXPLAINER_MAX_QUEUED, ge=1)
    ingress_replicas: int = Field(2, ge=1)
    ingress_max_ongoing_requests: int = Field(INGRESS_MAX_ONGOING, ge=1)
    # Requests Serve's proxy holds before it has handed them to an ingress replica; past them
    # its own plain-text 503. The ingress's admission gives the JSON 503s: this bound is a
    # last resort, wide enough for a burst of new connections that the proxy has not yet
    # handed out (on 2 busy cores, 80 at once reached 64 pending).
    ingress_max_queued_requests: int = Field(512, ge=1)
    # A replica being replaced or scaled down stops getting requests, then waits this long for
    # its in-flight ones (checking every wait loop): at least the longest request deadline.
    graceful_shutdown_timeout_s: float = Field(130.0, gt=0)
    graceful_shutdown_wait_loop_s: float = Field(0.5, gt=0)
    # Logical CPUs reserved per replica. Small defaults let several models share a laptop;
    # onnxruntime and torch use max(1, int(cpus)) threads, never more than reserved.
    classifier_cpus: float = Field(0.5, gt=0.0)
    explainer_cpus: float = Field(0.25, gt=0.0)
    # Two ingress replicas share what one had: the total reserved stays 0.1 CPU.
    ingress_cpus: float = Field(0.05, gt=0.0)
    use_gpu: bool = False
    # Serve's access log, a line per request in every replica (and on the console of the
    # process that started Ray): off by default, since the ``carclf_requests_total`` and latency
    # series already count every request by model, endpoint and status, and the lines cost CPU
    # in each replica and in Ray's log forwarding on every request.
    access_log: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "AppArgs":
        s = self.settings
        if self.classifier_replicas != "auto":
            given = [f for f in AUTOSCALING_FIELDS if f in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]} needs classifier_replicas: auto")
        elif self.classifier_min_replicas > self.classifier_max_replicas:
            raise ValueError(
                f"classifier_min_replicas ({self.classifier_min_replicas}) is over "
                f"classifier_max_replicas ({self.classifier_max_replicas})"
            )
        if self.ingress_max_ongoing_requests <= s.max_inflight + s.max_uploads:
            raise ValueError(
                f"ingress_max_ongoing_requests ({self.ingress_max_ongoing_requests}) must be "
                f"over settings.max_inflight + settings.max_uploads ({s.max_inflight} + "
                f"{s.max_uploads}), so health checks and fast 503s always find a slot"
            )
        if self.graceful_shutdown_timeout_s < s.max_request_timeout_s:
            raise ValueError(
                f"graceful_shutdown_timeout_s ({self.graceful_shutdown_timeout_s:g}) is under "
                f"settings.max_request_timeout_s ({s.max_request_timeout_s:g}): a replica "
                "shutting down would cut off requests still within their deadline"
            )
        return self

    def classifier_scaling(self) -> dict[str, Any]:
        """``num_replicas`` and ``autoscaling_config`` options of the classifier deployments."""
        if self.classifier_replicas != "auto":
            return {"num_replicas": self.classifier_replicas}
        return {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": self.classifier_min_replicas,
                "max_replicas": self.classifier_max_replicas,
                "target_ongoing_requests": self.classifier_target_ongoing_requests,
                "upscale_delay_s": self.classifier_upscale_delay_s,
                "downscale_delay_s": self.classifier_downscale_delay_s,
                "look_back_period_s": self.classifier_look_back_period_s,
                "metrics_interval_s": self.classifier_metrics_interval_s,
            },
        }

    def every_deployment(self) -> dict[str, Any]:
        """The options every deployment shares: graceful shutdown and access logging."""
        return {
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "logging_config": {"enable_access_log": self.access_log},
        }


def build_app(args: AppArgs) -> Application:
    """One classifier and one explainer per bundle, behind one FastAPI ingress."""
    classifiers, explainers, preprocess = {}, {}, {}
    batching = {
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s
        if args.batch_wait_timeout_s is not None
        else BATCH_WAIT_TIMEOUT_S["gpu" if args.use_gpu else "cpu"],
    }
    for path in args.bundles:
        # A pinned reference (path@sha256:<hex>) is checked here and again in every replica.
        info = load_ref(path, verify=False).info
        name = info.name
        if name in classifiers:
            raise UserInputError(f"two bundles are named {name!r}; model names must be unique")
        preprocess[name] = info.preprocess.model_dump(mode="json")
        classifiers[name] = ClassifierDeployment.options(
            name=CLASSIFIER_PREFIX + name,
            **args.classifier_scaling(),
            max_ongoing_requests=args.classifier_max_ongoing_requests,
            max_queued_requests=args.classifier_max_queued_requests,
            health_check_period_s=args.classifier_health_check_period_s,
            **args.every_deployment(),
            user_config=batching,
            ray_actor_options={
                "num_cpus": args.classifier_cpus,
                "num_gpus": 1 if args.use_gpu else 0,
            },
        ).bind(path, use_gpu=args.use_gpu)
        explainers[name] = ExplainerDeployment.options(
            name=EXPLAINER_PREFIX + name,
            num_replicas=args.explainer_replicas,
            max_ongoing_requests=args.explainer_max_ongoing_requests,
            max_queued_requests=args.explainer_max_queued_requests,
            **args.every_deployment(),
            ray_actor_options={"num_cpus": args.explainer_cpus},
        ).bind(path)
    ingress = Ingress.options(
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=args.ingress_max_ongoing_requests,
        max_queued_requests=args.ingress_max_queued_requests,
        **args.every_deployment(),
        ray_actor_options={"num_cpus": args.ingress_cpus},
    )
    return ingress.bind(classifiers, explainers, preprocess, args.settings.model_dump())
