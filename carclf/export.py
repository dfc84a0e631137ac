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
    check_replaceable,
    write_bundle,
)
from carclf.config import ExportConfig, apply_overrides, validate_config
from carclf.data.manifest import Manifest, file_sha256, read_manifest
from carclf.data.transforms import Preprocess, eval_transform
from carclf.errors import UserInputError
from carclf.explain import target_layer_for
from carclf.inference import onnx_session
from carclf.metrics import core_metrics, softmax, temperature_effect
from carclf.models import with_tta
from carclf.quantize import try_int8
from carclf.report import model_card
from carclf.runs import TrainedModel, load_run, load_run_config
from carclf.scoring import (
    Records,
    load_batch,
    onnx_logits,
    paths_of,
    score,
    targets_of,
    validation_temperature,
)


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


def _calibrated_metrics(
    shipped: Path, pre: Preprocess, val: Records, test: Records
) -> tuple[float, dict]:
    """Fit the temperature on the validation split; test figures with it applied."""
    logits_of = onnx_logits(str(shipped), pre)
    fitted = validation_temperature(logits_of, val)
    temperature = 1.0 if fitted is None else fitted
    logits, y = score(paths_of(test), logits_of), targets_of(test)
    metrics = {f"test_{k}": v for k, v in core_metrics(y, softmax(logits / temperature)).items()}
    source = "no validation images: not fitted" if fitted is None else "fitted on val"
    metrics["calibration"] = temperature_effect(logits, y, temperature, source)
    return temperature, metrics


def _maybe_int8(
    settings: ExportConfig,
    fp32: Path,
    pre: Preprocess,
    manifest: Manifest,
    records: Records,
    batch: torch.Tensor,
) -> tuple[Path, dict[str, Any] | None]:
    """The model to ship: the int8 one where ``export.quantize`` asks and it pays (quantize.py)."""
    train = manifest.split("train")
    if not settings.quantize or not train:
        return fp32, None
    # An even spread over the training split, whatever its order (it is sorted by class).
    picks = np.linspace(0, len(train) - 1, min(settings.calibration_images, len(train)))
    calibration = load_batch([train[int(i)][0] for i in picks], eval_transform(pre)).numpy()
    y = targets_of(records)

    def accuracy(model: Path) -> float:
        probs = softmax(score(paths_of(records), onnx_logits(str(model), pre)))
        return core_metrics(y, probs)["acc"]

    return try_int8(fp32, calibration, batch.numpy(), accuracy, settings.max_accuracy_drop)


def export_settings(run_dir: str | Path, overrides: list[str]) -> ExportConfig:
    """The run's ``export`` section with ``--set export.…`` overrides applied and validated."""
    for item in overrides:
        if not item.partition("=")[0].strip().startswith("export."):
            raise UserInputError(f"--set {item!r}: carclf export takes only export.* keys")
    cfg = load_run_config(run_dir)
    raw = apply_overrides(cfg.model_dump(mode="json"), overrides)
    return validate_config(raw, source=f"{run_dir} with --set").export


def _bundle_info(
    trained: TrainedModel, name: str | None, metrics: dict, temperature: float, manifest: Path
) -> BundleInfo:
    cfg = trained.cfg
    return BundleInfo(
        name=name or cfg.task,
        task=cfg.task,
        labels=trained.labels,
        arch=cfg.model.name,
        num_classes=len(trained.labels),
        preprocess=trained.preprocess,
        cam_target_layer=target_layer_for(trained.model),
        temperature=temperature,
        # The architecture only: the bundle's own weights replace whatever the run started from.
        model_spec=cfg.model.model_dump(mode="json")
        | {"pretrained": False, "pretrained_file": None},
        metrics=metrics,
        manifest_sha256=file_sha256(manifest),
    )


def export_run(
    run_dir: str | Path,
    out: str | Path,
    name: str | None = None,
    settings: ExportConfig | None = None,
) -> Bundle:
    """Export the best checkpoint of ``run_dir`` into the bundle directory ``out``.

    The parity check runs on the first ``export.parity_images`` test images (validation images
    when the test split is empty), and the bundle's metrics are onnxruntime's on the test split,
    of the model it ships (INT8 where ``export.quantize`` is on and the int8 model pays).
    The softmax temperature is fitted on the validation split; ``MODEL_CARD.md`` describes it all.
    ``settings`` replace the run's own ``export`` section (``carclf export --set export.…``).
    An existing ``out`` is replaced only if it is a bundle or empty, and that is checked first,
    before minutes of exporting.
    """
    check_replaceable(Path(out).resolve())
    trained = load_run(run_dir)
    settings = settings or trained.cfg.export
    model, pre = trained.model, trained.preprocess
    tested = with_tta(model, settings.tta)  # what model.onnx computes; the weights stay bare
    manifest = read_manifest(trained.manifest)
    records = manifest.split("test") or manifest.split("val")
    if not records:
        raise UserInputError(f"{manifest.path}: no test or validation images for the parity check")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_tmp = Path(tmp) / ONNX_FILE
        export_onnx(tested, pre.input_size, onnx_tmp, settings.opset)
        batch = load_batch(paths_of(records[: settings.parity_images]), eval_transform(pre))
        parity = parity_check(tested, onnx_tmp, batch, settings.atol)
        shipped, int8 = _maybe_int8(settings, onnx_tmp, pre, manifest, records, batch)
        temperature, metrics = _calibrated_metrics(shipped, pre, manifest.split("val"), records)
        metrics["parity"] = parity  # of the fp32 export against PyTorch
        if int8 is not None:
            metrics["quantization"] = int8
        info = _bundle_info(trained, name, metrics, temperature, manifest.path)
        info.tta = settings.tta
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
