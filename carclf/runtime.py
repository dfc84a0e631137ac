"""Connecting to Ray: one place that decides how carclf starts or joins a Ray instance.

Ray's state API (which Ray Train's placement-group cleaner calls from inside the cluster) finds
"its" cluster by looking for running GCS processes when nothing names it; with two Ray instances
on one machine (``cluster/local.sh up`` beside a ``carclf serve``) that look-up fails with
"Found multiple active Ray instances". So carclf pins the instance it starts: the dashboard (the
state API's server) gets a known loopback port, and ``RAY_API_SERVER_ADDRESS`` names it in this
process before Ray starts, so every Ray process the local instance spawns inherits the address.

This module only joins or starts Ray. What serving needs of a Ray it starts (Serve's mode, its
HTTP front) is the server's to set before calling :func:`ensure_ray` (``serve.launch.start_ray``),
so training and tuning never set up an HTTP proxy.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from carclf.errors import UserInputError

log = logging.getLogger("carclf")

# Read by Ray's state and job clients before RAY_ADDRESS (ray.dashboard.utils).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def free_loopback_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_to_join() -> str | None:
    """The address ``ray.init()`` should join, or None to start a local instance.

    ``RAY_ADDRESS`` wins (``local`` forces a new instance); else the cluster that ``ray start``
    recorded in Ray's temp directory, as plain ``ray.init()`` would.
    """
    from ray._private.services import find_bootstrap_address

    address = os.environ.get("RAY_ADDRESS", "")
    if address == "local":
        return None
    return address or find_bootstrap_address(None)


def ensure_ray(dashboard: bool = True, **init_kwargs: Any) -> None:
    """Join the Ray instance named by ``RAY_ADDRESS``, or start a local one pinned to itself.

    ``RAY_ADDRESS`` (as under ``ray job submit``) joins that cluster, as does a cluster that
    ``ray start`` recorded on this machine (said on stderr). Otherwise a new local
    single-node Ray starts, its dashboard on a free loopback port that this process and all of
    the instance's workers use for the state API, whatever else runs on the machine. Workers
    log at WARNING: Ray Train's per-report INFO lines would drown carclf's one line per epoch.
    A Ray started here inherits this process's environment, so whatever must be set when Ray
    starts is set before this call.

    Args:
        dashboard: start a local instance with its pinned dashboard. Without it there is no
            state API, which Ray Train needs: only for a Ray that serves and is measured.
        init_kwargs: passed to ``ray.init`` (tests set ``num_cpus``).

    Raises:
        UserInputError: the local instance's dashboard did not come up where it was pinned.
    """
    import ray

    if ray.is_initialized():
        return
    init_kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
    address = cluster_to_join()
    if address:
        if "RAY_ADDRESS" not in os.environ:
            print(
                f"[carclf] joining the Ray cluster that `ray start` left at {address} "
                "(RAY_ADDRESS=local starts a private one)",
                file=sys.stderr,
                flush=True,
            )
        os.environ["RAY_ADDRESS"] = address
        ray.init(address=address, **init_kwargs)
        return
    from carclf.reaper import watch

    watch()  # a Ray of this process's own: nothing of it outlives this process, even a SIGKILL
    if not dashboard:
        ray.init(address="local", include_dashboard=False, **init_kwargs)
        return
    port = free_loopback_port()
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    # "local", not None: None would join a cluster that `ray start` recorded in /tmp/ray.
    context = ray.init(
        address="local",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        **init_kwargs,
    )
    if context.dashboard_url and not context.dashboard_url.endswith(f":{port}"):
        ray.shutdown()
        raise UserInputError(
            f"Ray's dashboard started at {context.dashboard_url}, not on the port carclf "
            f"pinned (127.0.0.1:{port}); set RAY_ADDRESS to a running cluster instead"
        )


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
