"""Readiness: which deployments of a Serve app have a running replica, as its controller says.

Health and readiness never call a model: under load such a call would queue behind inference.
Instead a background task (:class:`ReplicaWatch`) asks Serve's controller for the app's running
replicas every ``ingress.health_poll_s`` and the answers read its last report; a report gone
stale (the controller not answering) counts for nothing, so readiness turns 503. Shared by the
ingress (model readiness) and the health app (:mod:`serve.health`).
"""

import asyncio
import logging
import time

from ray.serve.context import _get_global_client

from serve.errors import clean_message

log = logging.getLogger("ray.serve")


def not_ready(
    running: dict[str, int] | None, age_s: float, stale_s: float, names: list[str]
) -> list[str]:
    """The models of ``names`` without a running classifier replica.

    Args:
        running: model name → running classifier replicas, as Serve last reported them;
            None before the first report.
        age_s: seconds since that report.
        stale_s: a report older than this counts for nothing (Serve's controller is not
            answering), so every model is reported not ready.
        names: the models to check.
    """
    if running is None or age_s > stale_s:
        return list(names)
    return [n for n in names if running.get(n, 0) < 1]


def running_replicas(app: str) -> dict[str, int]:
    """Deployment name → running replicas in ``app``, asked of Serve's controller; empty when
    ``app`` is not deployed.

    Reads the controller's instance details as the plain dict it sends: ``serve.status()``
    builds the same facts into pydantic models, pickling every deployment's request router on
    the way, far more CPU per call, and every ingress and health replica asks each poll, idle
    or not. Blocking (a call to the controller): run it in a thread.
    """
    details = _get_global_client().get_serve_details()
    found = details.get("applications", {}).get(app, {}).get("deployments", {})
    return {
        name: sum(getattr(r["state"], "value", r["state"]) == "RUNNING" for r in d["replicas"])
        for name, d in found.items()
    }


def unready_message(models: list[str]) -> str:
    """The 503's message when ``models`` have no running classifier replica."""
    return f"not ready: no running replica of model {', '.join(repr(m) for m in models)}"


class ReplicaWatch:
    """A Serve app's running replicas per deployment, as its controller last reported them.

    :meth:`watch` (started by :meth:`start`) asks every ``every_s``; a report older than
    ``stale_s`` counts for nothing, so readiness turns 503 when the controller stops answering.
    """

    def __init__(self, app: str, every_s: float) -> None:
        self.app = app
        self.every_s = every_s
        self.stale_s = max(5 * every_s, 5.0)
        self.counts: dict[str, int] | None = None  # None before the first report
        self._at = 0.0

    @property
    def age_s(self) -> float:
        """Seconds since the last report."""
        return time.monotonic() - self._at

    def not_ready(self, deployments: dict[str, str]) -> list[str]:
        """The names of ``deployments`` (name → deployment) without a running replica."""
        if self.counts is None:
            return list(deployments)
        running = {n: self.counts.get(d, 0) for n, d in deployments.items()}
        return not_ready(running, self.age_s, self.stale_s, list(deployments))

    def start(self) -> "ReplicaWatch":
        """Run :meth:`watch` on this thread's event loop; the watch itself."""
        self._task = asyncio.get_running_loop().create_task(self.watch())
        return self

    async def watch(self) -> None:
        """Ask Serve's controller for the counts every ``every_s``, forever."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # The default executor, not a decode pool: a flood of images cannot delay it.
                self.counts = await loop.run_in_executor(None, running_replicas, self.app)
                self._at = time.monotonic()
            except Exception as exc:  # the controller restarting: readiness turns 503 when stale
                log.warning("cannot read the replicas' status: %s", clean_message(str(exc)))
            await asyncio.sleep(self.every_s)
