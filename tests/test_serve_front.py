"""Serve's HTTP front (`carclf serve --front`): HAProxy by default on a Ray carclf starts, its
files private and its side ports on loopback; Serve's Python proxy on request or without a
binary, said out loud."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from carclf.errors import UserInputError
from carclf.runtime import (
    API_SERVER_ENV,
    BINARY_ENV,
    HAPROXY,
    HAPROXY_ENV,
    HAPROXY_FILE_ENVS,
    HAPROXY_PORT_ENVS,
    LOOPBACK_WRAPPER,
    PYTHON_PROXY,
    REAL_BINARY_ENV,
    check_joined_front,
    free_loopback_port,
    haproxy_binary,
    use_front,
)
from serve.client import wait_ready

from .test_serve_inputs import encode, noise


def listener(port: int) -> psutil.Process | None:
    """The process listening on ``port`` of 127.0.0.1, if any."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def listening(proc: psutil.Process) -> list:
    """The TCP sockets ``proc`` listens on."""
    return [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]


# Every variable the front sets; a test that sets them works on a copy of the environment, so
# that what it sets leaves with it (and no later Ray inherits it).
OURS = (HAPROXY_ENV, BINARY_ENV, REAL_BINARY_ENV, *HAPROXY_FILE_ENVS, *HAPROXY_PORT_ENVS)


@pytest.fixture
def own_environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in OURS}
    monkeypatch.setattr(os, "environ", environ)
    return environ


def test_haproxy_on_a_running_ray_needs_the_cluster_started_so(own_environ: dict) -> None:
    """The switch is read when Ray starts: asking a joined Ray for HAProxy without it is a
    clear error; auto and proxy take what the cluster has."""
    with pytest.raises(UserInputError, match=HAPROXY_ENV):
        check_joined_front("haproxy")
    check_joined_front("auto")
    check_joined_front("proxy")
    own_environ[HAPROXY_ENV] = "1"  # the user says the cluster was started so
    check_joined_front("haproxy")


