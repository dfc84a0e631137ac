"""The app's own Prometheus metrics (issue 14): what the ingress records for each request, and
the series the session's ``served_app`` exports on Ray's metrics port, scraped and parsed with
``prometheus_client``'s text parser as Prometheus would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
import urllib.request
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray.serve.metrics import Counter, Histogram

from serve.errors import ApiError
from serve.metrics import (
    ALL_MODELS,
    BATCH_BUCKETS,
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_S,
    UNKNOWN_MODEL,
    Deferred,
    observed,
)

from .conftest import SERVE_KEY
from .test_serve_inputs import JPEG

AUTH = {"x-api-key": SERVE_KEY}
APP = "carclf-test"  # the application name of conftest's served_app
SCRAPE_DEADLINE_S = 90  # Ray's agent exports every few seconds; a bound, not a wait
N_PREDICT = 3

# --- the ingress's recording logic, no Ray --------------------------------------------------


class Recorder:
    """Stands in for IngressMetrics: keeps what the ingress records."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, int]] = []
        self.errors: list[tuple[str, str]] = []

    def request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.requests.append((model, endpoint, status))

    def decode_error(self, endpoint: str, kind: str) -> None:
        self.errors.append((endpoint, kind))


def observe(name: str | None, exc: BaseException | None = None) -> Recorder:
    """Run one ``observed`` block for model ``name`` that raises ``exc`` (or succeeds)."""
    recorder = Recorder()

    async def block() -> None:
        async with observed(recorder, "v1_predict", name, {"body"}):
            if exc is not None:
                raise exc

    try:
        asyncio.run(block())
    except (Exception, asyncio.CancelledError) as got:
        assert got is exc
    return recorder


class CountingCounter(Counter):
    def __init__(self) -> None:
        super().__init__("carclf_test_counter", tag_keys=("a",))
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.calls.append((value, tags))


class CountingHistogram(Histogram):
    def __init__(self) -> None:
        super().__init__("carclf_test_histogram", boundaries=[1.0], tag_keys=("a",))
        self.calls: list[tuple[float, dict]] = []

    def observe(self, value: float, tags: dict | None = None) -> None:
        self.calls.append((value, tags))


