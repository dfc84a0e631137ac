"""The model bundle: the only hand-off from training to serving (docs/ARCHITECTURE.md).

A directory written atomically (temp dir + rename) holding ``model.onnx``, ``weights.safetensors``
and ``bundle.json``. Loading verifies every file's sha256 and the label count, and says which
check failed. Those hashes sit in the bundle itself, so they catch corruption, not tampering:
whoever can rewrite a file can rewrite ``bundle.json`` too. The *digest* (:func:`bundle_digest`,
the sha256 of ``bundle.json``'s bytes, which list every file's sha256) pins all of them at once:
``load_bundle(path, expected_sha256=digest)`` refuses a bundle in which any byte of
``bundle.json`` or of a file it lists changed.

``bundle.json`` keeps the preprocessing's fields at its top level (``input_size``,
``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``); in Python they are one
:class:`~carclf.data.transforms.Preprocess`, ``BundleInfo.preprocess``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
PIN_SEPARATOR = "@sha256:"  # a pinned reference: ``path/to/bundle@sha256:<64 hex digits>``
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BundleInfo(BaseModel):
    """The contents of ``bundle.json`` (docs/ARCHITECTURE.md, "The model bundle")."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    task: str
    labels: list[str]
    arch: str
    num_classes: int
    preprocess: Preprocess  # flat in bundle.json: input_size, mean, std, interpolation, crop_pct,
    # crop_mode
    cam_target_layer: str
    temperature: float = 1.0  # logits are divided by it before the softmax (calibration)
    tta: str = "none"  # test-time augmentation inside model.onnx (export.tta): none or flip
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


def bundle_digest(path: str | Path) -> str:
    """The bundle's digest: the sha256 (hex) of ``bundle.json`` as stored, which is what
    ``sha256sum bundle.json`` prints. It pins every file, since ``bundle.json`` lists their
    hashes; compute it where the bundle was made (``carclf bundle digest``), not where it is
    served. It does not check the files: :func:`load_bundle` with ``expected_sha256`` does."""
    meta = Path(path) / BUNDLE_FILE
    if not meta.is_file():
        raise UserInputError(f"{path}: not a bundle (no {BUNDLE_FILE})")
    return hashlib.sha256(meta.read_bytes()).hexdigest()


def normalize_sha256(value: str) -> str:
    """A digest as given by a user (``sha256:<hex>`` or ``<hex>``, any case) → 64 hex digits."""
    hexdigest = value.strip().lower().removeprefix("sha256:")
    if not _HEX64.fullmatch(hexdigest):
        raise UserInputError(f"not a sha256 digest (64 hex digits): {value!r}")
    return hexdigest


def split_pinned(ref: str) -> tuple[str, str | None]:
    """``path@sha256:<hex>`` → (path, hex digest); a plain path → (path, None)."""
    path, sep, digest = ref.rpartition(PIN_SEPARATOR)
    if not sep:
        return ref, None
    return path, normalize_sha256(digest)


def pinned_ref(path: str | Path, digest: str) -> str:
    """The pinned reference of a bundle: ``path@sha256:<hex>``."""
    return f"{path}{PIN_SEPARATOR}{normalize_sha256(digest)}"


def load_ref(ref: str | Path, verify: bool = True) -> Bundle:
    """A bundle by reference: its directory, or ``path@sha256:<hex>`` checked against the pin.

    Args:
        ref: the directory, or the pinned reference that ``carclf bundle digest`` prints.
        verify: check the file hashes of an unpinned bundle (a pinned one is always checked).
    """
    path, pin = split_pinned(str(ref))
    return load_bundle(path, verify=verify or pin is not None, expected_sha256=pin)


