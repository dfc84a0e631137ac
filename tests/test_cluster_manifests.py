"""The cluster manifests parse, carry the required fields, and agree with the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from serve.front import SERVE_ENV
from serve.kuberay import MANIFEST, SERVE_CONFIG, TEMPLATE, rayservice

ROOT = Path(__file__).parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"


def _locked_version(package: str) -> str:
    lock = (ROOT / "uv.lock").read_text()  # TOML; tomllib needs Python 3.11
    return re.search(rf'name = "{package}"\nversion = "([^"]+)"', lock).group(1)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_kuberay_manifests(name: str) -> None:
    doc = yaml.safe_load((KUBERAY / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    assert cluster["rayVersion"] == _locked_version("ray")
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"]
    images = re.findall(r"image: (\S+)", (KUBERAY / name).read_text())
    python = (ROOT / ".python-version").read_text().strip().replace(".", "")
    assert all(f"py{python}" in i and f"ray{_locked_version('ray')}" in i for i in images)


def test_rayjob_runs_the_pipeline_on_a_committed_config() -> None:
    entry = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    config = re.search(r"--config (\S+)", entry).group(1)
    assert entry.startswith("python -m jobs.pipeline") and (ROOT / config).is_file()


def test_rayservice_embeds_serve_config_but_listens_on_the_pod_for_its_service() -> None:
    embedded = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())["spec"]["serveConfigV2"]
    on_k8s = yaml.safe_load(embedded)
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert local["http_options"]["host"] == "127.0.0.1"  # a laptop binds loopback
    assert on_k8s["http_options"].pop("host") == "0.0.0.0"  # the serve Service reaches the pod
    local["http_options"].pop("host")
    # Behind the serve Service, clients send its DNS names as Host (a laptop allows loopback only).
    ingress = on_k8s["applications"][0]["args"]["ingress"]
    assert "*.svc.cluster.local" in ingress.pop("allowed_hosts")
    local["applications"][0]["args"]["ingress"].pop("allowed_hosts")
    # The health app allows the same names as the app it answers for: its args are the app's.
    assert on_k8s["applications"][1]["args"]["serving"] is on_k8s["applications"][0]["args"]
    assert on_k8s == local


def test_the_committed_rayservice_is_generated_from_the_serve_config() -> None:
    """`make manifests` wrote it from serve/config.yaml: a change there reaches Kubernetes."""
    generated = rayservice(SERVE_CONFIG.read_text(), TEMPLATE.read_text())
    assert MANIFEST.read_text() == generated, "run `make manifests`"
    with pytest.raises(ValueError, match="host"):
        rayservice(
            SERVE_CONFIG.read_text().replace("  host: 127.0.0.1\n", ""), TEMPLATE.read_text()
        )


@pytest.mark.parametrize("name", ["launcher-aws.yaml", "launcher-gcp.yaml"])
def test_launcher_configs(name: str) -> None:
    doc = yaml.safe_load((ROOT / "cluster" / name).read_text())
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["available_node_types"]["head"]["resources"] == {"CPU": 0}
    starts = " ".join(doc["head_start_ray_commands"] + doc["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in starts


def test_job_runtime_env_is_valid_for_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    doc = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**doc)
    assert env["working_dir"] == "." and ".venv/" in env["excludes"]
    # The uv lock the workers install from ships with the working directory.
    assert not any(pattern in {"uv.lock", "pyproject.toml"} for pattern in doc["excludes"])


def test_serve_config_args_reach_the_builder_as_app_args(served_bundle) -> None:
    """`serve run` / `serve deploy` turn the config's ``args`` into the builder's argument
    through its annotation; a dict slipping through would fail on the cluster, not here."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve.app import build_app

    app_cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    assert app_cfg["import_path"] == "serve.app:build_app"
    args = {**app_cfg["args"], "bundles": [str(served_bundle.path)]}
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    assert isinstance(app, Application)


def test_serve_config_pairs_the_app_with_its_health_app() -> None:
    """The health app answers for the carclf app under its prefix + /v2/health, and its
    ``args`` reach its builder as ``HealthArgs``."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve.health import build_health, health_route

    app_cfg, health_cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())[
        "applications"
    ]
    assert health_cfg["import_path"] == "serve.health:build_health"
    assert health_cfg["args"]["app"] == app_cfg["name"]
    assert health_cfg["route_prefix"] == health_route(app_cfg["route_prefix"])
    app = call_user_app_builder_with_args_if_necessary(build_health, health_cfg["args"])
    assert isinstance(app, Application)


def test_every_cluster_runs_serve_in_the_mode_carclf_starts_it_in() -> None:
    """``SERVE_ENV`` is read when Ray starts: the RayService's containers, the launchers' start
    commands and ``cluster/local.sh`` set it as :func:`serve.launch.start_ray` does."""
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    groups = [service["headGroupSpec"], *service["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert SERVE_ENV.items() <= env.items(), container["name"]
    for name in ["launcher-aws.yaml", "launcher-gcp.yaml"]:
        doc = yaml.safe_load((ROOT / "cluster" / name).read_text())
        for start in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]:
            if "ray start" in start:
                assert all(f"{k}={v}" in start for k, v in SERVE_ENV.items()), (name, start)
    local = (ROOT / "cluster" / "local.sh").read_text()
    assert all(f"export {k}=${{{k}:-{v}}}" in local for k, v in SERVE_ENV.items())
