"""Connecting to Ray: one place that decides how carclf starts or joins a Ray instance.

Ray's state API (which Ray Train's placement-group cleaner calls from inside the cluster) finds
"its" cluster by looking for running GCS processes when nothing names it; with two Ray instances
on one machine (``cluster/local.sh up`` beside a ``carclf serve``) that look-up fails with
"Found multiple active Ray instances". So carclf pins the instance it starts: the dashboard (the
state API's server) gets a known loopback port, and ``RAY_API_SERVER_ADDRESS`` names it in this
process before Ray starts, so every Ray process the local instance spawns inherits the address.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from carclf.errors import UserInputError

# Read by Ray's state and job clients before RAY_ADDRESS (ray.dashboard.utils).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Serve's throughput-optimised mode (Ray 2.55+, "Enable High Throughput on Ray Serve"): requests
# go between the proxy and the replicas over direct gRPC instead of Ray actor calls through the
# raylet and object store, the main cost of a request beside the model on a small machine
# (``bench/results/serve.md``). Read when Ray starts, so it is set for a Ray carclf starts and in
# the cluster manifests; a value already in the environment wins (``0`` turns it off).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def free_loopback_port() -> int:
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


def use_serve_env() -> None:
    """Set ``SERVE_ENV`` in this process, where not set already, for the Ray it starts next (every
    process of the instance inherits it)."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)


def ensure_ray(**init_kwargs: Any) -> None:
    """Join the Ray instance named by ``RAY_ADDRESS``, or start a local one pinned to itself.

    ``RAY_ADDRESS`` (as under ``ray job submit``) joins that cluster, as does a cluster that
    ``ray start`` recorded on this machine (said on stderr). Otherwise a new local
    single-node Ray starts, its dashboard on a free loopback port that this process and all of
    the instance's workers use for the state API, whatever else runs on the machine, and with
    Serve's throughput-optimised mode (``SERVE_ENV``). Workers log at WARNING: Ray Train's
    per-report INFO lines would drown carclf's one line per epoch.

    Args:
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
    port = free_loopback_port()
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    use_serve_env()
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