def test_haproxy_is_the_default_its_files_private_and_run_through_the_wrapper(
    own_environ: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """On a Ray carclf starts, HAProxy's admin socket and config are not in Ray's shared
    /tmp/haproxy-serve (mode 666 socket), its statistics and metrics ports are free ones, and
    Ray runs the real binary through the wrapper that binds those to loopback. What the user
    set stays."""
    own_environ["RAY_SERVE_HAPROXY_METRICS_PORT"] = "19101"
    real = haproxy_binary()
    with caplog.at_level("WARNING", logger="carclf"):
        assert use_front() == HAPROXY
    assert os.environ[HAPROXY_ENV] == "1"
    folder = Path(os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert folder.stat().st_mode & 0o777 == 0o700
    for env in HAPROXY_FILE_ENVS:
        assert Path(os.environ[env]).is_relative_to(folder), env
    stats = os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]
    assert stats.isdigit() and stats != "8404"
    assert os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"
    assert os.environ[BINARY_ENV] == str(LOOPBACK_WRAPPER)
    assert os.environ[REAL_BINARY_ENV] == real != str(LOOPBACK_WRAPPER)
    assert haproxy_binary() == real  # a second start finds the real one behind the wrapper
    assert not caplog.text
    folder.rmdir()

    # A binary of the user's own: kept, and the ports it leaves open are named.
    os.environ[BINARY_ENV] = real
    with caplog.at_level("WARNING", logger="carclf"):
        assert use_front("haproxy") == HAPROXY
    assert os.environ[BINARY_ENV] == real
    assert f"port {stats}" in caplog.text and "port 19101" in caplog.text
    assert "every interface" in caplog.text


def test_the_python_proxy_on_request_or_said_out_loud_without_a_binary(
    own_environ: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert use_front("proxy") == PYTHON_PROXY and os.environ[HAPROXY_ENV] == "0"
    assert use_front("auto") == PYTHON_PROXY  # the user's RAY_SERVE_ENABLE_HA_PROXY=0 stays
    del own_environ[HAPROXY_ENV]
    own_environ[BINARY_ENV] = "/nonexistent/haproxy"  # as on a Mac: no binary
    with pytest.raises(UserInputError, match="no HAProxy binary"):
        use_front("haproxy")
    with caplog.at_level("WARNING", logger="carclf"):
        assert use_front("auto") == PYTHON_PROXY
    assert "Python proxy takes HTTP" in caplog.text and "no HAProxy binary" in caplog.text
    assert os.environ[HAPROXY_ENV] == "0"
    with pytest.raises(UserInputError, match="unknown HTTP front"):
        use_front("nginx")


def test_the_wrapper_binds_statistics_and_metrics_to_loopback_and_runs_the_real_binary(
    tmp_path: Path,
) -> None:
    """Only the binds of the two ports move; the HTTP front keeps its address; the real
    binary gets Ray's arguments unchanged."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "frontend prometheus\n    bind :19101\n"
        "frontend http_frontend\n    bind 0.0.0.0:8000\n"
        "listen stats\n  bind *:18404\n  stats enable\n"
        "frontend other\n    bind [::]:19101 v4v6\n"
    )
    echo = tmp_path / "args"
    fake = tmp_path / "haproxy"
    fake.write_text(f'#!/bin/sh\necho "$@" > {echo}\n')
    fake.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        REAL_BINARY_ENV: str(fake),
        "RAY_SERVE_HAPROXY_STATS_PORT": "18404",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "19101",
    }
    args = ["-db", "-f", str(config), "-sf", "123"]
    subprocess.run([str(LOOPBACK_WRAPPER), *args], env=env, check=True, timeout=30)
    assert config.read_text() == (
        "frontend prometheus\n    bind 127.0.0.1:19101\n"
        "frontend http_frontend\n    bind 0.0.0.0:8000\n"
        "listen stats\n  bind 127.0.0.1:18404\n  stats enable\n"
        "frontend other\n    bind 127.0.0.1:19101 v4v6\n"
    )
    assert echo.read_text().split() == args


class CarclfServe:
    """``carclf serve`` of a bundle on a Ray of its own, none of the front's variables set;
    its stderr goes to a file, so a test can wait for its "serving ... at" line."""

    def __init__(self, bundle: Path, port: int, log: Path, *flags: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in (API_SERVER_ENV, *OURS)}
        env["RAY_ADDRESS"] = "local"  # its own Ray: the front is chosen where Ray starts
        carclf = Path(sys.executable).with_name("carclf")
        cmd = [str(carclf), "serve", str(bundle), "--port", str(port), *flags]
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)

    def started(self, timeout_s: float = 240) -> str:
        """Its "serving ... at" line, once start-up is over (a signal then stops it cleanly)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith("serving "):
                    return line
            time.sleep(0.5)
        pytest.fail(f"carclf serve did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self, sig: signal.Signals) -> None:
        """Stop it as a user (SIGINT) or a supervisor (SIGTERM) would."""
        self.proc.send_signal(sig)  # carclf serve shuts Serve down, then its Ray
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"carclf serve did not stop on {sig.name}")


def predict_once(url: str) -> None:
    image = encode(noise(64, 48), "JPEG")
    r = httpx.post(
        f"{url}/v1/models/body:predict",
        content=image,
        headers={"content-type": "image/jpeg"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_carclf_serve_answers_through_haproxy_on_loopback_and_stops_on_sigterm(
    served_bundle, tmp_path: Path
) -> None:
    port = free_loopback_port()
    server = CarclfServe(served_bundle.path, port, tmp_path / "stderr")
    url = f"http://127.0.0.1:{port}"
    haproxy, private = None, None
    try:
        assert f"at {url} through {HAPROXY}" in server.started()
        wait_ready(url, timeout_s=60)
        haproxy = listener(port)
        assert haproxy is not None and haproxy.name() == "haproxy", haproxy
        config = Path(haproxy.cmdline()[haproxy.cmdline().index("-f") + 1])
        private = config.parent.parent  # Ray adds a folder per node
        assert private.name.startswith("carclf-hap-"), config
        assert private.stat().st_mode & 0o777 == 0o700
        # The HTTP front, the statistics page and the Prometheus exporter, all on loopback
        # (haproxy-loopback.sh: Ray's template binds the last two on every interface).
        ports = {c.laddr.port: c.laddr.ip for c in listening(haproxy)}
        stats, metrics = (int(haproxy.environ()[e]) for e in HAPROXY_PORT_ENVS)
        assert {port, stats, metrics} <= set(ports), ports
        assert set(ports.values()) == {"127.0.0.1"}, ports
        assert httpx.get(f"http://127.0.0.1:{stats}/stats", timeout=10).status_code == 200
        predict_once(url)
    finally:
        server.stop(signal.SIGTERM)  # what docker stop and systemd send
        if haproxy is not None and haproxy.is_running():
            haproxy.kill()
            pytest.fail("HAProxy outlived the Ray that started it")
    assert private is not None and not private.exists()  # removed at exit


@pytest.mark.integration
@pytest.mark.slow
def test_carclf_serve_front_proxy_answers_through_serves_python_proxy(
    served_bundle, tmp_path: Path
) -> None:
    port = free_loopback_port()
    server = CarclfServe(served_bundle.path, port, tmp_path / "stderr", "--front", "proxy")
    url = f"http://127.0.0.1:{port}"
    try:
        assert f"at {url} through {PYTHON_PROXY}" in server.started()
        wait_ready(url, timeout_s=60)
        front = listener(port)
        assert front is not None and "ProxyActor" in " ".join(front.cmdline()), front
        predict_once(url)
    finally:
        server.stop(signal.SIGINT)
