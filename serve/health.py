"""KServe V2 server health (``/v2/health/live`` and ``/ready``), answered by replicas that do
nothing else.

The ingress answers these paths too, but an ingress replica under load is a busy process: its
event loop routes every admitted request and its decode threads take the CPU, so on a saturated
machine a readiness probe waited 130–500 ms for it at p99 (docs/ARCHITECTURE.md, "Health and
readiness"). This small app sits under the carclf app's route prefix + ``/v2/health``, and both
HTTP fronts send a path to the longest prefix that matches, so the probes reach a process that
is idle between them and answers at once.

It reads the carclf app's state as the ingress does (:class:`serve.ingress.ReplicaWatch`,
polled every ``health_poll_s`` off the event loop): live while an ingress replica runs, ready
while one does and every model has a running classifier replica, neither once Serve's
controller has not answered for a while. Statuses and bodies are the ingress's own; the Host
allow-list applies as there.
"""

# No ``from __future__ import annotations``: Serve reads the builder's annotation at run time
# to turn a config's ``args`` into ``HealthArgs`` (as in serve/app.py).

from pydantic import BaseModel, Field
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.ingress import (
    CLASSIFIER_PREFIX,
    INGRESS_DEPLOYMENT,
    WRONG_HOST,
    ReplicaWatch,
    ServeSettings,
    not_ready,
    request_host_allowed,
    unready_message,
)

HEALTH_PATH = "/v2/health"  # under the carclf app's own route prefix
DEFAULTS = ServeSettings()


class HealthArgs(BaseModel):
    """Arguments of the health app (``serve.health:build_health``)."""

    app: str = Field("carclf", description="the carclf app it answers for (its Serve name)")
    replicas: int = Field(2, ge=1, description="two: one dying does not fail the probes")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(DEFAULTS.allowed_hosts),
        description="as the carclf app's settings.allowed_hosts",
    )
    retry_after_s: int = Field(DEFAULTS.retry_after_s, ge=1)
    health_poll_s: float = Field(DEFAULTS.health_poll_s, gt=0)

    @classmethod
    def of(cls, app: str, settings: ServeSettings) -> "HealthArgs":
        """The health app's arguments for the carclf app ``app`` with these ``settings``."""
        return cls(
            app=app,
            allowed_hosts=settings.allowed_hosts,
            retry_after_s=settings.retry_after_s,
            health_poll_s=settings.health_poll_s,
        )


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

    def __init__(self, args: dict) -> None:
        self.args = HealthArgs.model_validate(args)
        self.replicas = ReplicaWatch(self.args.app, self.args.health_poll_s).start()

    async def __call__(self, request: Request) -> JSONResponse:
        if not request_host_allowed(request, self.args.allowed_hosts):
            return JSONResponse({"error": WRONG_HOST}, 421)
        if request.method not in ("GET", "HEAD"):
            return JSONResponse({"error": "method not allowed"}, 405, {"allow": "GET, HEAD"})
        r = self.replicas
        status, body = verdict(r.counts, r.age_s, r.stale_s, request.url.path.rstrip("/"))
        headers = {"retry-after": str(self.args.retry_after_s)} if status == 503 else None
        return JSONResponse(body, status, headers)


def build_health(args: HealthArgs) -> serve.Application:
    """The health app for the carclf app ``args.app`` (``serve.health:build_health``)."""
    return Health.options(num_replicas=args.replicas).bind(args.model_dump())
