"""INT8 static quantisation of an exported ONNX model, kept only where it pays.

onnxruntime's static quantisation (QDQ format, per-channel int8 weights, uint8 activations) is
calibrated on training images. The int8 model then has to earn its place on this machine:

* **speed** — images/s of the fp32 and int8 sessions at batch 1 and one thread (what a serving
  replica runs), timed image by image in alternation so a busy neighbour slows both alike;
* **accuracy** — top-1 accuracy of both on the same evaluation images.

It is kept when it is faster and loses at most ``max_drop_points`` accuracy points; either way the
figures and the decision go into ``bundle.json`` (``metrics.quantization``). Speed-ups depend on
the CPU: int8 kernels gain most with AVX-512 VNNI or AMX, little on plain AVX2.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from carclf.inference import onnx_session

METHOD = "onnxruntime static int8 (QDQ, per-channel int8 weights, uint8 activations, MinMax)"


class _Batches(CalibrationDataReader):
    """Calibration inputs, one image per batch (onnxruntime pulls them until ``None``)."""

    def __init__(self, inputs: np.ndarray) -> None:
        self._it: Iterator[np.ndarray] = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {"input": x[None].astype(np.float32, copy=False)}


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """Write the int8 model of ``fp32`` to ``out``, calibrated on ``calibration`` (NCHW)."""
    prepared = out.with_name(out.stem + ".prepared.onnx")
    # Shape inference and graph folding first, as onnxruntime recommends before quantising.
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        _Batches(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    prepared.unlink()
    return out


def images_per_s(models: dict[str, Path], inputs: np.ndarray, threads: int = 1) -> dict[str, float]:
    """Batch-1 images/s of each model on ``inputs``, timed in alternation."""
    sessions = {k: onnx_session(str(p), threads)[0] for k, p in models.items()}
    seconds = dict.fromkeys(sessions, 0.0)
    for x in inputs[:2]:  # warm-up
        for s in sessions.values():
            s.run(["logits"], {"input": x[None]})
    for x in inputs:
        for key, s in sessions.items():
            t0 = time.perf_counter()
            s.run(["logits"], {"input": x[None]})
            seconds[key] += time.perf_counter() - t0
    return {k: len(inputs) / v for k, v in seconds.items()}


def decide(figures: dict[str, Any], max_drop_points: float) -> tuple[bool, str]:
    """Keep the int8 model only when it is faster and within the accuracy budget."""
    if figures["speedup"] <= 1.0:
        return False, f"not faster here ({figures['speedup']:.2f}x fp32)"
    if figures["accuracy_drop_points"] > max_drop_points:
        return False, (
            f"loses {figures['accuracy_drop_points']:.2f} accuracy points "
            f"(at most {max_drop_points:g} allowed)"
        )
    drop = figures["accuracy_drop_points"]
    return True, f"{figures['speedup']:.2f}x faster, {drop:.2f} points lost"


def try_int8(
    fp32: Path,
    calibration: np.ndarray,
    timing_inputs: np.ndarray,
    accuracy: Callable[[Path], float],
    max_drop_points: float,
) -> tuple[Path, dict[str, Any]]:
    """Quantise, measure and decide; returns the model to ship and the figures for bundle.json.

    Args:
        fp32: the exported (parity-checked) fp32 model.
        calibration: preprocessed training images that calibrate the activation ranges.
        timing_inputs: preprocessed images on which both models are timed.
        accuracy: top-1 accuracy of a model file on the evaluation split.
        max_drop_points: accuracy points the int8 model may lose and still be kept.
    """
    int8 = quantize_int8(fp32, fp32.with_name("model.int8.onnx"), calibration)
    speed = images_per_s({"fp32": fp32, "int8": int8}, timing_inputs)
    acc = {"fp32": accuracy(fp32), "int8": accuracy(int8)}
    figures: dict[str, Any] = {
        "method": METHOD,
        "calibration_images": len(calibration),
        "fp32_images_per_s": speed["fp32"],
        "int8_images_per_s": speed["int8"],
        "speedup": speed["int8"] / speed["fp32"],
        "speed_measured_on": f"{len(timing_inputs)} images, batch 1, 1 thread",
        "fp32_acc": acc["fp32"],
        "int8_acc": acc["int8"],
        "accuracy_drop_points": 100.0 * (acc["fp32"] - acc["int8"]),
        "max_drop_points": max_drop_points,
    }
    figures["kept"], figures["reason"] = decide(figures, max_drop_points)
    return (int8 if figures["kept"] else fp32), figures
