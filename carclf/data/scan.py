"""Find and check the files of an image tree: its layout, then every file read once.

A tree is pre-split (``train|val|test/<class>/…``, the split folders named in any case, ``val``
also ``valid`` or ``validation``) or flat (``<class>/…``). Hidden files and folders are ignored,
and visible entries outside the layout are noted. Every file is read once: its sha256, its header
(format and the pixel limit) and a full decode through :func:`carclf.data.transforms.load_image`,
the loader that training and serving use, so a file that is kept is a file that loads; the
near-duplicate search's fingerprint is taken from that decode. A file that cannot be used is an
:class:`Excluded` with a kind and a reason. Nothing is modified or deleted.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import sys
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from carclf.data.duplicates import fingerprint
from carclf.data.limits import AUDIT_FORMATS, AUDIT_MAX_PIXELS
from carclf.data.manifest import SPLIT_NAMES
from carclf.data.transforms import load_image
from carclf.errors import UserInputError

SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
# MPO is how Pillow names the JPEGs many cameras write (a JPEG with a preview image appended).
ALLOWED_FORMATS = AUDIT_FORMATS
MAX_PIXELS = AUDIT_MAX_PIXELS  # the default of ``max_pixels`` (carclf.data.limits says why)

# Exclusion kinds, each with a fixed meaning; the reason adds the detail.
EMPTY, NOT_IMAGE, FORMAT, BOMB, TRUNCATED, CORRUPT, UNREADABLE = (
    "empty",
    "not-image",
    "format",
    "bomb",
    "truncated",
    "corrupt",
    "unreadable",
)
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<", "HTML or XML"),
)


@dataclass
class Excluded:
    """A file left out of the manifest, and why."""

    path: str
    split: str
    label: str
    kind: str
    reason: str


@dataclass
class Candidate:
    """A regular file found in a class folder, to be checked."""

    path: Path
    label: str
    split: str  # "" until a flat root is split


@dataclass
class Layout:
    """What :func:`scan_tree` found: the layout, the class folders and every candidate file."""

    presplit: bool
    classes: dict[str, list[str]]  # split → class folders found there (flat: {"": [...]})
    files: list[Candidate]
    excluded: list[Excluded]  # entries that are not regular files
    ignored: list[str]  # visible entries outside the expected layout


# --- one file ------------------------------------------------------------------------------


def _not_image_reason(data: bytes) -> str:
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            return f"not an image: {what}"
    head = data[:512]
    try:  # incremental: a character cut at byte 512 is not an error
        if b"\x00" not in head:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            return "not an image: text"
    except UnicodeDecodeError:
        pass
    return "not an image: unknown file type"


def _damage(exc: Exception) -> str:
    return TRUNCATED if "truncated" in str(exc).lower() else CORRUPT


def check_image(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[dict | None, tuple | None]:
    """Read, hash and fully decode one file.

    Returns:
        ``(facts, None)`` for a usable image, where facts are the manifest columns sha256, width,
        height (upright, after EXIF rotation), bytes and format, plus the near-duplicate
        search's fingerprint (:func:`carclf.data.duplicates.fingerprint`, taken from this one
        decode); or ``(None, (kind, reason))`` for a file that cannot be used.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, (UNREADABLE, f"unreadable: {exc.strerror or exc}")
    if not data:
        return None, (EMPTY, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format or "?", img.size
    except Image.DecompressionBombError as exc:
        return None, (BOMB, f"decompression bomb: {exc}")
    except Image.UnidentifiedImageError:
        return None, (NOT_IMAGE, _not_image_reason(data))
    except Exception as exc:  # a broken header can raise anything; the file is the problem
        return None, (_damage(exc), f"{_damage(exc)} header: {type(exc).__name__}: {exc}")
    if fmt not in ALLOWED_FORMATS:
        return None, (FORMAT, f"format {fmt} is not allowed ({', '.join(sorted(ALLOWED_FORMATS))})")
    if width * height > max_pixels:
        return None, (BOMB, f"decompression bomb: {width}x{height} pixels > limit {max_pixels}")
    try:
        img = load_image(data)  # the loader training and serving use: kept means loadable
    except Exception as exc:  # decoders raise OSError, SyntaxError, zlib.error, ValueError, …
        return None, (_damage(exc), f"{_damage(exc)} image data, fails at full decode: {exc}")
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": img.width,
        "height": img.height,
        "bytes": len(data),
        "format": fmt,
        **fingerprint(img),
    }, None


