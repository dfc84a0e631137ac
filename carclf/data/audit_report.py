"""What an audit found, and its report: the JSON record, the Markdown page, the terminal lines.

:class:`AuditResult` holds the findings of :func:`carclf.data.audit.audit_tree`. Its report is
written beside the manifest (:func:`report_paths`): ``<manifest stem>.audit.json``, the
JSON-ready dict of :func:`audit_report` that evaluation reports read back (:func:`read_report`),
and ``<manifest stem>.audit.md``, a person's view of the same dict (:func:`report_markdown`).
:func:`summary_lines` is the few lines a command prints at a terminal. The dict's keys are the
contract between these, so they live together here.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from carclf.data.duplicates import NEAR_DUPLICATE_BITS, NEAR_DUPLICATE_DISTANCE
from carclf.data.manifest import SPLIT_NAMES
from carclf.data.scan import Excluded

REPORT_LIMIT = 200  # longest list of pairs written into a report


@dataclass
class AuditResult:
    """What an audit found: the usable rows, the label order and everything it left out."""

    rows: list[dict]
    labels: list[str]
    excluded: list[Excluded] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    deduplicated: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    # Confirmed near-duplicate pairs whose files have different labels: possible label errors.
    near_label_conflicts: list[dict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # ``{"split", "paths"}`` per near-duplicate cluster kept within one split; None where the audit
    # did not group them (a pre-split root, or grouping turned off).
    clusters: list[dict] | None = None
    # The tree's files at audit time (carclf.data.reuse.tree_listing), recorded in the manifest.
    listing: dict[str, tuple[int, int]] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (split, label), n in sorted(
            Counter((r["split"], r["label"]) for r in self.rows).items()
        ):
            out[split][label] = n
        return dict(out)


# --- the files beside the manifest ---------------------------------------------------------


def report_paths(manifest: Path) -> tuple[Path, Path]:
    """``<manifest stem>.audit.json`` and ``.audit.md`` beside the manifest."""
    stem = manifest.with_suffix("")
    return Path(f"{stem}.audit.json"), Path(f"{stem}.audit.md")


def read_report(manifest: Path) -> dict | None:
    """The audit report written beside ``manifest`` (its ``.audit.json``), when there is one."""
    path = report_paths(manifest)[0]
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(report: dict, manifest: Path) -> tuple[Path, Path]:
    """Write ``report`` beside ``manifest`` as JSON and as Markdown; returns both paths."""
    paths = report_paths(manifest)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(report_markdown(report))
    return paths


# --- the record ----------------------------------------------------------------------------


def _distribution(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return dict(zip(("min", "p5", "median", "p95", "max"), map(float, q), strict=True))


def audit_report(result: AuditResult) -> dict:
    """The audit as a JSON-ready dict: counts, imbalance, exclusions, duplicates, sizes."""
    counts = result.counts()
    train = [n for n in counts.get("train", {}).values() if n]
    sizes = np.array([[r["width"], r["height"]] for r in result.rows]).reshape(-1, 2)
    short = sizes.min(axis=1)
    edges = [0, 64, 128, 256, 512, 1024, np.inf]
    hist, _ = np.histogram(short, bins=edges)
    cross = [d for d in result.duplicates if len(d["splits"]) > 1]
    return {
        "labels": result.labels,
        "images": len(result.rows),
        "counts": counts,
        "imbalance_ratio": max(train) / min(train) if train else None,
        "problems": result.problems,
        "excluded": [asdict(e) for e in sorted(result.excluded, key=lambda e: e.path)],
        "excluded_by_kind": dict(sorted(Counter(e.kind for e in result.excluded).items())),
        "ignored": result.ignored,
        "duplicates": result.duplicates,
        "cross_split_duplicates": cross,
        "label_conflicts": [d for d in result.duplicates if len(d["labels"]) > 1],
        "deduplicated": result.deduplicated,
        "near_duplicates": {
            "max_bits": NEAR_DUPLICATE_BITS,
            "max_distance": NEAR_DUPLICATE_DISTANCE,
            "pairs": len(result.near_duplicates),
            "listed": result.near_duplicates[:REPORT_LIMIT],
        },
        "near_duplicate_label_conflicts": {
            "pairs": len(result.near_label_conflicts),
            "listed": result.near_label_conflicts[:REPORT_LIMIT],
        },
        "near_duplicate_clusters": None
        if result.clusters is None
        else {
            "clusters": len(result.clusters),
            "images": sum(len(c["paths"]) for c in result.clusters),
            "listed": result.clusters[:REPORT_LIMIT],
        },
        "formats": dict(sorted(Counter(r["format"] for r in result.rows).items())),
        "image_size": None
        if not len(sizes)
        else {
            "width": _distribution(sizes[:, 0]),
            "height": _distribution(sizes[:, 1]),
            "short_side_histogram": {
                f"{int(lo)}-{'' if np.isinf(hi) else int(hi) - 1}": int(n)
                for lo, hi, n in zip(edges[:-1], edges[1:], hist, strict=True)
            },
        },
    }


# --- a person's view -----------------------------------------------------------------------


def _paths(paths: Iterable[str]) -> str:
    return ", ".join(f"`{p}`" for p in paths)


def _counts_markdown(report: dict) -> list[str]:
    """The table of images per class and split, and the train imbalance ratio."""
    splits = [s for s in SPLIT_NAMES if s in report["counts"]]
    lines = ["", "| class | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for label in report["labels"]:
        cells = [str(report["counts"][s].get(label, 0)) for s in splits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["imbalance_ratio"] is not None:
        lines += [
            "",
            f"Imbalance ratio (largest / smallest class in train): {report['imbalance_ratio']:.2f}",
        ]
    return lines


def _duplicates_markdown(report: dict) -> list[str]:
    """Identical files across and within splits, label conflicts and what --dedupe left out."""
    cross = report["cross_split_duplicates"]
    lines = ["", f"## Identical files across splits: leakage ({len(cross)} groups)", ""]
    lines += [f"- {', '.join(d['splits'])}: {_paths(d['paths'])}" for d in cross] or ["None."]
    within = [d for d in report["duplicates"] if len(d["splits"]) == 1]
    lines += ["", f"## Identical files within a split ({len(within)} groups)", ""]
    lines += [f"- {d['splits'][0]}: {_paths(d['paths'])}" for d in within] or ["None."]
    if report["label_conflicts"]:
        lines += ["", "## Identical files with different labels", ""]
        lines += [
            f"- {', '.join(d['labels'])}: {_paths(d['paths'])}" for d in report["label_conflicts"]
        ]
    if report["deduplicated"]:
        lines += ["", f"## Left out by --dedupe ({len(report['deduplicated'])})", ""]
        lines += [f"- `{d['path']}` (copy of `{d['kept']}`)" for d in report["deduplicated"]]
    return lines + _near_markdown(report) + _clusters_markdown(report)


def _near_markdown(report: dict) -> list[str]:
    """Near-duplicates across splits, and those with different labels (possible label errors)."""
    near = report["near_duplicates"]
    rule = f"dHash ≤ {near['max_bits']} bits"
    if "max_distance" in near:  # a report written before the confirmation has no distance
        rule += f", confirmed at distance ≤ {near['max_distance']}"
    lines = ["", f"## Near-duplicates across splits ({near['pairs']} pairs, {rule})", ""]
    lines += [f"- {_near_pair(p)}: {_paths(p['paths'])}" for p in near["listed"]] or ["None."]
    conflicts = report.get("near_duplicate_label_conflicts")
    if conflicts and conflicts["pairs"]:
        lines += [
            "",
            f"## Near-duplicates with different labels: possible label errors "
            f"({conflicts['pairs']} pairs)",
            "",
        ]
        lines += [
            f"- {' vs '.join(p['labels'])} ({_near_pair(p)}): {_paths(p['paths'])}"
            for p in conflicts["listed"]
        ]
    return lines


def _near_pair(pair: dict) -> str:
    distance = f", distance {pair['distance']}" if "distance" in pair else ""
    return f"{pair['bits']} bits{distance}"


def _clusters_markdown(report: dict) -> list[str]:
    """The near-duplicate clusters a flat root's split kept together; none if it did not group."""
    kept = report.get("near_duplicate_clusters")  # a report written before grouping has none
    if kept is None:
        return []
    lines = [
        "",
        f"## Near-duplicate clusters kept within one split ({kept['clusters']} clusters, "
        f"{kept['images']} images)",
        "",
    ]
    return lines + ([f"- {c['split']}: {_paths(c['paths'])}" for c in kept["listed"]] or ["None."])


