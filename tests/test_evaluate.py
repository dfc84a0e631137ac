"""metrics.json against scikit-learn on the saved predictions; the report; compare; bad labels."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.preprocessing import label_binarize

from carclf.bundle import load_bundle
from carclf.cli import main
from carclf.data.manifest import read_manifest
from carclf.data.transforms import load_image
from carclf.evaluate import evaluate, read_predictions, write_predictions
from carclf.explain import Explainer
from carclf.export import export_run
from carclf.inference import OnnxClassifier
from carclf.metrics import (
    SCHEMA_VERSION,
    expected_calibration_error,
    fit_temperature,
    full_metrics,
    softmax,
    temperature_effect,
)

LABELS = ["a", "b", "never_predicted", "absent", "e"]


def sklearn_figures(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Every summary figure recomputed with scikit-learn alone (ECE via calibration_curve)."""
    k = p.shape[1]
    idx = np.arange(k)
    pred = p.argmax(1)
    present = [c for c in idx if 0 < (y == c).sum() < len(y)]
    out = {
        "acc": skm.accuracy_score(y, pred),
        "balanced_acc": skm.recall_score(
            y, pred, labels=np.unique(y), average="macro", zero_division=0
        ),
        "top3": skm.top_k_accuracy_score(y, p, k=3, labels=idx),
        "top5": skm.top_k_accuracy_score(y, p, k=5, labels=idx),
        "cohen_kappa": skm.cohen_kappa_score(y, pred, labels=idx),
        "mcc": skm.matthews_corrcoef(y, pred),
        "jaccard_macro": skm.jaccard_score(y, pred, labels=idx, average="macro", zero_division=0),
        "hamming_loss": skm.hamming_loss(y, pred),
        "log_loss": skm.log_loss(y, p, labels=idx),
        "roc_auc_ovr_macro": np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in present]),
        "roc_auc_ovr_micro": skm.roc_auc_score(label_binarize(y, classes=idx), p, average="micro"),
    }
    for avg in ("macro", "weighted", "micro"):
        kw = {"labels": idx, "average": avg, "zero_division": 0}
        out[f"precision_{avg}"] = skm.precision_score(y, pred, **kw)
        out[f"recall_{avg}"] = skm.recall_score(y, pred, **kw)
        out[f"f1_{avg}"] = skm.f1_score(y, pred, **kw)
    correct = (pred == y).astype(int)
    conf = p.max(1)
    frac, mean_conf = calibration_curve(correct, conf, n_bins=15, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], conf), minlength=15)
    counts = counts[counts > 0]
    out["ece"] = float(np.sum(counts / len(y) * np.abs(frac - mean_conf)))
    return out


def assert_metrics_match(metrics: dict, predictions: Path) -> None:
    """Recompute from the saved file with pyarrow + scikit-learn and compare figure by figure."""
    table = pq.read_table(predictions)
    labels = metrics["labels"]
    y = np.array([labels.index(t) for t in table["true_label"].to_pylist()])
    p = np.array(table["probabilities"].to_pylist())
    assert table["pred_label"].to_pylist() == [labels[i] for i in p.argmax(1)]
    expected = sklearn_figures(y, p)
    assert set(metrics["summary"]) == set(expected)
    for key, value in expected.items():
        got = metrics["summary"][key]
        assert got is not None and math.isfinite(got), key
        assert got == pytest.approx(value, rel=1e-9, abs=1e-12), key
    report = skm.classification_report(
        y,
        p.argmax(1),
        labels=np.arange(len(labels)),
        target_names=labels,
        output_dict=True,
        zero_division=0,
    )
    for name in labels:
        for key in ("precision", "recall", "f1-score", "support"):
            assert metrics["per_class"][name][key] == pytest.approx(report[name][key]), (name, key)


def test_crafted_never_predicted_and_absent_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.choice([0, 1, 2, 4], size=60)  # class 3 ("absent") never occurs
    logits = rng.normal(size=(60, 5)) + 3 * np.eye(5)[y]
    logits[:, 2] -= 10  # class 2 is never predicted
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    paths = [f"img{i}.png" for i in range(60)]
    write_predictions(paths, y, p, LABELS, tmp_path / "pred.parquet")
    _, y2, p2, labels = read_predictions(tmp_path / "pred.parquet")
    metrics = full_metrics(y2, p2, labels)
    assert_metrics_match(metrics, tmp_path / "pred.parquet")
    assert metrics["absent_classes"] == ["absent"]
    assert metrics["never_predicted"] == ["never_predicted"]
    assert metrics["per_class"]["absent"]["predicted"] > 0  # predicted though absent
    assert metrics["per_class"]["absent"]["roc_auc"] is None
    assert "absent" in metrics["per_class"]["absent"]["roc_auc_undefined"]
    assert metrics["per_class"]["never_predicted"]["roc_auc"] is not None
    assert metrics["schema_version"] == SCHEMA_VERSION
    json.dumps(metrics, allow_nan=False)  # no NaN anywhere in metrics.json


def test_undefined_figures_are_null_with_a_reason() -> None:
    y = np.zeros(4, dtype=int)
    p = np.tile([0.9, 0.05, 0.05], (4, 1))  # one class only, always right
    metrics = full_metrics(y, p, ["x", "y", "z"])
    assert metrics["summary"]["cohen_kappa"] is None and "cohen_kappa" in metrics["undefined"]
    assert metrics["summary"]["roc_auc_ovr_macro"] is None
    assert metrics["per_class"]["x"]["roc_auc_undefined"].startswith("every image")
    json.dumps(metrics, allow_nan=False)


