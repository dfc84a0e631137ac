import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carclf.bundle import load_bundle
from carclf.data.manifest import read_manifest
from carclf.data.transforms import load_image
from carclf.errors import UserInputError
from carclf.explain import Explainer
from carclf.export import ParityError, export_onnx, export_run, parity_check
from carclf.inference import OnnxClassifier


@pytest.fixture()
def bundle_dir(fake_run: Path, tmp_path: Path) -> Path:
    return export_run(fake_run, tmp_path / "bundle", name="body").path


def test_bundle_contract(bundle_dir: Path, toy_manifest: Path) -> None:
    info = json.loads((bundle_dir / "bundle.json").read_text())
    for key in (
        "name",
        "task",
        "labels",
        "arch",
        "num_classes",
        "input_size",
        "mean",
        "std",
        "interpolation",
        "crop_pct",
        "cam_target_layer",
        "files",
        "metrics",
        "manifest_sha256",
        "carclf_version",
        "created_at",
    ):
        assert key in info, key
    assert info["labels"] == read_manifest(toy_manifest).labels
    assert set(info["files"]) == {"model.onnx", "weights.safetensors", "MODEL_CARD.md"}
    assert info["metrics"]["parity"]["top1_agreement"] == 1.0
    assert 0.0 <= info["metrics"]["test_acc"] <= 1.0
    assert not list(bundle_dir.parent.glob(".bundle.*"))  # no temp dir left behind


def test_onnx_dynamic_batch_matches_torch(bundle_dir: Path, toy_manifest: Path) -> None:
    clf = OnnxClassifier(load_bundle(bundle_dir))
    paths = [p for p, _ in read_manifest(toy_manifest).split("test")[:5]]
    images = [load_image(p) for p in paths]
    for n in (1, 5):
        assert clf.probabilities(images[:n]).shape == (n, 7)
    explainer = Explainer.from_bundle(load_bundle(bundle_dir))
    exps = explainer.explain(images)
    onnx_top = clf.probabilities(images).argmax(1)
    assert [e.target for e in exps] == onnx_top.tolist()  # same class from both runtimes
    assert exps[0].heatmap.shape == tuple(clf.bundle.info.input_size[1:])


def test_tampered_bundle_is_refused_with_the_reason(bundle_dir: Path) -> None:
    onnx_file = bundle_dir / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(UserInputError, match=r"sha256 of model\.onnx"):
        load_bundle(bundle_dir)
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    meta["labels"] = meta["labels"][:-1]
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="label count 6 does not match num_classes 7"):
        load_bundle(bundle_dir, verify=False)


def test_parity_gate_fails_loudly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    export_onnx(model, (3, 2, 2), tmp_path / "m.onnx", opset=18)
    batch = torch.randn(4, 3, 2, 2)
    report = parity_check(model, tmp_path / "m.onnx", batch, atol=1e-4)
    assert report["max_abs_diff"] <= 1e-4
    with torch.no_grad():
        model[1].bias += 1.0  # the PyTorch model now differs from the exported one
    with pytest.raises(ParityError, match="max \\|logit diff\\|"):
        parity_check(model, tmp_path / "m.onnx", batch, atol=1e-4)
    assert np.isfinite(report["top1_agreement"])


def test_bundle_info_holds_the_runs_preprocess(bundle_dir: Path, fake_run: Path) -> None:
    from carclf.runs import load_run

    info = load_bundle(bundle_dir).info
    assert info.preprocess == load_run(fake_run).preprocess
    raw = json.loads((bundle_dir / "bundle.json").read_text())
    assert "preprocess" not in raw  # bundle.json keeps the five fields flat
    assert raw["input_size"] == list(info.preprocess.input_size)


def test_export_set_overrides_the_runs_export_settings(
    fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from carclf.cli import main

    argv = [
        "export",
        str(fake_run),
        "--out",
        str(tmp_path / "b"),
        "--set",
        "export.parity_images=3",
    ]
    assert main(argv) == 0
    assert load_bundle(tmp_path / "b").info.metrics["parity"]["images"] == 3
    capsys.readouterr()
    assert main([*argv[:4], "--set", "train.lr=1"]) == 2
    assert "only export.* keys" in capsys.readouterr().err
    assert main([*argv[:4], "--set", "export.parity_images=0"]) == 2
    assert "export.parity_images" in capsys.readouterr().err


def test_flip_tta_is_exported_into_the_onnx_graph_and_recorded(
    fake_run: Path, tmp_path: Path, toy_manifest: Path
) -> None:
    from carclf.evaluate import load_model
    from carclf.export import export_settings
    from carclf.models import with_tta
    from carclf.runs import load_run

    settings = export_settings(fake_run, ["export.tta=flip", "export.parity_images=4"])
    bundle = export_run(fake_run, tmp_path / "flip", settings=settings)
    assert bundle.info.tta == "flip"
    assert "flip (logits averaged" in (bundle.path / "MODEL_CARD.md").read_text()
    trained = load_run(fake_run)
    clf = OnnxClassifier(load_bundle(bundle.path))
    paths = [p for p, _ in read_manifest(toy_manifest).split("test")[:3]]
    batch = clf.preprocess([load_image(p) for p in paths])
    with torch.no_grad():
        expected = with_tta(trained.model, "flip")(torch.from_numpy(batch)).numpy()
        plain = trained.model(torch.from_numpy(batch)).numpy()
    assert np.allclose(clf.raw_logits(batch), expected, atol=1e-4)
    assert not np.allclose(expected, plain, atol=1e-4)  # the mirror changed something
    with pytest.raises(UserInputError, match="tta=flip"):
        load_model(bundle.path, tta="none")
    assert load_model(bundle.path).labels == trained.labels
