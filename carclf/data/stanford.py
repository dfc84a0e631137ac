"""Import the Stanford Cars devkit as an ImageFolder tree of bounding-box crops, then audit it.

Input (``ROOT``): the images in ``ROOT/cars_train/`` and ``ROOT/cars_test/``, and the devkit in
``ROOT`` or ``ROOT/devkit/``: ``cars_meta.mat`` (``class_names``), ``cars_train_annos.mat`` and
``cars_test_annos_withlabels.mat`` (``annotations`` with ``bbox_x1, bbox_y1, bbox_x2, bbox_y2,
class, fname``; boxes are MATLAB's 1-based inclusive pixels, classes 1-based), or their CSV
equivalents ``names.csv`` (one class name per line) and ``anno_train.csv`` / ``anno_test.csv``
(``fname, x1, y1, x2, y2, class``, with or without that header row).

Labels: ``model`` keeps the 196 make/model/year classes (``"BMW M3 Coupe 2012"``); ``make`` keeps
the make, which is the first word of the class name except for the makes of two words in the data
set (``AM General``, ``Aston Martin``, ``Land Rover``), giving 49 classes. A ``/`` in a name becomes
``-`` so that every label is one folder name.

Crops are cached files, not made at load time: each box (widened by ``margin``, a fraction of the
box's width and height on each side, clipped to the image) is cut once and written as a JPEG
(quality 95) to ``OUT/images/{train,val,test}/<label>/``. The audit of that tree writes
``OUT/manifest.parquet``, which stays the one description of the data set that training, tuning and
evaluation read; loading then costs the same as for any other ImageFolder set. ``val`` is drawn
from the devkit's training images, per class, by a seeded shuffle; ``test`` is the devkit's test
set. ``OUT/import.json`` records the settings and any image that could not be imported.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from carclf.data.audit import AuditRun, run_audit
from carclf.data.splits import assign_splits
from carclf.errors import UserInputError

MULTI_WORD_MAKES: tuple[str, ...] = ("AM General", "Aston Martin", "Land Rover")
LEVELS: tuple[str, ...] = ("model", "make")
MARKER = "import.json"  # marks a folder this importer wrote, so --force may replace it
_MAT_FILES = {
    "meta": ("cars_meta.mat", "names.csv"),
    "train": ("cars_train_annos.mat", "anno_train.csv"),
    "test": ("cars_test_annos_withlabels.mat", "anno_test.csv"),
}
_FIELDS = ("fname", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")


@dataclass(frozen=True)
class StanfordImport:
    """What an import wrote: the folder, its ``import.json`` record and the audit of its images."""

    out: Path
    record: dict
    audit: AuditRun


@dataclass(frozen=True)
class Annotation:
    """One devkit image: its file name, its box (1-based inclusive pixels) and class (0-based)."""

    fname: str
    box: tuple[int, int, int, int]
    class_index: int


# --- reading the devkit ---------------------------------------------------------------------


def _find(root: Path, names: tuple[str, ...]) -> Path:
    for folder in (root, root / "devkit"):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise UserInputError(f"{root}: no {' or '.join(names)} in it or in its devkit/ folder")


def read_class_names(path: Path) -> list[str]:
    """Class names in devkit order (class 1 first), from ``cars_meta.mat`` or ``names.csv``."""
    if path.suffix == ".csv":
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        from scipy.io import loadmat

        mat = loadmat(path, squeeze_me=True)
        if "class_names" not in mat:
            raise UserInputError(f"{path}: no 'class_names' variable")
        names = [str(n).strip() for n in np.atleast_1d(mat["class_names"])]
    if not names:
        raise UserInputError(f"{path}: no class names")
    return names


def _annotation(values: list, source: str) -> Annotation:
    try:
        x1, y1, x2, y2, cls = (int(v) for v in values[1:6])
    except (TypeError, ValueError):
        raise UserInputError(f"{source}: box or class is not a number: {values}") from None
    return Annotation(str(values[0]).strip(), (x1, y1, x2, y2), cls - 1)


def read_annotations(path: Path) -> list[Annotation]:
    """Every annotation of a ``.mat`` struct array or its CSV equivalent."""
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
        if rows and not rows[0][1].strip().lstrip("-").isdigit():
            rows = rows[1:]  # a header row
        bad = [r for r in rows if len(r) < 6]
        if bad:
            raise UserInputError(f"{path}: rows need fname,x1,y1,x2,y2,class, got {bad[0]}")
        return [_annotation(r, str(path)) for r in rows]
    from scipy.io import loadmat

    annos = np.atleast_1d(loadmat(path, squeeze_me=True).get("annotations", np.array([])))
    names = annos.dtype.names or ()
    missing = [f for f in _FIELDS if f not in names]
    if missing:
        raise UserInputError(
            f"{path}: annotations lack {', '.join(missing)} "
            "(the test labels are in cars_test_annos_withlabels.mat)"
        )
    return [_annotation([a[f] for f in _FIELDS], str(path)) for a in annos]


# --- labels and boxes -----------------------------------------------------------------------


def make_of(class_name: str) -> str:
    """The make of a Stanford Cars class name: its first word, or a known two-word make."""
    for make in MULTI_WORD_MAKES:
        if class_name.startswith(make + " "):
            return make
    return class_name.split()[0]


def label_of(class_name: str, level: str) -> str:
    """The folder name (label) of a class at ``level`` (``model`` or ``make``)."""
    name = make_of(class_name) if level == "make" else class_name
    return name.replace("/", "-").strip()


def crop_box(
    box: tuple[int, int, int, int], size: tuple[int, int], margin: float
) -> tuple[int, int, int, int] | None:
    """Pillow's ``(left, top, right, bottom)`` for a 1-based inclusive box widened by ``margin``.

    Returns:
        The box clipped to the image, or None when nothing of it lies inside the image.
    """
    x1, y1, x2, y2 = box
    left, top, right, bottom = x1 - 1, y1 - 1, x2, y2
    dx, dy = margin * (right - left), margin * (bottom - top)
    left, top = max(round(left - dx), 0), max(round(top - dy), 0)
    right, bottom = min(round(right + dx), size[0]), min(round(bottom + dy), size[1])
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


# --- writing the tree -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    source: Path
    target: Path
    box: tuple[int, int, int, int]
    split: str


def _write_one(job: _Job, margin: float, crop: bool) -> str | None:
    """Cut and write one image; return why it could not be, or None."""
    if not job.source.is_file():
        return "image file not found"
    try:
        with Image.open(job.source) as img:
            img.load()
            if crop:
                cut = crop_box(job.box, img.size, margin)
                if cut is None:
                    return f"box {job.box} lies outside the {img.width}x{img.height} image"
                img = img.crop(cut)
            job.target.parent.mkdir(parents=True, exist_ok=True)
            img.convert("RGB").save(job.target, "JPEG", quality=95)
    except Exception as exc:  # a broken source image is reported, never fatal
        return f"cannot read the image: {type(exc).__name__}: {exc}"
    return None


def _jobs(
    annos: dict[str, list[Annotation]],
    images: dict[str, Path],
    labels: list[str],
    out: Path,
    val_ratio: float,
    seed: int,
) -> list[_Job]:
    """One job per annotation; val is drawn per class from the devkit's training images."""
    jobs = []
    by_label: dict[str, list[Annotation]] = defaultdict(list)
    for a in annos["train"]:
        by_label[labels[a.class_index]].append(a)
    split_of: dict[str, str] = {}
    for label, group in by_label.items():
        group = sorted(group, key=lambda a: a.fname)
        splits = assign_splits(len(group), (1 - val_ratio, val_ratio, 0.0), seed, label)
        for a, split in zip(group, splits or ["train"] * len(group), strict=True):
            split_of[a.fname] = split
    for devkit_split, group in annos.items():
        for a in group:
            split = split_of[a.fname] if devkit_split == "train" else "test"
            target = out / split / labels[a.class_index] / f"{Path(a.fname).stem}.jpg"
            jobs.append(_Job(images[devkit_split] / a.fname, target, a.box, split))
    return jobs


