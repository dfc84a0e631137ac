"""INT8 static quantisation at export: measured, decided by the rule, recorded in bundle.json."""

import json
from pathlib import Path

import onnx
import pytest

import carclf.quantize
from carclf.bundle import ONNX_FILE, load_bundle
from carclf.data.manifest import read_manifest
from carclf.data.transforms import load_image
from carclf.export import export_run
from carclf.inference import OnnxClassifier
from carclf.quantize import decide
from tests.conftest import write_fake_run

FIGURES = {"speedup": 1.8, "accuracy_drop_points": 0.3}


def test_int8_is_kept_only_when_faster_and_accurate_enough() -> None:
    assert decide(FIGURES, max_drop_points=0.5)[0] is True
    kept, reason = decide({**FIGURES, "speedup": 0.97}, max_drop_points=0.5)
    assert not kept and "not faster" in reason
    kept, reason = decide({**FIGURES, "accuracy_drop_points": 0.8}, max_drop_points=0.5)
    assert not kept and "0.80 accuracy points" in reason
    # A gain in accuracy is a negative drop: never a reason to refuse.
    assert decide({**FIGURES, "accuracy_drop_points": -1.0}, max_drop_points=0.0)[0] is True


def _quantized_ops(path: Path) -> int:
    return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("keep", [True, False])
def test_export_records_the_int8_figures_and_ships_what_was_decided(
    tmp_path: Path, toy_manifest: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    # Whether int8 pays depends on this CPU; the decision is forced so both paths are checked.
    monkeypatch.setattr(carclf.quantize, "decide", lambda figures, limit: (keep, "forced"))
    export = {"quantize": True, "calibration_images": 8}
    run = write_fake_run(tmp_path / "run", toy_manifest, export=export)
    bundle = export_run(run, tmp_path / "bundle", name="body")
    metrics = json.loads((bundle.path / "bundle.json").read_text())["metrics"]
    quant = metrics["quantization"]
    for key in ("fp32_images_per_s", "int8_images_per_s", "speedup", "fp32_acc", "int8_acc"):
        assert quant[key] >= 0
    assert quant["calibration_images"] == 8 and quant["kept"] is keep
    assert quant["accuracy_drop_points"] == pytest.approx(
        100 * (quant["fp32_acc"] - quant["int8_acc"])
    )
    # The shipped model is the one decided on, and the bundle's test metrics are its own.
    assert (_quantized_ops(bundle.path / ONNX_FILE) > 0) is keep
    assert metrics["test_acc"] == pytest.approx(quant["int8_acc" if keep else "fp32_acc"])
    clf = OnnxClassifier(load_bundle(bundle.path))
    path, _ = read_manifest(toy_manifest).split("test")[0]
    assert clf.probabilities([load_image(path)]).shape == (1, 7)
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert ("model.onnx: int8" in card) is keep
