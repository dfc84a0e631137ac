"""Authentication fails closed (issue #30, item 6): a misspelt key, an empty key or an open
non-loopback server is refused before Ray starts; the key can come from a file or the
environment, and the RayService takes it from a Kubernetes Secret. No Ray: ``start_ray`` is
replaced by a stub that says it was reached."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from carclf import cli
from carclf.errors import UserInputError
from serve import launch
from serve.settings import API_KEY_ENV, AppArgs

ROOT = Path(__file__).parents[1]


class RayWouldStart(Exception):
    """Raised by the stub ``start_ray``: every check before Ray passed."""


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)


@pytest.fixture()
def ray_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    def start_ray(*args, **kwargs) -> str:
        raise RayWouldStart

    monkeypatch.setattr(launch, "start_ray", start_ray)


@pytest.mark.parametrize("key", ["apikey", "api-key", "API_KEY", "key"])
def test_a_misspelt_key_setting_is_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AppArgs(bundles=["b"], ingress={key: "secret"})


@pytest.mark.parametrize("key", ["", " ", "\t", "key\n", " key", "ke\x00y"])
def test_an_empty_or_unsendable_key_is_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="API key"):
        AppArgs(bundles=["b"], ingress={"api_key": key})
    with pytest.raises(UserInputError, match="API key"):
        launch.app_args(["b"], key)


def test_an_empty_key_on_the_command_line_is_exit_2(
    ray_stub: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "b", "--api-key", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the API key is empty" in err[0]


def test_the_key_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "key"
    file.write_text("from-the-file\n")  # as echo writes it
    assert launch.app_args(["b"], api_key_file=str(file)).ingress.api_key == "from-the-file"
    monkeypatch.setenv(API_KEY_ENV, "from-the-env")
    assert launch.app_args(["b"]).ingress.api_key == "from-the-env"
    assert launch.app_args(["b"], "given").ingress.api_key == "given"  # a given key wins
    assert launch.app_args(["b"], api_key_file=str(file)).ingress.api_key == "from-the-file"
    resolved = launch.app_args(["b"], api_key_file=str(file))
    assert resolved.ingress.api_key_file is None  # replicas get the key, not this node's path
    assert AppArgs.model_validate(resolved.model_dump()).ingress.api_key == "from-the-file"


@pytest.mark.parametrize("content", ["", "\n", "   \n"])
def test_an_empty_key_file_or_variable_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    file = tmp_path / "key"
    file.write_text(content)
    with pytest.raises(UserInputError, match="the API key is empty"):
        launch.app_args(["b"], api_key_file=str(file))
    monkeypatch.setenv(API_KEY_ENV, content)
    with pytest.raises(UserInputError, match=f"{API_KEY_ENV}: the API key is empty"):
        launch.app_args(["b"])


def test_a_missing_key_file_or_two_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="cannot read the API key file"):
        launch.app_args(["b"], api_key_file=str(tmp_path / "nope"))
    file = tmp_path / "key"
    file.write_text("k")
    with pytest.raises(UserInputError, match="not both"):
        launch.app_args(["b"], "k", api_key_file=str(file))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "cars.example.com", ""])
def test_an_open_server_on_another_address_is_exit_2_before_ray(
    ray_stub: None, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    assert cli.main(["serve", "b", "--host", host]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an API key" in err[0] and "--insecure-no-api-key" in err[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_key(ray_stub: None, host: str) -> None:
    with pytest.raises(RayWouldStart):
        cli.main(["serve", "b", "--host", host])


def test_another_address_starts_with_a_key_or_the_explicit_flag(
    ray_stub: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RayWouldStart):
        cli.main(["serve", "b", "--host", "0.0.0.0", "--insecure-no-api-key"])
    file = tmp_path / "key"
    file.write_text("k")
    with pytest.raises(RayWouldStart):
        cli.main(["serve", "b", "--host", "0.0.0.0", "--api-key-file", str(file)])
    monkeypatch.setenv(API_KEY_ENV, "k")
    with pytest.raises(RayWouldStart):
        cli.main(["serve", "b", "--host", "0.0.0.0"])
    args = AppArgs(bundles=["b"], ingress={"allow_unauthenticated": True})
    assert args.ingress.api_key == "k"  # the environment's key still applies


def test_the_rayservice_takes_the_key_from_a_secret() -> None:
    service = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            ref = env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "carclf-api-key", "key": "api-key"}, container["name"]
            assert "optional" not in ref  # no Secret, no pod: the open server never starts
