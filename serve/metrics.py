"""The app's own Prometheus metrics, exported through Ray's metrics agent (``ray.serve.metrics``).

Each replica creates its metrics once, in its deployment's ``__init__``; Ray reports them every
few seconds to the node's metrics agent, which serves them in Prometheus text format on the node's
metrics export port (``ray start --metrics-export-port``, or the ``MetricsExportPort`` of
``ray.nodes()``) beside Ray's and Serve's own. Ray prefixes every name with ``ray_`` and counters
get Prometheus' ``_total`` suffix, so ``carclf_requests`` is scraped as
``ray_carclf_requests_total``. Serve adds the tags ``deployment``, ``replica`` and
``application`` to every series.

The ingress records (tags in brackets):

- ``carclf_requests`` [model, endpoint, status]: inference requests by HTTP status.
- ``carclf_request_latency_seconds`` [model, endpoint, status]: time in the ingress, from the
  route's first line to its answer (``LATENCY_BUCKETS_S``).
- ``carclf_decode_errors`` [endpoint, kind]: images and bodies refused before any model saw them,
  by ``kind`` (``DECODE_ERROR_KINDS``).

The classifier records:

- ``carclf_batch_size`` [model]: images per ``@serve.batch`` call (``BATCH_BUCKETS``).
- ``carclf_top1_confidence`` [model]: the calibrated top-1 probability of every image it
  classifies (``CONFIDENCE_BUCKETS``); a shift in this distribution is the first sign of drift.

Points are recorded off the request path: a request appends to a queue (a C-level append that
keeps the GIL), and one background thread per process hands the points to Ray every
``FLUSH_S``, summing counter increments first. Ray's ``record`` releases the GIL, and under load
the event loop then waited for it behind the decode threads for up to a switch interval on every
call: profiled at 10x overload, a third of the ingress event loop's time went there.

Tag values are bounded, so a client cannot grow the number of series: ``model`` is a served
model's name, ``UNKNOWN_MODEL`` for any other name, ``ALL_MODELS`` for ``/v1/analyze``;
``endpoint`` one of ``ENDPOINTS``; ``status`` an HTTP status, or ``499`` when the client went
away before its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import AsyncIterator, Collection

import numpy as np
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from serve.errors import ApiError

Metric = Counter | Histogram
log = logging.getLogger("ray.serve")

# Seconds: a cached prediction takes a few ms, an explanation of 32 images tens of seconds.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Images per batch: powers of two up to well past the default ``max_batch_size`` of 8.
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# Probabilities: finer near 1, where a healthy model's answers crowd (Ray needs bounds > 0).
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

FLUSH_S = 0.25  # far under Ray's export period: a scrape never sees the delay

ENDPOINTS = ("v1_predict", "v1_explain", "analyze", "v2_infer")
UNKNOWN_MODEL = "unknown"
ALL_MODELS = "*"
CLIENT_GONE = 499  # nginx's "client closed request": no answer was sent
DECODE_ERROR_KINDS = (
    "empty",  # an empty image
    "undecodable",  # not a JPEG, PNG, WebP or GIF
    "invalid",  # a known format whose bytes PIL cannot decode
    "too_large",  # over the pixel limit, or a decompression bomb
    "too_small",  # a side under the minimum
    "aspect",  # too long and thin
    "metadata",  # too much text metadata
    "body_too_large",  # a request body over the byte limit
    "unsupported_type",  # a content type that is not JSON, multipart or an image
    "bad_base64",  # an instance's image_b64 that is not base64
    "too_many_images",  # more images in one request than ``ingress.max_images``
    "too_many_pixels",  # more decoded pixels in one request than ``ingress.max_request_pixels``
)


class Deferred:
    """Metric points queued on the request path and handed to Ray by one background thread.

    ``inc`` and ``observe`` only append to a deque; the thread starts with the object.
    Counter increments with the same tags are summed, so a flush makes one Ray call per series.
    """

    def __init__(self, every_s: float = FLUSH_S) -> None:
        self.every_s = every_s
        self._points: deque[tuple[Metric, float, tuple[tuple[str, str], ...]]] = deque()
        threading.Thread(target=self._run, name="carclf-metrics", daemon=True).start()

    def inc(self, counter: Counter, tags: dict[str, str], value: float = 1.0) -> None:
        """Queue ``counter.inc(value, tags)``."""
        self._queue(counter, value, tags)

    def observe(self, histogram: Histogram, value: float, tags: dict[str, str]) -> None:
        """Queue ``histogram.observe(value, tags)``."""
        self._queue(histogram, value, tags)

    def _queue(self, metric: Metric, value: float, tags: dict[str, str]) -> None:
        self._points.append((metric, value, tuple(tags.items())))

    def _run(self) -> None:
        while True:
            time.sleep(self.every_s)
            try:
                self.flush()
            except Exception:  # a bad point costs its flush's points, not every later one
                log.exception("carclf metrics: a flush to Ray failed; its points are lost")

    def flush(self) -> None:
        """Hand every queued point to Ray now."""
        sums: Tally[tuple[Counter, tuple[tuple[str, str], ...]]] = Tally()
        while self._points:
            metric, value, tags = self._points.popleft()
            if isinstance(metric, Histogram):
                metric.observe(value, tags=dict(tags))
            else:
                sums[metric, tags] += value
        for (counter, tags), total in sums.items():
            counter.inc(total, tags=dict(tags))


class IngressMetrics:
    """The ingress's request, latency and decode-error series."""

    def __init__(self) -> None:
        self.deferred = Deferred()
        self.requests = Counter(
            "carclf_requests",
            description="Inference requests answered by the ingress, by model, endpoint and "
            "HTTP status.",
            tag_keys=("model", "endpoint", "status"),
        )
        self.latency = Histogram(
            "carclf_request_latency_seconds",
            description="Seconds from a request's arrival in the ingress route to its answer.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=("model", "endpoint", "status"),
        )
        self.decode_errors = Counter(
            "carclf_decode_errors",
            description="Images or bodies the ingress refused before any model saw them, by kind.",
            tag_keys=("endpoint", "kind"),
        )

    def request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        """One answered (or abandoned) request and its latency."""
        tags = {"model": model, "endpoint": endpoint, "status": str(status)}
        self.deferred.inc(self.requests, tags)
        self.deferred.observe(self.latency, seconds, tags)

    def decode_error(self, endpoint: str, kind: str) -> None:
        """One refused image or body."""
        self.deferred.inc(self.decode_errors, {"endpoint": endpoint, "kind": kind})


