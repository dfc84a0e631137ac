"""The whole path on a very small toy set: real Ray Train, export, evaluate, real HTTP to Serve."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from carclf.data.manifest import read_manifest
from carclf.evaluate import evaluate
from carclf.export import export_run
from carclf.train import run_training
from serve.client import query, wait_ready
from serve.launch import app_args, start_app, stop_app

from .conftest import SERVE_PORT, tiny_config

pytestmark = pytest.mark.integration
# The trained bundle is served beside the session's test app, on the same Serve proxy, under
# its own route prefix (one Serve start for the whole suite).
PREFIX = "/pipeline"
URL = f"http://127.0.0.1:{SERVE_PORT}{PREFIX}"


@pytest.fixture(scope="module")
def trained(ray_session, toy_manifest: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_config(
        out / "run",
        toy_manifest,
        model={"name": "scratch_cnn_bn", "kwargs": {"filters": [8, 16]}},
        train={"epochs": 2, "batch_size": 16},
        scaling={"num_workers": 2},
        tracking={"mlflow": True},
    )
    return run_training(cfg), out


@pytest.fixture(scope="module")
def served(trained, served_app: str, toy_manifest: Path):

    result, out = trained
    bundle = export_run(result.run_dir, out / "bundle", name="body")
    start_app(app_args([bundle.path]), port=SERVE_PORT, route_prefix=PREFIX)
    wait_ready(URL)
    yield bundle
    stop_app("carclf")


def test_training_reports_each_epoch_and_keeps_the_best(trained) -> None:
    result, _ = trained
    rows = (result.run_dir / "epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header + one row per epoch
    assert (result.run_dir / "config.yaml").is_file()
    assert (result.best_checkpoint / "model.safetensors").is_file()
    assert json.loads((result.run_dir / "run.json").read_text())["best_checkpoint"]
    assert {"val_acc", "val_f1_macro", "train_loss", "lr", "images_per_s"} <= set(result.metrics)


def test_training_run_is_an_mlflow_run_with_each_epoch(trained) -> None:
    from mlflow.tracking import MlflowClient

    result, out = trained
    mlflow = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")  # the default store: the run's parent
    run = mlflow.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "scratch_cnn_bn"
    history = mlflow.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [0, 1]  # logged by the controller as epochs came in
    assert run.data.metrics["best_val_acc"] == pytest.approx(result.metrics["val_acc"])


def test_evaluate_writes_metrics_plot_and_report(
    served, toy_manifest: Path, tmp_path: Path
) -> None:
    ev = evaluate(served.path, toy_manifest, "test", tmp_path / "eval")
    assert ev.report.is_file() and (tmp_path / "eval" / "confusion_matrix.png").is_file()
    assert ev.metrics["summary"]["acc"] == pytest.approx(served.info.metrics["test_acc"])


def test_http_predict_and_explain(served, toy_manifest: Path, tmp_path: Path) -> None:
    assert httpx.get(f"{URL}/v1/models").json() == {"models": ["body"]}
    image = Path(read_manifest(toy_manifest).split("test")[0][0])
    answer = query(URL, "body", image, tmp_path / "overlay.png")
    pred = answer["prediction"]
    assert pred["label"] in served.info.labels and len(pred["top_k"]) == 5
    assert answer["explanation"]["label"] == pred["label"]  # same weights, same answer
    overlay = Image.open(tmp_path / "overlay.png")
    assert overlay.size == tuple(served.info.input_size[1:])
    upload = httpx.post(f"{URL}/v1/models/body:predict", files={"file": image.open("rb")})
    assert upload.status_code == 200
    assert upload.json()["predictions"][0]["label"] == pred["label"]


def test_bad_input_gets_4xx_and_the_server_keeps_answering(served, toy_manifest: Path) -> None:
    jpeg = Path(read_manifest(toy_manifest).split("test")[0][0]).read_bytes()
    cases = [
        ("body", b"", "image/jpeg", 400),
        ("body", b"not an image", "image/jpeg", 400),
        ("body", jpeg[: len(jpeg) // 2], "image/jpeg", 400),
        ("body", jpeg, "text/plain", 415),
        ("nope", jpeg, "image/jpeg", 404),
        ("body", b"{not json", "application/json", 422),
        (
            "body",
            json.dumps({"instances": [{"image_b64": "%%%"}]}).encode(),
            "application/json",
            422,
        ),
    ]
    for model, body, kind, status in cases:
        r = httpx.post(
            f"{URL}/v1/models/{model}:predict", content=body, headers={"content-type": kind}
        )
        assert r.status_code == status, (kind, body[:20], r.text)
        assert "error" in r.json()
    bad_target = {"instances": [{"image_b64": base64.b64encode(jpeg).decode()}], "target": "tank"}
    assert httpx.post(f"{URL}/v1/models/body:explain", json=bad_target).status_code == 422
    gray = io.BytesIO()
    Image.fromarray(np.full((40, 50), 128, np.uint8)).save(gray, format="PNG")
    ok = httpx.post(
        f"{URL}/v1/models/body:predict",
        content=gray.getvalue(),
        headers={"content-type": "image/png"},
    )
    assert ok.status_code == 200
    assert httpx.get(f"{URL}/v2/health/ready").status_code == 200
