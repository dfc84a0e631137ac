"""Export a run's best checkpoint as a bundle, gated by an ONNX-vs-PyTorch parity check."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.torch import save_file
from torch import nn

from carclf.bundle import (
    MODEL_CARD_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    Bundle,
    BundleInfo,
    write_bundle,
)
from carclf.data.manifest import Manifest, file_sha256, read_manifest
from carclf.data.transforms import eval_transform, load_image
from carclf.errors import UserInputError
from carclf.explain import target_layer_for
from carclf.inference import onnx_session
from carclf.metrics import core_metrics, fit_temperature, softmax, temperature_effect
from carclf.quantize import try_int8
from carclf.report import model_card
from carclf.train import load_run


class ParityError(RuntimeError):
    """onnxruntime and PyTorch disagree on the same images: the export is not trustworthy."""


def export_onnx(model: nn.Module, input_size: tuple[int, int, int], path: Path, opset: int) -> None:
    """Write ``model`` as ONNX with a dynamic batch axis, input ``input``, output ``logits``."""
    dummy = torch.zeros(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        dynamo=True,
        external_data=False,  # one self-contained file; the bundle hashes it
        verbose=False,
    )
    onnx.checker.check_model(str(path), full_check=True)


def parity_check(
    model: nn.Module, onnx_path: Path, batch: torch.Tensor, atol: float
) -> dict[str, float]:
    """Compare PyTorch and onnxruntime logits on ``batch``; raise :class:`ParityError` on a gap.

    Returns:
        ``images``, ``top1_agreement`` and ``max_abs_diff`` of the comparison.
    """
    with torch.no_grad():
        expected = model(batch).numpy()
    session, _ = onnx_session(str(onnx_path), threads=torch.get_num_threads())
    actual = session.run(["logits"], {"input": batch.numpy()})[0]
    agreement = float((expected.argmax(1) == actual.argmax(1)).mean())
    max_diff = float(np.abs(expected - actual).max())
    report = {"images": len(batch), "top1_agreement": agreement, "max_abs_diff": max_diff}
    if agreement < 1.0 or max_diff > atol:
        raise ParityError(
            f"ONNX export differs from PyTorch on {len(batch)} images: top-1 agreement "
            f"{agreement:.4f} (need 1.0), max |logit diff| {max_diff:.2e} (need <= {atol:.0e})"
        )
    return report


def _load_batch(paths: list[str], transform) -> torch.Tensor:
    return torch.stack([transform(load_image(p)) for p in paths])


def _onnx_logits(onnx_path: Path, records: list[tuple[str, int]], transform) -> np.ndarray:
    session, _ = onnx_session(str(onnx_path), threads=torch.get_num_threads())
    logits = []
    for start in range(0, len(records), 64):
        batch = _load_batch([p for p, _ in records[start : start + 64]], transform).numpy()
        logits.append(session.run(["logits"], {"input": batch})[0])
    return np.concatenate(logits)


def _calibrated_metrics(
    onnx_path: Path, val: list[tuple[str, int]], test: list[tuple[str, int]], transform
) -> tuple[float, dict]:
    """Fit the temperature on the validation split; test figures with it applied."""
    temperature = 1.0
    if val:
        temperature = fit_temperature(_onnx_logits(onnx_path, val, transform), _targets(val))
    logits, y = _onnx_logits(onnx_path, test, transform), _targets(test)
    metrics = {f"test_{k}": v for k, v in core_metrics(y, softmax(logits / temperature)).items()}
    source = "fitted on val" if val else "no validation images: not fitted"
    metrics["calibration"] = temperature_effect(logits, y, temperature, source)
    return temperature, metrics


def _targets(records: list[tuple[str, int]]) -> np.ndarray:
    return np.array([y for _, y in records])


def _maybe_int8(
    cfg_export: Any, fp32: Path, manifest: Manifest, records: list, batch: torch.Tensor, transform
) -> tuple[Path, dict[str, Any] | None]:
    """The model to ship: the int8 one where ``export.quantize`` asks and it pays (quantize.py)."""
    train = manifest.split("train")
    if not cfg_export.quantize or not train:
        return fp32, None
    # An even spread over the training split, whatever its order (it is sorted by class).
    picks = np.linspace(0, len(train) - 1, min(cfg_export.calibration_images, len(train)))
    calibration = _load_batch([train[int(i)][0] for i in picks], transform).numpy()
    y = _targets(records)

    def accuracy(model: Path) -> float:
        return core_metrics(y, softmax(_onnx_logits(model, records, transform)))["acc"]

    return try_int8(fp32, calibration, batch.numpy(), accuracy, cfg_export.max_accuracy_drop)


def export_run(run_dir: str | Path, out: str | Path, name: str | None = None) -> Bundle:
    """Export the best checkpoint of ``run_dir`` into the bundle directory ``out``.

    The parity check runs on the first ``export.parity_images`` test images (validation images
    when the test split is empty), and the bundle's metrics are onnxruntime's on the test split,
    of the model it ships (INT8 where ``export.quantize`` is on and the int8 model pays).
    The softmax temperature is fitted on the validation split; ``MODEL_CARD.md`` describes it all.
    """
    trained = load_run(run_dir)
    cfg, model = trained.cfg, trained.model
    manifest = read_manifest(trained.manifest)
    records = manifest.split("test") or manifest.split("val")
    if not records:
        raise UserInputError(f"{manifest.path}: no test or validation images for the parity check")
    transform = eval_transform(trained.preprocess)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_tmp = Path(tmp) / ONNX_FILE
        export_onnx(model, trained.preprocess.input_size, onnx_tmp, cfg.export.opset)
        batch = _load_batch([p for p, _ in records[: cfg.export.parity_images]], transform)
        parity = parity_check(model, onnx_tmp, batch, cfg.export.atol)
        shipped, int8 = _maybe_int8(cfg.export, onnx_tmp, manifest, records, batch, transform)
        temperature, metrics = _calibrated_metrics(
            shipped, manifest.split("val"), records, transform
        )
        metrics["parity"] = parity  # of the fp32 export against PyTorch
        if int8 is not None:
            metrics["quantization"] = int8
        pre = trained.preprocess
        info = BundleInfo(
            name=name or cfg.task,
            task=cfg.task,
            labels=trained.labels,
            arch=cfg.model.name,
            num_classes=len(trained.labels),
            input_size=pre.input_size,
            mean=pre.mean,
            std=pre.std,
            interpolation=pre.interpolation,
            crop_pct=pre.crop_pct,
            cam_target_layer=target_layer_for(model),
            temperature=temperature,
            model_spec=cfg.model.model_dump(mode="json") | {"pretrained": False},
            metrics=metrics,
            manifest_sha256=file_sha256(manifest.path),
        )
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        return write_bundle(
            out,
            info,
            {
                ONNX_FILE: lambda p: shutil.copyfile(shipped, p),
                WEIGHTS_FILE: lambda p: save_file(weights, str(p)),
                MODEL_CARD_FILE: lambda p: p.write_text(model_card(info)),
            },
        )
