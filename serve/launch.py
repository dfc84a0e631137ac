"""Starting the Serve app: the one helper every caller uses (CLI, demo, job, tests, benchmark).

``serve run serve/config.yaml`` and ``serve deploy`` start the same app from its config file;
everything in Python goes through :func:`start_app`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from ray import serve

from carclf.errors import UserInputError
from carclf.runtime import cluster_to_join, ensure_ray
from serve.app import build_app
from serve.front import SERVE_ENV, FrontLimits, check_joined_front, front_in_use, use_serve_env
from serve.health import HealthArgs, build_health, health_route
from serve.settings import API_KEY_ENV, AppArgs


def app_args(bundles: Sequence[str], api_key: str | None = None, **ingress: Any) -> AppArgs:
    """The app's arguments for ``bundles``, with an API key when one is given.

    Args:
        bundles: bundle directories, one model each.
        api_key: the key every endpoint but health and the page then needs (an empty one is
            refused); None leaves it to ``api_key_file`` or ``$CARCLF_API_KEY``.
        **ingress: further ingress settings (``allowed_hosts``, ``max_images``,
            ``api_key_file``, ...); None values keep the defaults.

    Raises:
        UserInputError: settings the schema refuses, in one line.
    """
    given = {k: v for k, v in ingress.items() if v is not None}
    if api_key is not None:
        given["api_key"] = api_key
    try:
        return AppArgs(bundles=[str(b) for b in bundles], ingress=given)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise UserInputError(f"{where}: {message}" if where else message) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address only this machine reaches (``localhost`` included)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(args: AppArgs, host: str) -> None:
    """Refuse to serve without an API key on an address other machines reach, unless
    ``ingress.allow_unauthenticated`` says so: an open server should be a choice, not a slip.

    Raises:
        UserInputError: ``host`` is not loopback and the app has no key nor the setting.
    """
    ingress = args.ingress
    if is_loopback(host) or ingress.api_key or ingress.allow_unauthenticated:
        return
    raise UserInputError(
        f"serving on {host} needs an API key (ingress.api_key, ingress.api_key_file or "
        f"${API_KEY_ENV}), or ingress.allow_unauthenticated: true "
        "(carclf serve --insecure-no-api-key) to serve anyone who reaches it"
    )


def check_port_free(host: str, port: int) -> None:
    """Refuse a ``host:port`` that something already listens on, before Ray starts: Ray would
    start, then fail after half a minute in HAProxy's bind with a traceback.

    Bound the way HTTP servers bind (``SO_REUSEADDR``), so a port that only has connections
    closing in TIME_WAIT counts as free, as it does for HAProxy and Serve's proxy.

    Raises:
        UserInputError: the port is taken (or ``host`` is not an address of this machine).
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserInputError(f"cannot serve on {host}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserInputError(
                    f"port {port} on {host} is already in use: stop what listens there "
                    "(`ss -ltnp`) or serve on another port (--port)"
                ) from None
            raise UserInputError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


def start_ray(front: str = "auto", limits: FrontLimits | None = None, **init_kwargs: Any) -> str:
    """Join or start Ray for serving; the HTTP front it has, in words.

    A Ray that starts here gets Serve's throughput-optimised mode and the HTTP ``front``
    (:func:`serve.front.use_serve_env`) admitting requests by ``limits``; a running one keeps
    its own, and ``front="haproxy"`` there is checked (:func:`serve.front.check_joined_front`).

    Args:
        front: ``auto``, ``haproxy`` or ``proxy`` (:data:`serve.front.FRONTS`).
        limits: what HAProxy admits (default: the ingress's defaults).
        init_kwargs: passed to ``ray.init`` through :func:`carclf.runtime.ensure_ray`.

    Raises:
        UserInputError: the front cannot be had, or Ray did not start where it was pinned.
    """
    import ray

    if ray.is_initialized() or cluster_to_join():
        check_joined_front(front, limits)
    else:
        use_serve_env(front, limits)
    ensure_ray(**init_kwargs)
    return front_in_use()


def start_app(
    args: AppArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "carclf",
    route_prefix: str = "/",
    front: str = "auto",
    health: bool = True,
) -> str:
    """Join (or start) Ray, start Serve's proxy on ``host:port`` and run the app; its URL.

    With ``health``, also the app's health app (``NAME-health`` under
    ``route_prefix/v2/health``, :mod:`serve.health`), so probes never wait on a busy ingress.

    Returns without waiting for the replicas (:func:`serve.client.wait_ready` does). Serve's
    controller is detached, so on a cluster the app outlives the process that started it. A
    proxy already running keeps its address: a second app joins it under ``route_prefix``.
    ``front`` is Serve's HTTP front on a Ray this process starts (:func:`start_ray`), admitting
    requests as ``args.ingress`` says; a running Ray keeps its own (and a warning says when its
    limits differ from the app's).

    Raises:
        UserInputError: ``host`` is not loopback and the app has no API key and does not
            allow unauthenticated use (:func:`check_exposure`); on a Ray this process starts,
            ``port`` is already taken (:func:`check_port_free`).
    """
    import ray

    check_exposure(args, host)  # before Ray: a refused start leaves nothing behind
    if not ray.is_initialized() and not cluster_to_join():
        check_port_free(host, port)  # the proxy of a running Ray holds its own port
    start_ray(front, FrontLimits.of(args.ingress))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=False)
    if health:
        app = build_health(HealthArgs(app=name, serving=args))
        serve.run(app, name=health_name(name), route_prefix=health_route(route_prefix))
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def health_name(name: str) -> str:
    """The Serve name of app ``name``'s health app."""
    return f"{name}-health"


def stop_app(name: str = "carclf") -> None:
    """Delete app ``name`` and its health app, if it has one (what :func:`start_app` started)."""
    serve.delete(health_name(name))  # a no-op where there is none
    serve.delete(name)


def http_front(front: str, serve_env: dict[str, str] | None = None) -> str:
    """The app's HTTP ``front`` (:func:`serve.front.front_in_use`), and Serve's mode
    (``serve_env``, if given), in words."""
    if serve_env is None:
        return front
    return f"{front}; {', '.join(f'{k}={v}' for k, v in serve_env.items())}"


def serve_env() -> dict[str, str]:
    """The Serve mode variables (:data:`serve.front.SERVE_ENV`) as this process has them."""
    return {name: os.environ.get(name, "unset") for name in SERVE_ENV}
