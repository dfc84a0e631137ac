"""KServe V2 server health (``/v2/health/live`` and ``/ready``), answered by replicas that do
nothing else.

The ingress answers these paths too, but an ingress replica under load is a busy process: its
event loop routes every admitted request and its decode threads take the CPU, so on a saturated
machine a readiness probe waits behind them (docs/ARCHITECTURE.md, "Health and readiness"). This
small app sits under the carclf app's route prefix + ``/v2/health``, and both
HTTP fronts send a path to the longest prefix that matches, so the probes reach a process that
is idle between them and answers at once.

It reads the carclf app's state as the ingress does (:class:`serve.readiness.ReplicaWatch`,
polled every ``ingress.health_poll_s`` off the event loop): live while an ingress replica runs,
ready while one does and every model has a running classifier replica, neither once Serve's
controller has not answered for a while. Statuses and bodies are the ingress's own; the Host
allow-list applies as there. Its arguments are the carclf app's own (``serving``, a YAML alias
of them in serve/config.yaml), so its hosts, retry and poll values cannot differ from the app's.
"""

# No ``from __future__ import annotations``: Serve reads the builder's annotation at run time
# to turn a config's ``args`` into ``HealthArgs`` (as in serve/app.py).

from typing import Any

from pydantic import Field, model_validator
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.errors import WRONG_HOST, request_host_allowed
from serve.readiness import ReplicaWatch, not_ready, unready_message
from serve.settings import (
    CLASSIFIER_PREFIX,
    INGRESS_DEPLOYMENT,
    AppArgs,
    IngressSettings,
    Strict,
    refuse_renamed,
)

HEALTH_PATH = "/v2/health"  # under the carclf app's own route prefix
# The keys of the health app's own earlier schema and where each went.
RENAMED = {
    "replicas": "serving.health.num_replicas",
    "allowed_hosts": "serving.ingress.allowed_hosts",
    "retry_after_s": "serving.ingress.retry_after_s",
    "health_poll_s": "serving.ingress.health_poll_s",
}


class HealthArgs(Strict):
    """Arguments of the health app (``serve.health:build_health``)."""

    app: str = Field("carclf", description="the carclf app it answers for (its Serve name)")
    serving: AppArgs = Field(description="the carclf app's own arguments")

    @model_validator(mode="before")
    @classmethod
    def _no_flat_keys(cls, raw: Any) -> Any:
        return refuse_renamed(raw, RENAMED)


def health_route(route_prefix: str) -> str:
    """The health app's route prefix for a carclf app at ``route_prefix``."""
    return route_prefix.rstrip("/") + HEALTH_PATH


def verdict(
    counts: dict[str, int] | None, age_s: float, stale_s: float, path: str
) -> tuple[int, dict]:
    """Status and body for ``path`` (``…/live`` or ``…/ready``), from the app's replica counts.

    Args:
        counts: deployment name → running replicas, as Serve last reported them; None before
            the first report, empty if the app is not deployed.
        age_s: seconds since that report.
        stale_s: a report older than this is not trusted for readiness.
        path: the request's path.
    """
    counts = counts or {}
    if counts.get(INGRESS_DEPLOYMENT, 0) < 1:
        return 503, {"error": "no running ingress replica"}
    if path.endswith("/live"):
        return 200, {"live": True}
    if not path.endswith("/ready"):
        return 404, {"error": f"no route {path}"}
    models = {
        d.removeprefix(CLASSIFIER_PREFIX): n
        for d, n in counts.items()
        if d.startswith(CLASSIFIER_PREFIX)
    }
    missing = not_ready(models, age_s, stale_s, sorted(models)) if models else ["(none)"]
    if missing:
        return 503, {"error": unready_message(missing)}
    return 200, {"ready": True}


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class Health:
    """Answers the carclf app's server health from the replica counts Serve reports."""

    def __init__(self, app: str, settings: dict) -> None:
        self.settings = IngressSettings.model_validate(settings)
        self.replicas = ReplicaWatch(app, self.settings.health_poll_s).start()

    async def __call__(self, request: Request) -> JSONResponse:
        if not request_host_allowed(request, self.settings.allowed_hosts):
            return JSONResponse({"error": WRONG_HOST}, 421)
        if request.method not in ("GET", "HEAD"):
            return JSONResponse({"error": "method not allowed"}, 405, {"allow": "GET, HEAD"})
        r = self.replicas
        status, body = verdict(r.counts, r.age_s, r.stale_s, request.url.path.rstrip("/"))
        headers = self.settings.retry_headers if status == 503 else None
        return JSONResponse(body, status, headers)


def build_health(args: HealthArgs) -> serve.Application:
    """The health app for the carclf app ``args.app`` (``serve.health:build_health``)."""
    serving = args.serving
    return Health.options(num_replicas=serving.health.num_replicas).bind(
        args.app, serving.ingress.model_dump()
    )
