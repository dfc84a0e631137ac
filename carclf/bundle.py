"""The model bundle: the only hand-off from training to serving (docs/ARCHITECTURE.md).

A directory written atomically (temp dir + rename) holding ``model.onnx``, ``weights.safetensors``
and ``bundle.json``. Loading verifies every file's sha256 and the label count, and says which
check failed. ``bundle.json`` keeps the preprocessing's fields at its top level (``input_size``,
``mean``, ``std``, ``interpolation``, ``crop_pct``); in Python they are one
:class:`~carclf.data.transforms.Preprocess`, ``BundleInfo.preprocess``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from carclf import __version__
from carclf.data.manifest import file_sha256
from carclf.data.transforms import Preprocess
from carclf.errors import UserInputError

BUNDLE_FILE = "bundle.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
MODEL_CARD_FILE = "MODEL_CARD.md"


class BundleInfo(BaseModel):
    """The contents of ``bundle.json`` (docs/ARCHITECTURE.md, "The model bundle")."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    task: str
    labels: list[str]
    arch: str
    num_classes: int
    preprocess: Preprocess  # flat in bundle.json: input_size, mean, std, interpolation, crop_pct
    cam_target_layer: str
    temperature: float = 1.0  # logits are divided by it before the softmax (calibration)
    model_spec: dict[str, Any] = {}
    files: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    manifest_sha256: str = ""
    carclf_version: str = __version__
    created_at: str = ""

    @model_validator(mode="before")
    @classmethod
    def _gather_preprocess(cls, data: Any) -> Any:
        """bundle.json's flat preprocessing fields → ``preprocess``."""
        if isinstance(data, dict) and "preprocess" not in data:
            data = dict(data)
            fields = {k: data.pop(k) for k in Preprocess.model_fields if k in data}
            data["preprocess"] = fields
        return data

    @model_serializer(mode="wrap")
    def _flatten_preprocess(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``preprocess`` → bundle.json's flat fields, in its place among the keys."""
        out: dict[str, Any] = {}
        for key, value in handler(self).items():
            out.update(value if key == "preprocess" else {key: value})
        return out

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The model's input ``(C, H, W)``."""
        return self.preprocess.input_size


class Bundle:
    """A verified bundle on disk."""

    def __init__(self, path: str | Path, info: BundleInfo) -> None:
        self.path = Path(path)
        self.info = info

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read ``bundle.json`` and check hashes and label count; the error says which check failed."""
    path = Path(path)
    meta = path / BUNDLE_FILE
    if not meta.is_file():
        raise UserInputError(f"{path}: not a bundle (no {BUNDLE_FILE})")
    try:
        info = BundleInfo.model_validate(json.loads(meta.read_text()))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{meta}: invalid bundle.json ({str(exc).splitlines()[0]})") from None
    if len(info.labels) != info.num_classes:
        raise UserInputError(
            f"{meta}: label count {len(info.labels)} does not match num_classes {info.num_classes}"
        )
    if verify:
        for name in (ONNX_FILE, WEIGHTS_FILE):
            if name not in info.files:
                raise UserInputError(f"{meta}: no sha256 recorded for {name}")
        for name, digest in info.files.items():
            file = path / name
            if not file.is_file():
                raise UserInputError(f"{path}: {name} is missing")
            if file_sha256(file) != digest:
                raise UserInputError(f"{path}: sha256 of {name} does not match bundle.json")
    return Bundle(path, info)


def write_bundle(
    out: str | Path, info: BundleInfo, writers: dict[str, Callable[[Path], None]]
) -> Bundle:
    """Write a bundle atomically: each writer fills one file in a temp dir, then one rename.

    Args:
        out: the bundle directory; an existing one is replaced only once the new one is complete.
        info: ``bundle.json`` without ``files`` and ``created_at``, which are filled in here.
        writers: file name → function that writes that file at the given path.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, write in writers.items():
            write(tmp / name)
        info = info.model_copy(
            update={
                "files": {name: file_sha256(tmp / name) for name in writers},
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        (tmp / BUNDLE_FILE).write_text(info.model_dump_json(indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, info)
