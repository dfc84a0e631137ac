"""cluster/local.sh without a cluster (issue #14): the token's directory is tightened only when
the script makes it, and `down` is idempotent and removes only what `up` made. No Ray starts."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

LOCAL_SH = Path(__file__).parents[1] / "cluster" / "local.sh"


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], env={**os.environ, **env}, capture_output=True, text=True
    )


def _make_token(token_file: Path, home: Path) -> subprocess.CompletedProcess:
    # Sourced: only the functions are defined, nothing starts.
    env = {"CARCLF_RAY_TOKEN_FILE": str(token_file), "HOME": str(home)}
    return _bash(f'source "{LOCAL_SH}" && make_token', env)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_existing_token_directory_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    done = _make_token(shared / "ray_token", tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert _mode(shared) == 0o1777
    assert _mode(shared / "ray_token") == 0o600
    assert len((shared / "ray_token").read_text().strip()) == 64


def test_a_token_directory_the_script_makes_is_private(tmp_path: Path) -> None:
    token = tmp_path / "new" / "ray_token"
    done = _make_token(token, tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert _mode(token.parent) == 0o700 and _mode(token) == 0o600


def test_an_existing_token_is_kept_and_tightened(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    token = tmp_path / "ray_token"
    token.write_text("kept\n")
    token.chmod(0o644)
    assert _make_token(token, tmp_path / "home").returncode == 0
    assert token.read_text() == "kept\n" and _mode(token) == 0o600
    assert _mode(tmp_path) == 0o755  # pytest's directory, not the script's


def _down(state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LOCAL_SH), "down"],
        env={**os.environ, "CARCLF_CLUSTER_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_down_with_nothing_running_succeeds_twice(tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    (state / "head").mkdir(parents=True)
    (state / "head" / "sid").write_text("999999999\n")  # a session that no longer exists
    (state / "worker1").mkdir()
    for _ in range(2):
        done = _down(state)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not state.exists()


def test_down_stops_its_sessions_and_leaves_other_files(tmp_path: Path) -> None:
    state = tmp_path / "shared"
    (state / "head").mkdir(parents=True)
    (state / "someone_elses").write_text("keep")
    node = subprocess.Popen(["setsid", "sleep", "300"], start_new_session=False)
    try:
        time.sleep(0.2)
        (state / "head" / "sid").write_text(f"{os.getsid(node.pid)}\n")
        done = _down(state)
        assert done.returncode == 0, done.stdout + done.stderr
        assert node.wait(timeout=10) != 0  # killed by its session id
    finally:
        if node.poll() is None:
            node.kill()
    assert not (state / "head").exists()
    assert (state / "someone_elses").read_text() == "keep"


@pytest.mark.parametrize("command", ["", "bogus"])
def test_an_unknown_command_is_exit_2(command: str) -> None:
    done = subprocess.run(["bash", str(LOCAL_SH), command], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
