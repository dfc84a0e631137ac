"""`carclf serve --haproxy`: Serve's HAProxy ingress in front of the app, on a Ray of its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

import serve.launch
from carclf.errors import UserInputError
from carclf.runtime import API_SERVER_ENV, free_loopback_port
from serve.client import wait_ready
from serve.launch import (
    BINARY_ENV,
    HAPROXY_ENV,
    HAPROXY_FILE_ENVS,
    HAPROXY_PORT_ENVS,
    LOOPBACK_WRAPPER,
    REAL_BINARY_ENV,
    haproxy_binary,
    use_haproxy,
)

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


def test_haproxy_on_a_running_ray_needs_the_cluster_started_so(
    ray_session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch is read when Ray starts: joining a Ray without it is a clear error."""
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    with pytest.raises(UserInputError, match=HAPROXY_ENV):
        use_haproxy()
    monkeypatch.setenv(HAPROXY_ENV, "1")  # the user says the cluster was started so
    use_haproxy()


def test_haproxy_files_go_to_a_private_folder_and_ray_runs_it_through_the_wrapper(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a Ray carclf starts, HAProxy's admin socket and config are not in Ray's shared
    /tmp/haproxy-serve (mode 666 socket), its statistics and metrics ports are free ones, and
    Ray runs the real binary through the wrapper that binds those to loopback. What the user
    set stays."""
    monkeypatch.setattr(serve.launch, "cluster_to_join", lambda: None)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    ours = [HAPROXY_ENV, BINARY_ENV, REAL_BINARY_ENV, *HAPROXY_FILE_ENVS, *HAPROXY_PORT_ENVS]
    # A copy, so that what use_haproxy sets leaves with the test (and no later Ray inherits it).
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ours})
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "19101")
    real = haproxy_binary()
    with caplog.at_level("WARNING", logger="carclf"):
        use_haproxy()
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
        use_haproxy()
    assert os.environ[BINARY_ENV] == real
    assert f"port {stats}" in caplog.text and "port 19101" in caplog.text
    assert "every interface" in caplog.text


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


@pytest.mark.integration
@pytest.mark.slow
def test_carclf_serve_haproxy_answers_through_haproxy(served_bundle) -> None:
    port = free_loopback_port()
    ours = (
        API_SERVER_ENV,
        HAPROXY_ENV,
        BINARY_ENV,
        REAL_BINARY_ENV,
        *HAPROXY_FILE_ENVS,
        *HAPROXY_PORT_ENVS,
    )
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env["RAY_ADDRESS"] = "local"  # its own Ray: the switch only works where Ray starts
    carclf = Path(sys.executable).with_name("carclf")
    cmd = [str(carclf), "serve", str(served_bundle.path), "--port", str(port), "--haproxy"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    haproxy, private = None, None
    try:
        wait_ready(url, timeout_s=240)
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
        image = encode(noise(64, 48), "JPEG")
        r = httpx.post(
            f"{url}/v1/models/body:predict",
            content=image,
            headers={"content-type": "image/jpeg"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)  # carclf serve shuts Serve down, then its Ray
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        if haproxy is not None and haproxy.is_running():
            haproxy.kill()
            pytest.fail("HAProxy outlived the Ray that started it")