def test_deferred_hands_points_to_ray_from_its_thread_with_counters_summed() -> None:
    counter, histogram = CountingCounter(), CountingHistogram()
    deferred = Deferred(every_s=0.05)
    for i in range(5):
        deferred.inc(counter, {"a": "x"})
        deferred.observe(histogram, float(i), {"a": "y"})
    deferred.inc(counter, {"a": "z"}, 2.0)
    assert counter.calls == [] and histogram.calls == []  # nothing on the caller's thread
    deadline = time.monotonic() + 10
    while len(histogram.calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    # One call per counter series; every histogram point, in order.
    assert sorted(counter.calls, key=repr) == [(2.0, {"a": "z"}), (5.0, {"a": "x"})]
    assert histogram.calls == [(float(i), {"a": "y"}) for i in range(5)]


def test_deferred_keeps_flushing_after_ray_refuses_a_point(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Refusing(CountingCounter):
        def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
            raise ValueError("unknown tag")

    bad, good = Refusing(), CountingCounter()
    deferred = Deferred(every_s=0.05)
    deferred.inc(bad, {"a": "x"})
    deadline = time.monotonic() + 10
    while "flush to Ray failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    deferred.inc(good, {"a": "x"})
    while not good.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "flush to Ray failed" in caplog.text  # said, not swallowed
    assert good.calls == [(1.0, {"a": "x"})]  # and the thread still runs


def test_ingress_records_status_model_and_decode_error_kind() -> None:
    assert observe("body").requests == [("body", "v1_predict", 200)]
    refused = observe("body", ApiError(400, "not an image", kind="undecodable"))
    assert refused.requests == [("body", "v1_predict", 400)]
    assert refused.errors == [("v1_predict", "undecodable")]
    # A name that is not served is one tag value, whatever the name: series stay bounded.
    assert observe("../etc", ApiError(404, "unknown")).requests == [
        (UNKNOWN_MODEL, "v1_predict", 404)
    ]
    assert observe(None).requests == [(ALL_MODELS, "v1_predict", 200)]
    assert observe("body", RuntimeError("bug")).requests == [("body", "v1_predict", 500)]
    assert observe("body", asyncio.CancelledError()).requests == [("body", "v1_predict", 499)]
    assert observe("body", ApiError(422, "bad top_k")).errors == []


# --- the served app's series on Ray's metrics export port ----------------------------------


JSON = {**AUTH, "content-type": "application/json"}


def send_traffic(url: str) -> None:
    """Good and bad requests to every inference endpoint: what ``EXPECTED`` counts."""
    raw = {**AUTH, "content-type": "image/jpeg"}
    for _ in range(N_PREDICT):
        r = httpx.post(f"{url}/v1/models/body:predict", content=JPEG, headers=raw, timeout=60)
        assert r.status_code == 200, r.text[:200]
    b64 = base64.b64encode(JPEG).decode()
    tensor = {"name": "input", "shape": [1], "datatype": "BYTES", "data": [b64]}
    ok = [
        ("/v1/models/body:explain", {"instances": [{"image_b64": b64}]}),
        ("/v1/analyze", {"instances": [{"image_b64": b64}]}),
        ("/v2/models/body/infer", {"inputs": [tensor]}),
    ]
    for path, payload in ok:
        r = httpx.post(url + path, content=json.dumps(payload), headers=JSON, timeout=120)
        assert r.status_code == 200, (path, r.text[:200])
    bad = [
        ("/v1/models/body:predict", b"not an image", "image/png", 400),
        ("/v1/models/body:predict", b"", "image/jpeg", 400),
        ("/v1/models/body:predict", b"hello", "text/plain", 415),
        ("/v1/models/nope:predict", JPEG, "image/jpeg", 404),
    ]
    for path, body, kind, status in bad:
        headers = {**AUTH, "content-type": kind}
        r = httpx.post(url + path, content=body, headers=headers, timeout=60)
        assert r.status_code == status, (path, r.status_code, r.text[:200])


Series = tuple[str, tuple[tuple[str, str], ...]]  # a sample name and the tags it must carry


def requests_of(model: str, endpoint: str, status: int) -> Series:
    tags = (("model", model), ("endpoint", endpoint), ("status", str(status)))
    return "ray_carclf_requests_total", tags


def decode_errors_of(kind: str) -> Series:
    return "ray_carclf_decode_errors_total", (("endpoint", "v1_predict"), ("kind", kind))


BODY = (("model", "body"),)
PREDICTED = (("model", "body"), ("endpoint", "v1_predict"), ("status", "200"))
# What send_traffic must show at least (other tests of the session may add to the counts).
EXPECTED: list[tuple[Series, int]] = [
    (requests_of("body", "v1_predict", 200), N_PREDICT),
    (requests_of("body", "v1_explain", 200), 1),
    (requests_of(ALL_MODELS, "analyze", 200), 1),
    (requests_of("body", "v2_infer", 200), 1),
    (requests_of("body", "v1_predict", 400), 2),
    (requests_of("body", "v1_predict", 415), 1),
    (requests_of(UNKNOWN_MODEL, "v1_predict", 404), 1),
    (decode_errors_of("undecodable"), 1),
    (decode_errors_of("empty"), 1),
    (decode_errors_of("unsupported_type"), 1),
    (("ray_carclf_request_latency_seconds_count", PREDICTED), N_PREDICT),
    (("ray_carclf_batch_size_count", BODY), 1),
    # Predict ×3, analyze and V2 infer: five images through the classifier.
    (("ray_carclf_top1_confidence_count", BODY), N_PREDICT + 2),
]


def metrics_ports() -> list[int]:
    """The metrics export port of every live node of the session's Ray."""
    import ray

    return [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]


def scrape(ports: list[int]) -> list:
    """Every sample of the app's own series (``carclf_*`` of application ``APP``)."""
    samples = []
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name.startswith("ray_carclf_"):
                samples += [s for s in family.samples if s.labels.get("application") == APP]
    return samples


def total(samples: list, series: Series) -> float:
    """The sum over replicas (and any other tags) of the samples of ``series``."""
    name, tags = series
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in tags)
    )


def scrape_until_complete(ports: list[int]) -> list:
    """Scrape until every expected series has its count; fail at the deadline."""
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        samples = scrape(ports)
        lacking = [(sr, total(samples, sr), n) for sr, n in EXPECTED if total(samples, sr) < n]
        if not lacking:
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"after {SCRAPE_DEADLINE_S} s, (series, got, wanted): {lacking}")
        time.sleep(2)


def check_histogram(samples: list, family: str, tags: tuple, bounds: tuple) -> dict[float, float]:
    """The documented bounds, cumulative counts and +Inf equal to the count; the buckets."""
    got: dict[float, float] = defaultdict(float)
    for s in samples:
        if s.name == f"{family}_bucket" and all(s.labels.get(k) == v for k, v in tags):
            got[float(s.labels["le"])] += s.value  # summed over replicas
    assert sorted(got) == [*map(float, bounds), math.inf], (family, sorted(got))
    counts = [got[b] for b in sorted(got)]
    assert counts == sorted(counts), (family, counts)
    assert got[math.inf] == total(samples, (f"{family}_count", tags)), family
    return got


@pytest.mark.integration
def test_served_app_exports_its_own_series(served_app: str) -> None:
    send_traffic(served_app)
    samples = scrape_until_complete(metrics_ports())
    latency = "ray_carclf_request_latency_seconds"
    check_histogram(samples, latency, PREDICTED, LATENCY_BUCKETS_S)
    sizes = check_histogram(samples, "ray_carclf_batch_size", BODY, BATCH_BUCKETS)
    assert sizes[8.0] == sizes[math.inf]  # no batch over the app's max_batch_size of 8
    top1 = check_histogram(samples, "ray_carclf_top1_confidence", BODY, CONFIDENCE_BUCKETS)
    assert top1[0.1] == 0  # seven classes: a top-1 probability is at least 1/7
    # Serve's own tags come with ours, and a status is a plain code.
    for s in samples:
        if s.name == "ray_carclf_requests_total":
            assert {"deployment", "replica", "model", "endpoint", "status"} <= set(s.labels)
            assert s.labels["status"].isdigit(), s.labels
