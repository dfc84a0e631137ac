"""Audit an image tree: scan, check every file, split, and write the manifest and a report.

Accepts a pre-split root (``train|val|test/<class>/…``) or a flat root (``<class>/…``) that is split
stratified and deterministically, each cluster of identical or near-duplicate files within one
split. The story, top-down: :func:`run_audit` reuses a fitting earlier manifest of an unchanged
tree (:mod:`carclf.data.reuse`) or runs :func:`audit_tree`, which lists the tree and checks every
file once (:mod:`carclf.data.scan`), finds identical files and confirmed near-duplicates
(:mod:`carclf.data.duplicates`), splits a flat root (:mod:`carclf.data.splits`), reports
near-duplicates across splits or labels, and checks that the data set is usable
(:func:`class_problems`); the findings are reported beside the manifest
(:mod:`carclf.data.audit_report`). Problems that make the data set unusable (a class missing from
a split, a class without a usable image, fewer than two classes) are written to the report and
then refused. Nothing in the user's tree is ever modified or deleted.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carclf.data.audit_report import (
    AuditResult,
    audit_report,
    read_report,
    report_paths,
    summary_lines,
    write_report,
)
from carclf.data.duplicates import (
    dedupe,
    find_duplicates,
    near_duplicate_pairs,
    near_duplicates,
    near_label_conflicts,
)
from carclf.data.manifest import write_manifest
from carclf.data.reuse import audit_settings, check_reusable, encode_listing, tree_listing
from carclf.data.scan import MAX_PIXELS, Excluded, Layout, check_files, scan_tree, split_folders
from carclf.data.splits import kept_clusters, stratified_split
from carclf.errors import UserInputError

# The entry points: what the commands call (summary_lines is the report's, printed by them).
__all__ = ["AuditRun", "audit_tree", "class_problems", "run_audit", "summary_lines", "write_audit"]


@dataclass
class AuditRun:
    """The outcome of :func:`run_audit`: the manifest, its report, and whether it was reused."""

    manifest: Path
    report: dict | None
    report_paths: tuple[Path, Path]
    reused: bool


def run_audit(
    root: str | Path,
    manifest: str | Path,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    force: bool = False,
    dedupe_files: bool = False,
    max_pixels: int = MAX_PIXELS,
    group_near_duplicates: bool = True,
) -> AuditRun:
    """Audit ``root``; write the manifest and ``<manifest stem>.audit.{json,md}`` beside it.

    An existing manifest is reused unless ``force`` is set, after checking that it was built from
    the same tree with the same settings (else ``UserInputError``) and that no file was added,
    removed or modified since; if one was, the tree is audited again, with a line on stderr that
    says what changed (:mod:`carclf.data.reuse` holds the rule). A data set with problems gets
    its report written, and then ``UserInputError`` naming the first problem; no manifest is
    written for it. The other options are :func:`audit_tree`'s.
    """
    manifest, root = Path(manifest), Path(root).resolve()
    settings = audit_settings(
        root.is_dir() and not split_folders(root),
        ratios=ratios,
        seed=seed,
        dedupe_files=dedupe_files,
        max_pixels=max_pixels,
        group_near_duplicates=group_near_duplicates,
    )
    if manifest.exists() and not force:
        changes = check_reusable(manifest, root, settings)
        if not changes.changed:
            if changes.unknown:
                _say(
                    f"{manifest} records no listing of {root} (audited before listings were "
                    "kept): reused without looking for changed files; --force re-audits it"
                )
            return AuditRun(manifest, read_report(manifest), report_paths(manifest), reused=True)
        _say(f"{root} changed since its audit ({changes}): re-auditing into {manifest}")
    result = audit_tree(
        root, ratios, seed, dedupe_files, max_pixels, group_near_duplicates=group_near_duplicates
    )
    report = audit_report(result)
    paths = write_report(report, manifest)
    if result.problems:
        more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
        raise UserInputError(f"{root}: {result.problems[0]}{more}; see {paths[1]}")
    listing = encode_listing(result.listing)
    write_manifest(
        result.rows, result.labels, manifest, root=str(root), settings=settings, listing=listing
    )
    return AuditRun(manifest, report, paths, reused=False)


def _say(text: str) -> None:
    print(f"[carclf] {text}", file=sys.stderr, flush=True)


def write_audit(root: str | Path, manifest: str | Path, **options: Any) -> Path:
    """:func:`run_audit` with the same keyword options, returning only the manifest path."""
    return run_audit(root, manifest, **options).manifest


# --- the audit ------------------------------------------------------------------------------


def audit_tree(
    root: str | Path,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    dedupe_files: bool = False,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    group_near_duplicates: bool = True,
) -> AuditResult:
    """Scan and check every file under ``root``; unusable data sets come back with ``problems``.

    Args:
        root: A pre-split (``train|val|test/<class>/…``) or flat (``<class>/…``) image tree.
        ratios: Train/val/test fractions for a flat root.
        seed: Seed of a flat root's split.
        dedupe_files: Keep one copy of identical files (:func:`carclf.data.duplicates.dedupe`).
        max_pixels: Images with more pixels are excluded as decompression bombs.
        workers: Threads that read and decode files (default: the CPU count, at most 8).
        group_near_duplicates: In a flat root, keep each cluster of confirmed near-duplicates of
            a class (:mod:`carclf.data.duplicates`) in one split, as identical files always are.
    """
    root = Path(root).resolve()
    layout = scan_tree(root)
    if not layout.classes or not any(layout.classes.values()):
        raise UserInputError(f"{root}: no class folders found")
    if not layout.presplit and abs(sum(ratios) - 1.0) > 1e-6:
        raise UserInputError(f"--ratios must add up to 1, got {ratios}")
    listing = tree_listing(root, layout)  # before any file is read: a later change shows next time
    rows, excluded = check_files(layout.files, max_pixels, workers)
    result = AuditResult(
        rows=rows,
        labels=[],
        excluded=[*layout.excluded, *excluded],
        ignored=layout.ignored,
        listing=listing,
    )
    pairs = near_duplicate_pairs(rows)  # once, for the split and the report
    clusters = None
    if not layout.presplit:
        result.problems += class_problems(layout, result)
        problems, clusters = stratified_split(
            result.rows, root, ratios, seed, group_near_duplicates, pairs
        )
        result.problems += problems
        result.rows = [r for r in result.rows if r["split"]]  # classes too small to split
    result.duplicates = find_duplicates(result.rows)
    if dedupe_files:
        result.rows, result.deduplicated = dedupe(result.rows)
    if layout.presplit:  # after --dedupe, which can empty a class in val or test
        result.problems += class_problems(layout, result)
    result.near_duplicates = near_duplicates(result.rows, pairs)
    result.near_label_conflicts = near_label_conflicts(result.rows, pairs)
    if clusters is not None and group_near_duplicates:
        result.clusters = kept_clusters(clusters, result.rows)
    result.labels = sorted({c for classes in layout.classes.values() for c in classes})
    index = {name: i for i, name in enumerate(result.labels)}
    for row in result.rows:
        row["label_index"] = index[row["label"]]
    return result


def class_problems(layout: Layout, result: AuditResult) -> list[str]:
    """Everything that makes the data set unusable, one line each, naming the class and split.

    For a flat root this runs before the split (every row's split is still ``""``).
    """
    problems = []
    if layout.presplit and "train" not in layout.classes:
        problems.append("split 'train' is missing (a pre-split root needs train/)")
    all_classes = sorted({c for classes in layout.classes.values() for c in classes})
    if len(all_classes) < 2:
        problems.append(f"found {len(all_classes)} class folder(s); at least 2 are needed")
    usable = Counter((r["split"], r["label"]) for r in result.rows)
    for split, classes in layout.classes.items():
        where = f"split {split!r}" if split else "the root"
        for label in all_classes:
            if label not in classes:
                problems.append(f"class {label!r} is missing from {where}")
            elif not usable[(split, label)]:
                detail = _excluded_summary(result.excluded, split, label)
                problems.append(f"class {label!r} has no usable image in {where} ({detail})")
    return problems


def _excluded_summary(excluded: list[Excluded], split: str, label: str) -> str:
    kinds = Counter(e.kind for e in excluded if e.split == split and e.label == label)
    if not kinds:
        return "no files"
    return f"{sum(kinds.values())} file(s) excluded: " + ", ".join(
        f"{n} {k}" for k, n in sorted(kinds.items())
    )
