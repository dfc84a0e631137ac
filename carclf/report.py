"""Documents a person reads: the self-contained HTML evaluation report and the bundle's model card.

The HTML report embeds every image as base64 and uses no script, font or stylesheet from the
network, so it opens anywhere, offline, as one file.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

from carclf.bundle import BundleInfo

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;border:1px solid #ddd;margin:.5em 0}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery figure{margin:0;width:160px;font-size:11px}
.gallery img{width:160px;image-rendering:pixelated}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
.note{color:#a33}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"data:image/png;base64,{data}"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_fmt(c)}</td>'
            if isinstance(c, int | float)
            else f"<td>{_fmt(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _metrics_section(metrics: dict) -> list[str]:
    parts = ["<h2>Summary</h2>", _table(["metric", "value"], list(metrics["summary"].items()))]
    notes = [f"{k}: undefined ({v})" for k, v in metrics["undefined"].items()]
    if metrics["absent_classes"]:
        notes.append(
            "classes absent from the split (recall 0 by convention, AUC undefined): "
            + ", ".join(metrics["absent_classes"])
        )
    if metrics["never_predicted"]:
        notes.append("classes never predicted: " + ", ".join(metrics["never_predicted"]))
    parts += [f'<p class="note">{escape(n)}</p>' for n in notes]
    pairs = [[p["true"], p["pred"], p["count"], p["rate"]] for p in metrics["most_confused"]]
    parts += ["<h2>Most confused pairs</h2>"]
    parts += [_table(["true", "predicted as", "images", "share of true class"], pairs)]
    if not pairs:
        parts.append("<p>No confusions.</p>")
    return parts


def _per_class_section(metrics: dict) -> list[str]:
    rows = [
        [
            name,
            r["precision"],
            r["recall"],
            r["f1-score"],
            int(r["support"]),
            r["predicted"],
            r["roc_auc"],
        ]
        for name, r in metrics["per_class"].items()
    ]
    header = ["class", "precision", "recall", "F1", "support", "predicted", "ROC-AUC"]
    return ["<h2>Per class</h2>", _table(header, rows)]


def _gallery_section(galleries: dict, base: Path) -> list[str]:
    parts = ["<h2>Grad-CAM galleries</h2>"]
    for group, gallery in galleries.items():
        items = gallery["items"]
        parts.append(f"<h3>{group}: {len(items)} shown of {gallery['total']}</h3>")
        figures = [
            f'<figure><img src="{_img(base / it["image"])}" alt="{escape(it["path"])}">'
            f"<figcaption>true {escape(it['true'])}<br>pred {escape(it['pred'])} "
            f"({it['score']:.2f})</figcaption></figure>"
            for it in items
        ]
        parts.append(f'<div class="gallery">{"".join(figures)}</div>')
    return parts


def _audit_section(audit: dict | None) -> list[str]:
    if audit is None:
        return ["<h2>Data audit</h2><p>No audit file beside the manifest.</p>"]
    splits = sorted(audit["counts"])
    rows = [
        [label] + [audit["counts"][s].get(label, 0) for s in splits] for label in audit["labels"]
    ]
    facts = [
        ["usable images", audit["images"]],
        ["classes", len(audit["labels"])],
        ["imbalance ratio (train)", audit["imbalance_ratio"]],
        ["excluded files", len(audit["excluded"])],
        ["duplicate groups", len(audit["duplicates"])],
        ["duplicates across splits", len(audit["cross_split_duplicates"])],
    ]
    return [
        "<h2>Data audit</h2>",
        _table(["fact", "value"], facts),
        _table(["class", *splits], rows),
    ]


def write_html_report(
    path: Path,
    title: str,
    metrics: dict,
    plots: dict[str, Path],
    galleries: dict,
    config: dict,
    audit: dict | None,
    facts: dict[str, str],
    calibration: dict | None = None,
) -> Path:
    """One self-contained HTML page: facts, metrics, plots, galleries, audit and configuration.

    Args:
        path: the file to write.
        title: the page's heading.
        metrics: the contents of ``metrics.json``.
        plots: figure title → PNG file.
        galleries: :func:`carclf.evaluate.write_galleries`'s result (images relative to ``path``).
        config: the run's configuration or the bundle's metadata.
        audit: the data audit (:func:`carclf.data.audit_report.read_report`), or None.
        facts: source, manifest, split and the like, shown first.
        calibration: ``{"temperature", "ece_before", "ece_after"}`` when fitted.
    """
    parts = [
        f"<h1>{escape(title)}</h1>",
        _table(["", ""], [*facts.items(), ["images", metrics["n"]]]),
    ]
    parts += _metrics_section(metrics)
    if calibration:
        parts += ["<h2>Calibration</h2>", _table(["", ""], list(calibration.items()))]
    for name, file in plots.items():
        parts.append(
            f'<h2>{escape(name)}</h2><img class="plot" src="{_img(file)}" alt="{escape(name)}">'
        )
    parts += _per_class_section(metrics)
    parts += _gallery_section(galleries, path.parent)
    parts += _audit_section(audit)
    parts += ["<h2>Configuration</h2>", f"<pre>{escape(json.dumps(config, indent=2))}</pre>"]
    html = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    path.write_text(html)
    return path


def _precision(quant: dict | None) -> str:
    """One line on the shipped model's precision and the INT8 decision behind it."""
    if not quant:
        return "fp32 (INT8 quantisation not tried)"
    figures = (
        f"int8 {quant['int8_images_per_s']:.1f} vs fp32 {quant['fp32_images_per_s']:.1f} img/s, "
        f"accuracy {quant['int8_acc']:.4f} vs {quant['fp32_acc']:.4f}"
    )
    kept = "int8" if quant["kept"] else "fp32 (int8 rejected)"
    return f"{kept}: {quant['reason']}; {figures}"