class ModelMetrics:
    """A classifier replica's batch-size and top-1 confidence series.

    Args:
        model: the model's name, the ``model`` tag of every series.
    """

    def __init__(self, model: str) -> None:
        self.deferred = Deferred()
        self.batch_size = Histogram(
            "carclf_batch_size",
            description="Images in each dynamic batch the classifier runs.",
            boundaries=list(BATCH_BUCKETS),
            tag_keys=("model",),
        )
        self.confidence = Histogram(
            "carclf_top1_confidence",
            description="Calibrated top-1 probability of each classified image.",
            boundaries=list(CONFIDENCE_BUCKETS),
            tag_keys=("model",),
        )
        for metric in (self.batch_size, self.confidence):
            metric.set_default_tags({"model": model})

    def batch(self, size: int) -> None:
        """One batch of ``size`` images."""
        self.deferred.observe(self.batch_size, float(size), {})

    def top1(self, probabilities: np.ndarray) -> None:
        """The top-1 probability of each row of ``[N, K]`` calibrated probabilities.

        A row that is not finite (an input that overflows the model: the ingress answers 422)
        is left out; Ray's histogram would count a NaN in its lowest bucket.
        """
        for p in np.asarray(probabilities).max(axis=-1).ravel():
            if np.isfinite(p):
                self.deferred.observe(self.confidence, float(p), {})


@contextlib.asynccontextmanager
async def observed(
    metrics: IngressMetrics, endpoint: str, name: str | None, served: Collection[str]
) -> AsyncIterator[None]:
    """Count the request its block answers, time it, and count a refused image or body.

    Args:
        metrics: the replica's series.
        endpoint: the ``endpoint`` tag (:data:`ENDPOINTS`).
        name: the model named in the path; None for every model (``/v1/analyze``).
        served: the served models' names: only these become tag values, so random names
            cannot grow the series.
    """
    model = ALL_MODELS if name is None else name if name in served else UNKNOWN_MODEL
    start, status = time.perf_counter(), 500
    try:
        yield
        status = 200
    except ApiError as exc:
        status = exc.status
        if exc.kind:
            metrics.decode_error(endpoint, exc.kind)
        raise
    except HTTPException as exc:  # e.g. Starlette's 400 for a broken multipart body
        status = exc.status_code
        raise
    except asyncio.CancelledError:  # the client went away; no answer is sent
        status = CLIENT_GONE
        raise
    finally:
        metrics.request(model, endpoint, status, time.perf_counter() - start)