def test_ece_known_values() -> None:
    y = np.zeros(10, dtype=int)
    confident = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(y, confident) == pytest.approx(0.2)  # all right at 0.8
    y[:2] = 1  # 80 % right at confidence 0.8: calibrated
    assert expected_calibration_error(y, confident) == pytest.approx(0.0, abs=1e-12)


def test_evaluate_bundle_matches_sklearn_and_writes_a_self_contained_report(
    fake_run: Path, toy_manifest: Path, tmp_path: Path
) -> None:
    bundle = export_run(fake_run, tmp_path / "bundle").path
    result = evaluate(bundle, toy_manifest, "test", tmp_path / "eval", gallery_size=3)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result.metrics))
    assert_metrics_match(saved, tmp_path / "eval" / "predictions.parquet")
    html = result.report.read_text()
    n_right = round(saved["summary"]["acc"] * saved["n"])
    assert f"correct: {min(3, n_right)} shown of {n_right}" in html
    assert f"wrong: {min(3, saved['n'] - n_right)} shown of {saved['n'] - n_right}" in html
    assert len(list((tmp_path / "eval" / "gallery").rglob("*.png"))) == min(3, n_right) + min(
        3, saved["n"] - n_right
    )
    assert "http://" not in html and "https://" not in html  # opens offline
    assert html.count("data:image/png;base64,") >= 5 + 3  # plots + at least one gallery
    assert "Data audit" in html and "imbalance ratio" in html
    for png in ("confusion_matrix", "confusion_matrix_normalised", "roc", "reliability"):
        assert (tmp_path / "eval" / f"{png}.png").stat().st_size > 5000


def test_compare_and_training_curves_of_a_run(
    fake_run: Path, toy_manifest: Path, tmp_path: Path
) -> None:
    (fake_run / "epochs.csv").write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,val_f1_macro,lr\n"
        "0,2.0,0.2,1.9,0.25,0.2,0.003\n1,1.5,0.4,1.6,0.35,0.3,0.001\n"
    )
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            str(fake_run),
            str(fake_run),
            "--manifest",
            str(toy_manifest),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 2 and rows[0]["acc"] == rows[1]["acc"]
    assert "| model |" in (out / "comparison.md").read_text()
    assert (out / f"0_{fake_run.name}" / "training.png").stat().st_size > 5000
    saved = json.loads((out / f"0_{fake_run.name}" / "metrics.json").read_text())
    assert saved["temperature_scaling"]["source"] == "fitted on the validation split"
    assert_metrics_match(saved, out / f"0_{fake_run.name}" / "predictions.parquet")


def test_bundle_against_a_manifest_with_other_labels_exits_2(
    fake_run: Path, toy_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bundle = export_run(fake_run, tmp_path / "bundle").path
    table = pq.read_table(toy_manifest)
    labels = json.loads(table.schema.metadata[b"carclf.labels"])
    renamed = [*labels[:-1], "spaceship"]
    other = tmp_path / "other.parquet"
    meta = {**table.schema.metadata, b"carclf.labels": json.dumps(renamed).encode()}
    pq.write_table(table.replace_schema_metadata(meta), other)
    code = main(["evaluate", str(bundle), "--manifest", str(other), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2
    assert "only in the model: " + labels[-1] in err and "only in the manifest: spaceship" in err


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(4000, 6))
    p = np.exp(z / 2.0) / np.exp(z / 2.0).sum(1, keepdims=True)  # labels drawn at T = 2
    y = np.array([rng.choice(6, p=row) for row in p])
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)
    effect = temperature_effect(z, y, fit_temperature(z, y), "test")
    assert effect["ece_after"] < effect["ece_before"]


def test_bundle_temperature_is_applied_once_in_inference(
    fake_run: Path, toy_manifest: Path, tmp_path: Path
) -> None:
    bundle_dir = export_run(fake_run, tmp_path / "bundle").path
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["temperature"] > 0 and meta["metrics"]["calibration"]["source"] == "fitted on val"
    assert "softmax temperature" in (bundle_dir / "MODEL_CARD.md").read_text()
    meta["temperature"] = 2.0
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    clf = OnnxClassifier(load_bundle(bundle_dir))
    images = [load_image(p) for p, _ in read_manifest(toy_manifest).split("test")[:4]]
    raw = clf.raw_logits(clf.preprocess(images))
    np.testing.assert_allclose(clf.probabilities(images), softmax(raw / 2.0), rtol=1e-5)
    explained = Explainer.from_bundle(load_bundle(bundle_dir)).explain(images)
    served = clf.probabilities(images).max(1)
    np.testing.assert_allclose([e.score for e in explained], served, atol=1e-4)
    result = evaluate(bundle_dir, toy_manifest, "test", tmp_path / "eval", gallery_size=0)
    scaling = result.metrics["temperature_scaling"]
    assert scaling["temperature"] == 2.0 and scaling["source"] == "bundle.json"
    table = pq.read_table(tmp_path / "eval" / "predictions.parquet")
    logits = np.array(table["logits"].to_pylist())
    np.testing.assert_allclose(table["probabilities"].to_pylist(), softmax(logits / 2.0))
    y = np.array([meta["labels"].index(t) for t in table["true_label"].to_pylist()])
    assert scaling["ece_before"] == pytest.approx(expected_calibration_error(y, softmax(logits)))
