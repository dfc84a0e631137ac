"""Server health answered by the health app (serve/health.py): its verdicts from Serve's replica
counts, and, on the session's served app, that Serve routes ``/v2/health`` to it."""

from __future__ import annotations

import httpx
import pytest

from serve.health import HealthArgs, health_route, verdict

from .conftest import SERVE_PORT

BASE = f"http://127.0.0.1:{SERVE_PORT}"


def test_verdicts_follow_the_apps_running_replicas() -> None:
    up = {"Ingress": 2, "classifier-body": 1, "classifier-brand": 1, "explainer-body": 0}
    assert verdict(up, 0.5, 5.0, "/v2/health/ready") == (200, {"ready": True})
    assert verdict(up, 0.5, 5.0, "/v2/health/live") == (200, {"live": True})
    status, body = verdict({**up, "classifier-brand": 0}, 0.5, 5.0, "/v2/health/ready")
    assert status == 503 and "'brand'" in body["error"] and "'body'" not in body["error"]
    # A report Serve's controller has not renewed: alive, but not trusted as ready.
    assert verdict(up, 6.0, 5.0, "/v2/health/live")[0] == 200
    assert verdict(up, 6.0, 5.0, "/v2/health/ready")[0] == 503
    # No ingress replica, no report yet, the app not deployed, an app without a model.
    for counts in ({**up, "Ingress": 0}, None, {}):
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert verdict(counts, 0.5, 5.0, path) == (503, {"error": "no running ingress replica"})
    assert verdict({"Ingress": 1}, 0.5, 5.0, "/v2/health/ready")[0] == 503
    assert verdict(up, 0.5, 5.0, "/v2/health/other")[0] == 404
    assert health_route("/") == "/v2/health" and health_route("/cars/") == "/cars/v2/health"


def test_health_args_are_the_apps_own_and_refuse_the_old_keys() -> None:
    from pydantic import ValidationError

    args = HealthArgs(app="cars", serving={"bundles": ["b"], "ingress": {"retry_after_s": 4}})
    assert args.serving.ingress.retry_after_s == 4 and args.serving.health.num_replicas == 2
    with pytest.raises(ValidationError, match=r"'replicas' is now 'serving\.health\.num_replicas'"):
        HealthArgs(app="cars", replicas=1, serving={"bundles": ["b"]})


@pytest.mark.integration
def test_serve_routes_health_to_the_health_app(served_app: str) -> None:
    from ray import serve

    from serve.health import build_health

    routes = httpx.get(f"{BASE}/-/routes", timeout=30).json()
    assert routes["/v2/health"] == "carclf-test-health" and routes["/"] == "carclf-test"
    assert httpx.get(f"{served_app}/v2/health/ready", timeout=30).json() == {"ready": True}
    assert httpx.get(f"{served_app}/v2/health/live", timeout=30).json() == {"live": True}
    r = httpx.get(f"{served_app}/v2/health/ready", headers={"host": "evil.example"}, timeout=30)
    assert r.status_code == 421
    assert httpx.post(f"{served_app}/v2/health/ready", timeout=30).status_code == 405
    # One for an app that is not there: 503 with Retry-After, as a load balancer needs.
    serving = {"bundles": ["b"], "health": {"num_replicas": 1}, "ingress": {"retry_after_s": 3}}
    args = HealthArgs(app="absent", serving=serving)
    serve.run(build_health(args), name="absent-health", route_prefix=health_route("/absent"))
    try:
        r = httpx.get(f"{BASE}/absent/v2/health/ready", timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert r.json() == {"error": "no running ingress replica"}
    finally:
        serve.delete("absent-health")
