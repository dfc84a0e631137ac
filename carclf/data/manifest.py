"""The Parquet manifest: one row per usable image, a fixed schema, the label map in the metadata.

The manifest is the only description of a data set that training, evaluation and export read, and
the label order stored in it (``labels``) is the label order of every model trained on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from carclf.errors import UserInputError

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("label_index", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
    ]
)
LABELS_KEY = b"carclf.labels"
ROOT_KEY = b"carclf.root"
# How the manifest was made (audit settings), so a reuse can tell whether it still fits the request.
SETTINGS_KEY = b"carclf.audit"
# The files of the tree at audit time (carclf.data.reuse.encode_listing), to notice later changes.
LISTING_KEY = b"carclf.listing"
# The splits of a manifest, in the order the audit assigns and reports them.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the table, the label order and where it was read from."""

    table: pa.Table
    labels: list[str]
    path: Path | None = None
    root: str = ""
    settings: dict = dc_field(default_factory=dict)
    listing: str = ""  # encoded; empty for a manifest written without one

    def split(self, name: str) -> list[tuple[str, int]]:
        """``(path, label_index)`` of every image in split ``name``, in manifest order."""
        rows = self.table.filter(pa.compute.equal(self.table["split"], name))
        return list(zip(rows["path"].to_pylist(), rows["label_index"].to_pylist(), strict=True))

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.table["split"].to_pylist()))

    def limit_per_class(self, split: str, n: int, seed: int) -> Manifest:
        """A copy with at most ``n`` rows of each class in ``split``, the other splits whole.

        The rows kept are a seeded choice, the same on every worker and every rerun.
        """
        rng = random.Random(seed)
        by_class: dict[int, list[int]] = {}
        splits = self.table["split"].to_pylist()
        labels = self.table["label_index"].to_pylist()
        for i, (name, label) in enumerate(zip(splits, labels, strict=True)):
            if name == split:
                by_class.setdefault(label, []).append(i)
        keep = [name != split for name in splits]
        for rows in by_class.values():
            for i in rng.sample(rows, min(n, len(rows))):
                keep[i] = True
        return replace(self, table=self.table.filter(pa.array(keep)))


def write_manifest(
    rows: list[dict],
    labels: list[str],
    path: str | Path,
    root: str = "",
    settings: dict | None = None,
    listing: str = "",
) -> Path:
    """Write ``rows`` (dicts with the schema's columns) atomically to ``path``.

    Args:
        rows: One dict per image; keys beyond the schema's columns are ignored.
        labels: The label order; ``label_index`` indexes into it.
        path: Where the Parquet file goes.
        root: The image tree the rows were read from.
        settings: How the rows were made (audit settings), kept in the metadata.
        listing: The tree's files at audit time, encoded (:mod:`carclf.data.reuse`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    metadata = {
        LABELS_KEY: json.dumps(labels).encode(),
        ROOT_KEY: root.encode(),
        SETTINGS_KEY: json.dumps(settings or {}).encode(),
    }
    if listing:
        metadata[LISTING_KEY] = listing.encode("ascii")
    table = table.replace_schema_metadata(metadata)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".parquet.tmp")
    os.close(fd)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def validate_table(table: pa.Table, source: str) -> list[str]:
    """Check the schema column by column and return the label map; the error names the column."""
    for field in SCHEMA:
        if field.name not in table.column_names:
            raise UserInputError(f"{source}: manifest column {field.name!r} is missing")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise UserInputError(
                f"{source}: manifest column {field.name!r} is {actual}, expected {field.type}"
            )
        if table[field.name].null_count:
            raise UserInputError(f"{source}: manifest column {field.name!r} has null values")
    meta = table.schema.metadata or {}
    if LABELS_KEY not in meta:
        raise UserInputError(f"{source}: manifest has no label map ({LABELS_KEY.decode()})")
    labels = json.loads(meta[LABELS_KEY])
    indices = table["label_index"].to_pylist()
    if indices and (min(indices) < 0 or max(indices) >= len(labels)):
        raise UserInputError(f"{source}: manifest column 'label_index' is outside the label map")
    return labels


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"manifest not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"{path}: not a Parquet manifest ({exc})") from None
    labels = validate_table(table, str(path))
    meta = table.schema.metadata or {}
    return Manifest(
        table=table,
        labels=labels,
        path=path,
        root=meta.get(ROOT_KEY, b"").decode(),
        settings=json.loads(meta.get(SETTINGS_KEY, b"{}")),
        listing=meta.get(LISTING_KEY, b"").decode("ascii", errors="replace"),
    )


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
