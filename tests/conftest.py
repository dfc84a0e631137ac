"""Shared fixtures: one tiny toy data set, one manifest, one Ray instance for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carclf.bundle import BundleInfo
from carclf.config import Config, validate_config
from carclf.data.audit import write_audit
from carclf.data.synth import write_toy_dataset
from carclf.data.transforms import Preprocess
from carclf.train import init_run

# Torch on 2 cores: one thread per process keeps Ray workers from fighting over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven body types, 12/4/4 images per class at 64 px."""
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), per_class=(12, 4, 4), size=64)


@pytest.fixture(scope="session")
def toy_manifest(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_audit(toy_root, tmp_path_factory.mktemp("manifest") / "manifest.parquet")


def tiny_config(output_dir: Path, manifest: Path, **sections: dict) -> Config:
    """A config for tiny, fast runs; ``sections`` override whole sections' keys."""
    raw = {
        "output_dir": str(output_dir),
        "seed": 0,
        "data": {"manifest": str(manifest), "augment": False},
        "model": {"name": "scratch_cnn", "img_size": 32, "kwargs": {"filters": [8, 16]}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3},
        # Half a CPU per worker: two workers fit beside the session's Serve app on 2 cores.
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "export": {"parity_images": 8},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


def stand_in_bundle_info(name: str = "toy") -> BundleInfo:
    """``bundle.json`` of a two-class bundle whose files are stand-ins (tests of bytes, not of
    what the files mean)."""
    return BundleInfo(
        name=name,
        task="body_type",
        labels=["a", "b"],
        arch="scratch_cnn",
        num_classes=2,
        preprocess=Preprocess(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3),
        cam_target_layer="features",
    )


def write_fake_run(out: Path, manifest: Path, **sections: dict) -> Path:
    """A finished run directory written without Ray (untrained weights) at ``out``."""
    return init_run(tiny_config(out, manifest, **sections))


@pytest.fixture()
def fake_run(tmp_path: Path, toy_manifest: Path) -> Path:
    """A finished run directory written without Ray (untrained weights): for export tests."""
    return write_fake_run(tmp_path / "run", toy_manifest)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it; shut down at the end of the session."""
    import ray

    from serve.launch import start_ray

    # carclf's own start-up (the dashboard, the state API that Ray Train's placement-group
    # cleaner needs, on a pinned loopback port), as a server starts it: the session's Serve
    # apps run behind the same HTTP front as `carclf serve`'s.
    start_ray(num_cpus=2)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


# --- serving: one app for every module that talks HTTP to it (test_serve_inputs, test_web_page)

# Overridable so that two checkouts (or two people) can run the serving tests at once.
SERVE_PORT = int(os.environ.get("CARCLF_TEST_SERVE_PORT", "8766"))
SERVE_KEY = "s3cret-test-key"


@pytest.fixture(scope="session")
def served_bundle(toy_manifest: Path, tmp_path_factory: pytest.TempPathFactory):
    """An exported bundle of untrained weights: enough for protocol and input tests."""
    from carclf.export import export_run

    out = tmp_path_factory.mktemp("served")
    return export_run(write_fake_run(out / "run", toy_manifest), out / "bundle", name="body")


@pytest.fixture(scope="session")
def served_app(ray_session, served_bundle):
    """The carclf app with an API key on 127.0.0.1:8766 at ``/``; yields its base URL.

    Serve is (re)started on this port first, since ``serve.start`` would not move a proxy that
    an earlier test left on another port. test_pipeline adds its app beside this one.
    """
    from ray import serve

    from serve.client import wait_ready
    from serve.launch import app_args, start_app, stop_app

    url = f"http://127.0.0.1:{SERVE_PORT}"
    serve.shutdown()
    start_app(app_args([served_bundle.path], SERVE_KEY), port=SERVE_PORT, name="carclf-test")
    wait_ready(url)
    yield url
    stop_app("carclf-test")
