"""Serve's HTTP front (`carclf serve --front`): HAProxy by default on a Ray carclf starts, its
files private and its side ports on loopback; Serve's Python proxy on request or without a
binary, said out loud."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from carclf.errors import UserInputError
from carclf.runtime import API_SERVER_ENV, free_loopback_port, usable_cpus
from serve.client import wait_ready
from serve.front import (
    BINARY_ENV,
    FRONT_LIMIT_ENVS,
    FRONT_WRAPPER,
    HAPROXY,
    HAPROXY_ENV,
    HAPROXY_FILE_ENVS,
    HAPROXY_PORT_ENVS,
    NBTHREAD_ENV,
    PYTHON_ENV,
    PYTHON_PROXY,
    REAL_BINARY_ENV,
    FrontLimits,
    check_joined_front,
    haproxy_binary,
    use_front,
)
from serve.launch import check_port_free

from .test_serve_inputs import encode, noise


def listener(port: int) -> psutil.Process | None:
    """The process listening on ``port`` of 127.0.0.1, if any."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def edited(config: Path, within_s: float = 30.0) -> str:
    """HAProxy's config once the wrapper has edited it. Ray writes it afresh for each reload
    (the health app's deployment is one) and then starts HAProxy through the wrapper, which
    edits it: read in between, it is Ray's own."""
    deadline = time.monotonic() + within_s
    while "carclf admission" not in (text := config.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return text


def listening(proc: psutil.Process) -> list:
    """The TCP sockets ``proc`` listens on."""
    return [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]


def running_haproxy(port: int, within_s: float = 30.0) -> tuple[psutil.Process, Path, dict, list]:
    """The HAProxy listening on ``port``: the process, its config, its listening ports (port
    → address) and its statistics and metrics ports. Read again if Ray reloads HAProxy
    meanwhile: the process found first then exits, and its successor takes the sockets."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            proc = listener(port)
            assert proc is not None and proc.name() == "haproxy", proc
            cmdline = proc.cmdline()
            ports = {c.laddr.port: c.laddr.ip for c in listening(proc)}
            sides = [int(proc.environ()[e]) for e in HAPROXY_PORT_ENVS]
            return proc, Path(cmdline[cmdline.index("-f") + 1]), ports, sides
        except psutil.NoSuchProcess:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# Every variable the front sets; a test that sets them works on a copy of the environment, so
# that what it sets leaves with it (and no later Ray inherits it).
OURS = (
    HAPROXY_ENV,
    BINARY_ENV,
    REAL_BINARY_ENV,
    *HAPROXY_FILE_ENVS,
    *HAPROXY_PORT_ENVS,
    NBTHREAD_ENV,
    PYTHON_ENV,
    *FRONT_LIMIT_ENVS,
)


@pytest.fixture
def own_environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in OURS}
    monkeypatch.setattr(os, "environ", environ)
    return environ


def test_haproxy_on_a_running_ray_needs_the_cluster_started_so(
    own_environ: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """The switch is read when Ray starts: asking a joined Ray for HAProxy without it is a
    clear error; auto and proxy take what the cluster has. An app whose limits differ from
    those HAProxy started with is told so."""
    with pytest.raises(UserInputError, match=HAPROXY_ENV):
        check_joined_front("haproxy")
    check_joined_front("auto")
    check_joined_front("proxy")
    own_environ[HAPROXY_ENV] = "1"  # the user says the cluster was started so
    check_joined_front("haproxy")
    own_environ.update(FrontLimits().environ())  # as this process started it
    with caplog.at_level("WARNING", logger="carclf"):
        check_joined_front("auto", FrontLimits())
        assert not caplog.text
        check_joined_front("auto", FrontLimits(max_inflight=4))
    assert "CARCLF_FRONT_MAX_INFLIGHT=32 (this app: 4)" in caplog.text


def test_haproxy_is_the_default_its_files_private_and_run_through_the_wrapper(
    own_environ: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """On a Ray carclf starts, HAProxy's admin socket and config are not in Ray's shared
    /tmp/haproxy-serve (mode 666 socket), its statistics and metrics ports are free ones, and
    Ray runs the real binary through the wrapper that binds those to loopback. What the user
    set stays."""
    own_environ["RAY_SERVE_HAPROXY_METRICS_PORT"] = "19101"
    own_environ["CARCLF_FRONT_RETRY_AFTER_S"] = "7"
    real = haproxy_binary()
    with caplog.at_level("WARNING", logger="carclf"):
        assert use_front(limits=FrontLimits(max_inflight=5, body_timeout_s=2.5)) == HAPROXY
    # The app's limits for HAProxy's admission, a value the user set kept.
    assert [os.environ[e] for e in FRONT_LIMIT_ENVS] == ["5", "2500", str(10 << 20), "7"]
    assert os.environ[HAPROXY_ENV] == "1"
    folder = Path(os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert folder.stat().st_mode & 0o777 == 0o700
    for env in HAPROXY_FILE_ENVS:
        assert Path(os.environ[env]).is_relative_to(folder), env
    stats = os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]
    assert stats.isdigit() and stats != "8404"
    assert os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"
    assert os.environ[NBTHREAD_ENV] == str(min(4, usable_cpus()))  # Ray's 4, at most one a CPU
    assert os.environ[BINARY_ENV] == str(FRONT_WRAPPER)
    assert os.environ[REAL_BINARY_ENV] == real != str(FRONT_WRAPPER)
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


def stand_in_haproxy(tmp_path: Path, script: str) -> dict[str, str]:
    """The wrapper's environment with a shell ``script`` in place of the real HAProxy, and the
    side ports 18404 and 19101."""
    fake = tmp_path / "haproxy"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    return {
        "PATH": os.environ["PATH"],
        REAL_BINARY_ENV: str(fake),
        PYTHON_ENV: sys.executable,
        "RAY_SERVE_HAPROXY_STATS_PORT": "18404",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "19101",
    }


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
    env = stand_in_haproxy(tmp_path, f'echo "$@" > {echo}')
    args = ["-db", "-f", str(config), "-sf", "123"]
    subprocess.run([str(FRONT_WRAPPER), *args], env=env, check=True, timeout=30)
    assert config.read_text() == (
        "frontend prometheus\n    bind 127.0.0.1:19101\n"
        "frontend http_frontend\n    bind 0.0.0.0:8000\n"
        "listen stats\n  bind 127.0.0.1:18404\n  stats enable\n"
        "frontend other\n    bind 127.0.0.1:19101 v4v6\n"
    )
    assert echo.read_text().split() == args


def test_the_wrappers_haproxy_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A parent that is SIGKILLed runs no cleanup: the kernel's parent-death signal, set by the
    wrapper, still takes HAProxy (here a stand-in that sleeps) with it."""
    pid_file = tmp_path / "pid"
    env = stand_in_haproxy(tmp_path, f"echo $$ > {pid_file}\nexec sleep 120")
    parent_code = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([{str(FRONT_WRAPPER)!r}, '-db']); time.sleep(120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.is_file() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the stand-in HAProxy did not start"
            time.sleep(0.1)
        haproxy = psutil.Process(int(pid_file.read_text()))
        assert haproxy.ppid() == parent.pid
        parent.kill()
        parent.wait(timeout=10)
        haproxy.wait(timeout=10)  # psutil.TimeoutExpired: it outlived its parent
    finally:
        parent.kill()
        if pid_file.is_file() and pid_file.read_text().strip():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(pid_file.read_text())).kill()


# Ray's template, cut to what the wrapper edits: Ray's 500 page for HAProxy's own 503, the HTTP
# front, and app backends with Ray's `default-server` line (one up, one with no live server).
RAY_LIKE_CONFIG = """global
    maxconn 100
    log {log} local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    errorfile 503 {page}
frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_down path_beg /down/
    use_backend down if is_down
    default_backend app
backend app
    option httpchk GET /-/healthz
    default-server inter 100ms fall 1 rise 1
    server a 127.0.0.1:{app} check
backend down
    option httpchk GET /-/healthz
    default-server inter 100ms fall 1 rise 1
    server b 127.0.0.1:{closed} check
"""


class SlowApp(http.server.ThreadingHTTPServer):
    """A stand-in ingress replica: a POST takes 1 s; every GET is a quick 200."""

    def __init__(self) -> None:
        self.posts = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(h) -> None:
                h.send_response(200)
                h.send_header("content-length", "2")
                h.end_headers()
                h.wfile.write(b"ok")

            def do_POST(h) -> None:
                self.posts += 1
                h.rfile.read(int(h.headers["content-length"]))
                time.sleep(1.0)
                h.do_GET()

            def log_message(h, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def raw_post(port: int, declared: int, body: bytes) -> tuple[int, dict, bytes]:
    """POST ``body`` under a declared ``Content-Length``; the status, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n"
        sock.sendall(head.encode() + body)
        reply = sock.makefile("rb")
        status = int(reply.readline().split()[1])
        headers = {}
        while (line := reply.readline().decode().strip()) != "":
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        return status, headers, reply.read(int(headers.get("content-length", 0)))


def test_the_wrappers_admission_refuses_in_haproxy_with_json(tmp_path: Path) -> None:
    """Past MAX_INFLIGHT POSTs per server up, HAProxy's own JSON 503 with Retry-After while
    GETs pass; a declared oversize body is a 413 and a slow one a 408, neither reaching the
    app, and so are slow headers; no live server is a JSON 503, not Ray's 500 page."""
    app = SlowApp()
    threading.Thread(target=app.serve_forever, daemon=True).start()
    port, config = free_loopback_port(), tmp_path / "haproxy.cfg"
    (tmp_path / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
    config.write_text(
        RAY_LIKE_CONFIG.format(
            page=tmp_path / "500.http",
            port=port,
            app=app.server_address[1],
            closed=free_loopback_port(),
            log=tmp_path / "log.sock",
        )
    )
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # HAProxy's access log, as Ray's
    log.bind(str(tmp_path / "log.sock"))
    env = {
        "PATH": os.environ["PATH"],
        REAL_BINARY_ENV: haproxy_binary(),
        "RAY_SERVE_HAPROXY_STATS_PORT": "1",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "2",
        **FrontLimits(max_inflight=2, body_timeout_s=0.5, max_body_bytes=1000).environ(),
    }
    proc = subprocess.Popen([str(FRONT_WRAPPER), "-db", "-f", str(config)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s=20)  # the stand-in app answers every GET
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            busy = [pool.submit(raw_post, port, 2, b"{}") for _ in range(2)]
            time.sleep(0.4)  # both at the app
            status, headers, body = raw_post(port, 2, b"{}")
            assert status == 503 and headers["retry-after"] == "1", (status, body)
            assert json.loads(body)["error"] == "the server is busy; retry shortly"
            assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
            assert [f.result()[0] for f in busy] == [200, 200]
        status, headers, body = raw_post(port, 5000, b"")
        assert status == 413 and headers["connection"] == "close", (status, body)
        assert json.loads(body)["error"] == "request body over 1000 bytes"
        status, headers, body = raw_post(port, 100, b"x")
        assert status == 408 and "not received within 500 ms" in json.loads(body)["error"]
        assert app.posts == 2  # neither reached the app
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slowloris:
            slowloris.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            assert slowloris.recv(4096).startswith(b"HTTP/1.1 408")
        r = httpx.get(f"{url}/down/x", timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"] == "no replica can take the request; retry shortly"
        # Each refusal for load goes unlogged: at 10x overload Ray's per-request log lines,
        # parsed in Python for its metrics, took nearly half as much CPU again as HAProxy.
        posts = [line for line in access_log(log) if '"POST /x ' in line]
        assert sum(" 200 " in line for line in posts) == 2, posts
        assert sum(" 413 " in line for line in posts) == 1, posts
        assert not any(" 503 " in line for line in posts), posts
    finally:
        proc.kill()
        proc.wait()
        app.shutdown()
        log.close()


def access_log(sock: socket.socket, quiet_s: float = 1.0) -> list[str]:
    """The log lines on a datagram ``sock`` until none comes for ``quiet_s``."""
    sock.settimeout(quiet_s)
    lines = []
    with contextlib.suppress(TimeoutError):
        while True:
            lines.append(sock.recv(65536).decode(errors="replace"))
    return lines


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
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )

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
        haproxy, config, ports, (stats, metrics) = running_haproxy(port)
        private = config.parent.parent  # Ray adds a folder per node
        assert private.name.startswith("carclf-hap-"), config
        assert private.stat().st_mode & 0o777 == 0o700
        # The HTTP front, the statistics page and the Prometheus exporter, all on loopback
        # (haproxy-front.sh: Ray's template binds the last two on every interface).
        assert {port, stats, metrics} <= set(ports), ports
        assert set(ports.values()) == {"127.0.0.1"}, ports
        assert httpx.get(f"http://127.0.0.1:{stats}/stats", timeout=10).status_code == 200
        assert "carclf admission" in edited(config)  # Ray's real config took the rules
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


def test_a_busy_port_is_one_line_and_exit_2_before_ray_starts(
    served_bundle, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(UserInputError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
        started = time.monotonic()
        server = CarclfServe(served_bundle.path, port, tmp_path / "stderr")
        assert server.proc.wait(timeout=60) == 2
        assert time.monotonic() - started < 30  # no Ray started (that alone takes ~10 s here)
    lines = (tmp_path / "stderr").read_text().strip().splitlines()
    assert lines[-1].startswith(f"carclf: error: port {port} on 127.0.0.1"), lines
    assert not any("Traceback" in line for line in lines), lines
    check_port_free("127.0.0.1", port)  # free again once its holder closed


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every process ``proc`` started, and theirs."""
    return psutil.Process(proc.pid).children(recursive=True)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=lambda s: s.name)
def test_nothing_carclf_serve_started_outlives_it(
    served_bundle, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGKILL runs no cleanup code: Ray's processes die with their parent, and HAProxy with
    the Ray process that started it (haproxy-front.sh); 10 s later nothing listens on the port.
    Its Ray runs with token authentication: a caller without the token is refused."""
    port = free_loopback_port()
    server = CarclfServe(served_bundle.path, port, tmp_path / "stderr")
    started: list[psutil.Process] = []
    try:
        server.started()
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=60)
        running_haproxy(port)
        started = descendants(server.proc)
        dashboard = next(p for p in started if "dashboard.py" in " ".join(p.cmdline()))
        environ = dashboard.environ()
        assert environ.get("RAY_AUTH_MODE") == "token"
        api = environ[API_SERVER_ENV]
        assert httpx.get(f"{api}/api/version", timeout=10).status_code in (401, 403)
        os.killpg(server.proc.pid, sig) if sig == signal.SIGINT else server.proc.kill()
        server.proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        alive = started
        while time.monotonic() < deadline and (alive or listener(port)):
            time.sleep(0.2)
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert listener(port) is None, f"{listener(port)} still listens on {port}"
        assert not alive, f"outlived carclf serve by 10 s: {alive}"
    finally:
        server.proc.kill()
        for proc in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