def _check_classes(annos: dict[str, list[Annotation]], names: list[str], path: Path) -> None:
    for split, group in annos.items():
        for a in group:
            if not 0 <= a.class_index < len(names):
                raise UserInputError(
                    f"{path}: {split} image {a.fname} has class {a.class_index + 1}, "
                    f"outside 1..{len(names)}"
                )


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished import into place; replace only an earlier import, and only with force."""
    if out.exists():
        if not force:
            raise UserInputError(f"{out} exists (--force replaces an earlier import)")
        if not (out / MARKER).is_file():
            raise UserInputError(
                f"{out} exists and is not a Stanford Cars import; not replacing it"
            )
        shutil.rmtree(out)
    os.replace(tmp, out)


def _check_options(out: Path, level: str, margin: float, val_ratio: float, force: bool) -> None:
    """Refuse bad settings, and an existing ``out`` without force, before reading anything."""
    if level not in LEVELS:
        raise UserInputError(f"--level must be one of {', '.join(LEVELS)}, got {level!r}")
    if margin < 0:
        raise UserInputError(f"--margin must be >= 0, got {margin}")
    if not 0 <= val_ratio < 1:
        raise UserInputError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if out.exists() and not force:
        raise UserInputError(f"{out} exists (--force replaces an earlier import)")


def _read_devkit(
    root: Path,
) -> tuple[list[str], dict[str, list[Annotation]], dict[str, Path]]:
    """The class names, the train and test annotations, and the image folder of each split."""
    meta = _find(root, _MAT_FILES["meta"])
    names = read_class_names(meta)
    annos = {split: read_annotations(_find(root, _MAT_FILES[split])) for split in ("train", "test")}
    _check_classes(annos, names, meta)
    images = {split: root / f"cars_{split}" for split in annos}
    for folder in images.values():
        if not folder.is_dir():
            raise UserInputError(f"image folder not found: {folder}")
    return names, annos, images


def _write_all(jobs: list[_Job], margin: float, crop: bool) -> list[str | None]:
    """Run every job; why each one could not be written, or None, in the order of ``jobs``."""
    # Pillow releases the GIL while decoding and encoding, so threads cut images in parallel.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
        results = ex.map(lambda j: _write_one(j, margin, crop), jobs)
        return list(tqdm(results, total=len(jobs), desc="crop", disable=None, file=sys.stderr))


def _record(
    root: Path, labels: list[str], jobs: list[_Job], why: list[str | None], settings: dict
) -> dict:
    """The ``import.json`` record: source, settings, images written per split and skipped ones."""
    skipped = [
        {"image": str(j.source), "split": j.split, "reason": r}
        for j, r in zip(jobs, why, strict=True)
        if r
    ]
    return {
        "source": str(root.resolve()),
        "level": settings["level"],
        "classes": len(set(labels)),
        "margin": settings["margin"],
        "crop": settings["crop"],
        "val_ratio": settings["val_ratio"],
        "seed": settings["seed"],
        "written": dict(Counter(j.split for j, r in zip(jobs, why, strict=True) if not r)),
        "skipped": skipped,
    }


def import_stanford_cars(
    root: str | Path,
    out: str | Path,
    level: str = "model",
    margin: float = 0.0,
    crop: bool = True,
    val_ratio: float = 0.1,
    seed: int = 42,
    force: bool = False,
) -> StanfordImport:
    """Write the devkit under ``root`` as cropped ImageFolder ``out/images`` and audit it.

    Args:
        root: Folder with ``cars_train/``, ``cars_test/`` and the devkit files.
        out: New folder for ``images/``, ``import.json`` and ``manifest.parquet``.
        level: ``model`` (196 classes) or ``make`` (49 classes).
        margin: Context around each box, as a fraction of its width and height on each side.
        crop: Cut the bounding boxes; False keeps whole images.
        val_ratio: Fraction of each class's training images that becomes ``val``.
        seed: Seed of the val draw.
        force: Replace an earlier import in ``out``.

    Returns:
        The import; its audit's manifest is ``out/manifest.parquet``.
    """
    root, out = Path(root), Path(out)
    _check_options(out, level, margin, val_ratio, force)
    names, annos, images = _read_devkit(root)
    settings = {
        "level": level,
        "margin": margin,
        "crop": crop,
        "val_ratio": val_ratio,
        "seed": seed,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside ``out`` and moved into place whole, so a failed import leaves no half tree.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        labels = [label_of(n, level) for n in names]
        jobs = _jobs(annos, images, labels, tmp / "images", val_ratio, seed)
        record = _record(root, labels, jobs, _write_all(jobs, margin, crop), settings)
        (tmp / MARKER).write_text(json.dumps(record, indent=2))
        _replace(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    audit = run_audit(out / "images", out / "manifest.parquet", force=True)
    return StanfordImport(out, record, audit)