def load_bundle(
    path: str | Path, verify: bool = True, expected_sha256: str | None = None
) -> Bundle:
    """Read ``bundle.json`` and check hashes and label count; the error says which check failed.

    Args:
        path: the bundle directory.
        verify: check every listed file's sha256 (against ``bundle.json``: corruption).
        expected_sha256: the digest this bundle must have (:func:`bundle_digest`): then
            ``bundle.json`` is checked against it and every file against ``bundle.json``, so a
            changed byte anywhere is refused (tampering). Needs ``verify``.
    """
    if expected_sha256 is not None and not verify:
        raise ValueError("expected_sha256 needs verify=True: a pin checks every file")
    path = Path(path)
    meta = path / BUNDLE_FILE
    if not meta.is_file():
        raise UserInputError(f"{path}: not a bundle (no {BUNDLE_FILE})")
    raw = meta.read_bytes()  # hashed and parsed from the same bytes: nothing read twice
    if expected_sha256 is not None:
        want, got = normalize_sha256(expected_sha256), hashlib.sha256(raw).hexdigest()
        if got != want:
            raise UserInputError(f"{meta}: sha256 is {got}, the pin expects {want}")
    try:
        info = BundleInfo.model_validate(json.loads(raw))
    except (ValidationError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{meta}: invalid bundle.json ({str(exc).splitlines()[0]})") from None
    if len(info.labels) != info.num_classes:
        raise UserInputError(
            f"{meta}: label count {len(info.labels)} does not match num_classes {info.num_classes}"
        )
    if verify:
        _verify_files(path, info)
    return Bundle(path, info)


def _verify_files(path: Path, info: BundleInfo) -> None:
    """Every file ``bundle.json`` lists exists with its sha256; model and weights are listed."""
    meta = path / BUNDLE_FILE
    for name in (ONNX_FILE, WEIGHTS_FILE):
        if name not in info.files:
            raise UserInputError(f"{meta}: no sha256 recorded for {name}")
    for name, digest in info.files.items():
        if Path(name).name != name or name in (".", "..", BUNDLE_FILE):
            raise UserInputError(f"{meta}: {name!r} is not a file name inside the bundle")
        file = path / name
        if not file.is_file():
            raise UserInputError(f"{path}: {name} is missing")
        if file_sha256(file) != digest:
            raise UserInputError(f"{path}: sha256 of {name} does not match bundle.json")


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a ``bundle.json`` that parses as one."""
    try:
        load_bundle(path, verify=False)
    except (UserInputError, OSError):
        return False
    return True


def check_replaceable(out: str | Path) -> None:
    """Refuse an existing ``out`` that writing a bundle there would destroy.

    Only an absent path, an empty directory or a carclf bundle may be replaced: ``--out`` is a
    path a user types, and a run, a data set or a checkout given by mistake must survive it.

    Raises:
        UserInputError: ``out`` exists and is neither an empty directory nor a bundle.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir():
        try:
            empty = not any(out.iterdir())
        except OSError:
            empty = False
        if empty or is_bundle(out):
            return
    raise UserInputError(
        f"{out} exists and is not a carclf bundle (no valid {BUNDLE_FILE}); not replacing it "
        "(give a new or empty directory, or an earlier bundle)"
    )


def write_bundle(
    out: str | Path, info: BundleInfo, writers: dict[str, Callable[[Path], None]]
) -> Bundle:
    """Write a bundle atomically: each writer fills one file in a temp dir, then one rename.

    Args:
        out: the bundle directory; an existing one is replaced only once the new one is complete,
            and only if it is a bundle or empty (:func:`check_replaceable`).
        info: ``bundle.json`` without ``files`` and ``created_at``, which are filled in here.
        writers: file name → function that writes that file at the given path.

    Raises:
        UserInputError: ``out`` exists and is neither a bundle nor an empty directory; it is
            left as it was.
    """
    out = Path(out).resolve()
    check_replaceable(out)
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
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, info)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, setting aside an earlier bundle first."""
    check_replaceable(out)  # again: the writers took a while, and ``out`` may have changed
    if not out.exists():
        os.replace(tmp, out)
        return
    # A fresh, empty name of our own to move the old bundle to (rename replaces an empty
    # directory), so nothing of the user's beside ``out`` is ever removed.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