TTA_WORDS = {
    "none": "none",
    "flip": "flip (logits averaged over each image and its mirror, inside model.onnx)",
}


def model_card(info: BundleInfo) -> str:
    """The bundle's ``MODEL_CARD.md``: what the model is, its input, test figures and limits."""
    metrics = {k: v for k, v in info.metrics.items() if isinstance(v, int | float)}
    cal = info.metrics.get("calibration", {})
    calibration = (
        f"{cal['source']}; test ECE {cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after"
        if cal
        else "not fitted"
    )
    pre = info.preprocess
    lines = [
        f"# Model card: {info.name}",
        "",
        f"- task: `{info.task}`",
        f"- architecture: `{info.arch}`, {info.num_classes} classes",
        f"- input: {pre.input_size[1]}×{pre.input_size[2]} RGB, mean {list(pre.mean)}, "
        f"std {list(pre.std)}, {pre.interpolation} resize, crop_pct {pre.crop_pct}, "
        f"{pre.crop_mode} crop",
        f"- Grad-CAM layer: `{info.cam_target_layer}`",
        f"- softmax temperature: {info.temperature:.4f} ({calibration})",
        f"- model.onnx: {_precision(info.metrics.get('quantization'))}",
        f"- test-time augmentation: {TTA_WORDS.get(info.tta, info.tta)}",
        f"- training data manifest sha256: `{info.manifest_sha256}`",
        f"- carclf {info.carclf_version}",
        "",
        "## Classes",
        "",
        ", ".join(f"`{label}`" for label in info.labels),
        "",
        "## Test metrics (onnxruntime, this bundle's model.onnx)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items()],
        "",
        "## Intended use and limits",
        "",
        "Classifies a photo into one of the classes above; it has no 'other' class, so an image "
        "of none of them still gets one of these labels. Figures hold for data like the test "
        "split of the manifest above; check them on your own data with `carclf evaluate`.",
        "",
    ]
    return "\n".join(lines)
