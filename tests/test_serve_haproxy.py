"""`carclf serve --haproxy`: Serve's HAProxy ingress in front of the app, on a Ray of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from carclf.errors import UserInputError
from carclf.runtime import API_SERVER_ENV, free_loopback_port
from serve.client import wait_ready
from serve.launch import HAPROXY_ENV, use_haproxy

from .test_serve_inputs import encode, noise


def listener(port: int) -> psutil.Process | None:
    """The process listening on ``port`` of 127.0.0.1, if any."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def test_haproxy_on_a_running_ray_needs_the_cluster_started_so(
    ray_session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch is read when Ray starts: joining a Ray without it is a clear error."""
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    with pytest.raises(UserInputError, match=HAPROXY_ENV):
        use_haproxy()
    monkeypatch.setenv(HAPROXY_ENV, "1")  # the user says the cluster was started so
    use_haproxy()


@pytest.mark.integration
@pytest.mark.slow
def test_carclf_serve_haproxy_answers_through_haproxy(served_bundle) -> None:
    port = free_loopback_port()
    env = {k: v for k, v in os.environ.items() if k not in (API_SERVER_ENV, HAPROXY_ENV)}
    env["RAY_ADDRESS"] = "local"  # its own Ray: the switch only works where Ray starts
    carclf = Path(sys.executable).with_name("carclf")
    cmd = [str(carclf), "serve", str(served_bundle.path), "--port", str(port), "--haproxy"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    haproxy = None
    try:
        wait_ready(url, timeout_s=240)
        haproxy = listener(port)
        assert haproxy is not None and haproxy.name() == "haproxy", haproxy
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
        if haproxy is not None and haproxy.is_running():
            haproxy.kill()
            pytest.fail("HAProxy outlived the Ray that started it")