# --- the tree ------------------------------------------------------------------------------


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_class(class_dir: Path, label: str, split: str, layout: Layout) -> None:
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))  # prune hidden folders
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _hidden(name):
                continue
            if path.is_file():
                layout.files.append(Candidate(path, label, split))
            else:  # broken links, FIFOs, sockets: reading them could fail or block
                why = "broken link" if path.is_symlink() else "not a regular file"
                layout.excluded.append(Excluded(str(path), split, label, UNREADABLE, why))


def _scan_level(folder: Path, split: str, layout: Layout) -> None:
    """Scan ``folder/<class>/…``; visible non-folders at this level are noted as ignored."""
    classes = []
    for entry in sorted(folder.iterdir()):
        if _hidden(entry.name):
            continue
        if entry.is_dir():
            classes.append(entry.name)
            _scan_class(entry, entry.name, split, layout)
        else:
            layout.ignored.append(str(entry))
    layout.classes[split] = classes


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders of a pre-split root; empty for a flat root.

    Recognised names, in any case: ``train``, ``val`` (or ``valid``, ``validation``), ``test``.
    """
    found: dict[str, list[Path]] = defaultdict(list)
    for entry in sorted(root.iterdir()):
        split = SPLIT_ALIASES.get(entry.name.lower())
        if split and entry.is_dir():
            found[split].append(entry)
    for split, entries in found.items():
        if len(entries) > 1:
            names = " and ".join(e.name for e in entries)
            raise UserInputError(f"{root}: {names} are both the {split!r} split; keep one")
    return {s: found[s][0] for s in SPLIT_NAMES if s in found}


def scan_tree(root: Path) -> Layout:
    """Find every class folder and file of a pre-split or flat ImageFolder tree."""
    if not root.is_dir():
        raise UserInputError(f"data folder not found: {root}")
    splits = split_folders(root)
    layout = Layout(presplit=bool(splits), classes={}, files=[], excluded=[], ignored=[])
    if not splits:
        _scan_level(root, "", layout)
        return layout
    for entry in sorted(root.iterdir()):
        if not _hidden(entry.name) and entry not in splits.values():
            layout.ignored.append(str(entry))  # a pre-split root holds only split folders
    for split, folder in splits.items():
        _scan_level(folder, split, layout)
    return layout


# --- every file ----------------------------------------------------------------------------


def _check_all(
    files: list[Candidate], max_pixels: int, workers: int | None
) -> list[tuple[dict | None, tuple | None]]:
    # Pillow releases the GIL while decoding, so threads read and decode files in parallel.
    with (
        warnings.catch_warnings(),
        ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as ex,
    ):
        # Images between Pillow's warning threshold and our limit are refused by our own check.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = ex.map(lambda c: check_image(c.path, max_pixels), files)
        return list(tqdm(results, total=len(files), desc="audit", disable=None, file=sys.stderr))


def check_files(
    files: list[Candidate], max_pixels: int = MAX_PIXELS, workers: int | None = None
) -> tuple[list[dict], list[Excluded]]:
    """Check every candidate file: a row for each usable one, an exclusion for each other.

    Returns:
        The rows (path, label, split and :func:`check_image`'s facts), and the exclusions, each
        in the order of ``files``.
    """
    rows, excluded = [], []
    for cand, (facts, why) in zip(files, _check_all(files, max_pixels, workers), strict=True):
        if why:
            excluded.append(Excluded(str(cand.path), cand.split, cand.label, *why))
        else:
            rows.append({"path": str(cand.path), "label": cand.label, "split": cand.split, **facts})
    return rows, excluded
