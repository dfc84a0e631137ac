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
    state.chmod(0o700)
    (state / "head" / "sid").write_text("999999999\n")  # a session that no longer exists
    (state / "worker1").mkdir()
    for _ in range(2):
        done = _down(state)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not state.exists()


def test_down_stops_its_sessions_and_leaves_other_files(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "head").mkdir(parents=True)
    state.chmod(0o700)
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


# --- the state directory and session ids (issue #30): every refusal comes before Ray starts ---


def _run(command: str, state: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``local.sh COMMAND`` with its state in ``state``; RAY is /bin/false, so a check that
    let ``up`` through would fail to start a node rather than start Ray."""
    env = {
        **os.environ,
        "CARCLF_CLUSTER_DIR": str(state),
        "CARCLF_RAY_TOKEN_FILE": str(tmp_path / "token" / "ray_token"),
        "RAY": "/bin/false",
    }
    return subprocess.run(
        ["bash", str(LOCAL_SH), *command.split()], env=env, capture_output=True, text=True
    )


def _refused(done: subprocess.CompletedProcess, what: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0], done.stderr


@pytest.mark.parametrize("command", ["up", "down"])
def test_a_state_directory_open_to_others_is_refused(tmp_path: Path, command: str) -> None:
    state = tmp_path / "state"
    (state / "head").mkdir(parents=True)
    state.chmod(0o777)
    _refused(_run(command, state, tmp_path), "open to group or others")
    assert not (tmp_path / "token").exists()  # refused before anything else
    assert (state / "head").is_dir()


@pytest.mark.parametrize("command", ["up", "down"])
def test_a_symlinked_state_directory_is_refused(tmp_path: Path, command: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(real)
    _refused(_run(command, tmp_path / "state", tmp_path), "symlink")


def test_a_state_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    _refused(_run("up", state, tmp_path), "not yours")


def test_up_makes_a_private_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    done = _run("up", state, tmp_path)
    assert done.returncode == 1  # RAY=/bin/false: the node fails to start, after the checks
    assert _mode(state) == 0o700 and (state / "head" / "start.log").is_file()


def test_a_planted_log_symlink_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "head").mkdir(parents=True)
    state.chmod(0o700)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (state / "head" / "start.log").symlink_to(victim)
    _refused(_run("up", state, tmp_path), "symlink")
    assert victim.read_text() == "keep"


def _state_with_sid(tmp_path: Path, sid: str) -> Path:
    state = tmp_path / "state"
    (state / "head").mkdir(parents=True)
    state.chmod(0o700)
    (state / "head" / "sid").write_text(sid)
    return state


@pytest.mark.parametrize("sid", ["1; rm -rf ~", "-1", "0", "1", "", "12 34"])
def test_a_sid_that_is_not_a_session_id_is_refused(tmp_path: Path, sid: str) -> None:
    state = _state_with_sid(tmp_path, sid)
    _refused(_run("down", state, tmp_path), "not a session id")
    assert (state / "head" / "sid").exists()  # nothing removed either


def test_a_sid_of_another_users_session_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start a session as another user")
    other = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "setsid", "sleep", "60"]
    )
    try:
        time.sleep(0.3)
        state = _state_with_sid(tmp_path, f"{os.getsid(other.pid)}\n")
        _refused(_run("down", state, tmp_path), "another user")
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()
