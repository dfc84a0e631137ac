"""Audit an image tree: scan, check every file, split, and write the manifest and a report.

Accepts a pre-split root (``train|val|test/<class>/…``) or a flat root (``<class>/…``) that is split
stratified and deterministically. Files that cannot be used are excluded with a reason and
reported; nothing in the user's tree is ever modified or deleted.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from carclf.data.manifest import file_sha256, write_manifest
from carclf.errors import UserInputError

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
MAX_PIXELS = 64_000_000


@dataclass
class Excluded:
    path: str
    split: str
    label: str
    reason: str


@dataclass
class AuditResult:
    """What an audit found: the usable rows, the label order and everything it left out."""

    rows: list[dict]
    labels: list[str]
    excluded: list[Excluded] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    cross_split_duplicates: list[list[str]] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (split, label), n in sorted(
            Counter((r["split"], r["label"]) for r in self.rows).items()
        ):
            out[split][label] = n
        return dict(out)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_image(path: Path) -> tuple[dict | None, str | None]:
    """Fully decode one file; return its image facts, or the reason it cannot be used."""
    size = path.stat().st_size
    if size == 0:
        return None, "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                fmt = img.format or "?"
                if fmt not in ALLOWED_FORMATS:
                    return None, f"format {fmt} is not allowed"
                width, height = img.size
                if width * height > MAX_PIXELS:
                    return None, f"decompression bomb ({width}x{height} pixels)"
                img.load()  # full decode: catches truncated and corrupt-after-header files
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression bomb (pixel limit)"
    except Image.UnidentifiedImageError:
        return None, "not an image"
    except (OSError, ValueError, SyntaxError) as exc:
        return None, f"corrupt or truncated image ({exc})"
    return {"width": width, "height": height, "bytes": size, "format": fmt}, None


def _scan_split(folder: Path, split: str) -> list[tuple[Path, str, str]]:
    """``(file, label, split)`` for every visible file under ``folder/<class>/``."""
    found = []
    for class_dir in _class_dirs(folder):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and _visible(path, class_dir):
                found.append((path, class_dir.name, split))
    return found


def _stratified_split(
    files: list[tuple[Path, str]], ratios: tuple[float, float, float], seed: int
) -> list[tuple[Path, str, str]]:
    """Assign train/val/test per class by a seeded shuffle of the sorted file names."""
    by_class: dict[str, list[Path]] = defaultdict(list)
    for path, label in files:
        by_class[label].append(path)
    out = []
    for label, paths in sorted(by_class.items()):
        paths = sorted(paths)
        order = np.random.default_rng([seed, len(paths)]).permutation(len(paths))
        n_val = round(len(paths) * ratios[1])
        n_test = round(len(paths) * ratios[2])
        for rank, i in enumerate(order):
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            out.append((paths[i], label, split))
    return out


def scan_tree(
    root: str | Path, ratios: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 42
) -> list[tuple[Path, str, str]]:
    """List ``(file, label, split)`` for a pre-split or a flat ImageFolder tree."""
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"data folder not found: {root}")
    split_dirs = [root / s for s in SPLIT_NAMES if (root / s).is_dir()]
    if split_dirs:
        return [item for d in split_dirs for item in _scan_split(d, d.name)]
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise UserInputError(f"--ratios must add up to 1, got {ratios}")
    flat = [(path, label) for path, label, _ in _scan_split(root, "")]
    return _stratified_split(flat, ratios, seed)


def _check_classes(rows: list[dict], found: list[tuple[Path, str, str]], root: Path) -> list[str]:
    """The label order (sorted class names) after refusing inconsistent or empty classes."""
    all_classes = sorted({label for _, label, _ in found})
    splits = sorted({split for _, _, split in found})
    usable = Counter((r["split"], r["label"]) for r in rows)
    for split in splits:
        for label in all_classes:
            if not any(s == split and lab == label for _, lab, s in found):
                raise UserInputError(f"{root}: class {label!r} is missing from split {split!r}")
            if usable[(split, label)] == 0:
                raise UserInputError(f"{root}: class {label!r} has no usable image in {split!r}")
    if len(all_classes) < 2:
        raise UserInputError(f"{root}: found {len(all_classes)} class(es); at least 2 are needed")
    return all_classes


def audit_tree(
    root: str | Path, ratios: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 42
) -> AuditResult:
    """Scan and check every file under ``root``; raise ``UserInputError`` on an unusable tree."""
    root = Path(root).resolve()
    found = scan_tree(root, ratios, seed)
    if not found:
        raise UserInputError(f"{root}: no class folders with files found")
    rows, excluded = [], []
    for path, label, split in found:
        facts, reason = check_image(path)
        if reason:
            excluded.append(Excluded(str(path), split, label, reason))
            continue
        rows.append(
            {
                "path": str(path),
                "label": label,
                "split": split,
                "sha256": file_sha256(path),
                **facts,
            }
        )
    labels = _check_classes(rows, found, root)
    index = {name: i for i, name in enumerate(labels)}
    for row in rows:
        row["label_index"] = index[row["label"]]
    result = AuditResult(rows=rows, labels=labels, excluded=excluded)
    _find_duplicates(result)
    return result


def _find_duplicates(result: AuditResult) -> None:
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in result.rows:
        by_hash[row["sha256"]].append(row)
    for group in by_hash.values():
        if len(group) > 1:
            paths = [r["path"] for r in group]
            result.duplicates.append(paths)
            if len({r["split"] for r in group}) > 1:
                result.cross_split_duplicates.append(paths)


def audit_report(result: AuditResult) -> dict:
    """The audit as a JSON-ready dict: counts, imbalance, exclusions, duplicates, sizes."""
    counts = result.counts()
    train = counts.get("train", {})
    sizes = np.array([[r["width"], r["height"]] for r in result.rows]) if result.rows else None
    return {
        "labels": result.labels,
        "images": len(result.rows),
        "counts": counts,
        "imbalance_ratio": (max(train.values()) / min(train.values())) if train else None,
        "excluded": [asdict(e) for e in result.excluded],
        "duplicates": result.duplicates,
        "cross_split_duplicates": result.cross_split_duplicates,
        "image_size": None
        if sizes is None
        else {
            "width": {
                "min": int(sizes[:, 0].min()),
                "median": float(np.median(sizes[:, 0])),
                "max": int(sizes[:, 0].max()),
            },
            "height": {
                "min": int(sizes[:, 1].min()),
                "median": float(np.median(sizes[:, 1])),
                "max": int(sizes[:, 1].max()),
            },
        },
    }


def report_markdown(report: dict) -> str:
    """A person's view of :func:`audit_report`."""
    splits = sorted(report["counts"])
    lines = [
        "# Data audit",
        "",
        f"{report['images']} usable images, {len(report['labels'])} classes.",
    ]
    lines += ["", "| class | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for label in report["labels"]:
        cells = [str(report["counts"][s].get(label, 0)) for s in splits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["imbalance_ratio"] is not None:
        lines += [
            "",
            f"Imbalance ratio (largest / smallest class in train): {report['imbalance_ratio']:.2f}",
        ]
    lines += ["", f"## Excluded files ({len(report['excluded'])})", ""]
    lines += [f"- `{e['path']}`: {e['reason']}" for e in report["excluded"]] or ["None."]
    lines += ["", f"## Duplicates across splits ({len(report['cross_split_duplicates'])})", ""]
    lines += [f"- {', '.join(f'`{p}`' for p in g)}" for g in report["cross_split_duplicates"]]
    return "\n".join(lines) + "\n"


def write_audit(
    root: str | Path,
    manifest: str | Path,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    force: bool = False,
) -> Path:
    """Audit ``root`` and write the manifest plus ``<manifest>.audit.{json,md}`` beside it.

    An existing manifest is reused as it is unless ``force`` is set.

    Returns:
        The manifest path.
    """
    manifest = Path(manifest)
    if manifest.exists() and not force:
        return manifest
    result = audit_tree(root, ratios, seed)
    write_manifest(result.rows, result.labels, manifest, root=str(Path(root).resolve()))
    report = audit_report(result)
    stem = manifest.with_suffix("")
    Path(f"{stem}.audit.json").write_text(json.dumps(report, indent=2))
    Path(f"{stem}.audit.md").write_text(report_markdown(report))
    return manifest