def _sizes_markdown(report: dict) -> list[str]:
    """Width and height percentiles, the short-side histogram and the formats; none if no rows."""
    size = report["image_size"]
    if not size:
        return []
    lines = ["", "## Image sizes", "", "| | min | p5 | median | p95 | max |", "|---" * 6 + "|"]
    for axis in ("width", "height"):
        lines.append(f"| {axis} | " + " | ".join(f"{v:g}" for v in size[axis].values()) + " |")
    lines += [
        "",
        "Short side: " + ", ".join(f"{k}: {n}" for k, n in size["short_side_histogram"].items()),
    ]
    lines += ["", "Formats: " + ", ".join(f"{k} {n}" for k, n in report["formats"].items())]
    return lines


def report_markdown(report: dict) -> str:
    """A person's view of :func:`audit_report`."""
    lines = [
        "# Data audit",
        "",
        f"{report['images']} usable images, {len(report['labels'])} classes.",
    ]
    if report["problems"]:
        lines += ["", "## Refused: the data set cannot be used as it is", ""]
        lines += [f"- {p}" for p in report["problems"]]
    lines += _counts_markdown(report)
    lines += ["", f"## Excluded files ({len(report['excluded'])})", ""]
    lines += [f"- `{e['path']}` ({e['kind']}): {e['reason']}" for e in report["excluded"]] or [
        "None."
    ]
    lines += _duplicates_markdown(report)
    if report["ignored"]:
        lines += ["", "## Ignored (outside the expected layout)", ""]
        lines += [f"- `{p}`" for p in report["ignored"]]
    lines += _sizes_markdown(report)
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    """A few lines for a person at a terminal: sizes, exclusions, warnings."""
    per_split = ", ".join(
        f"{s} {sum(report['counts'][s].values())}" for s in SPLIT_NAMES if s in report["counts"]
    )
    lines = [f"{report['images']} images in {len(report['labels'])} classes ({per_split})"]
    if report["imbalance_ratio"]:
        lines[0] += f", imbalance {report['imbalance_ratio']:.2f}"
    if report["excluded"]:
        kinds = ", ".join(f"{n} {k}" for k, n in report["excluded_by_kind"].items())
        lines.append(f"excluded {len(report['excluded'])} file(s): {kinds}")
    if report["cross_split_duplicates"] and not report["deduplicated"]:
        n = len(report["cross_split_duplicates"])
        lines.append(f"warning: {n} group(s) of identical files across splits (--dedupe)")
    if report["deduplicated"]:
        lines.append(f"--dedupe left out {len(report['deduplicated'])} identical copies")
    kept = report.get("near_duplicate_clusters")  # a report written before grouping has none
    if kept and kept["clusters"]:
        lines.append(
            f"kept {kept['clusters']} near-duplicate cluster(s) ({kept['images']} images) "
            "within one split"
        )
    if report["near_duplicates"]["pairs"]:
        n = report["near_duplicates"]["pairs"]
        lines.append(f"warning: {n} near-duplicate pair(s) across splits")
    conflicts = report.get("near_duplicate_label_conflicts")
    if conflicts and conflicts["pairs"]:
        lines.append(
            f"warning: {conflicts['pairs']} near-duplicate pair(s) with different labels "
            "(possible label errors, listed in the report)"
        )
    return lines
