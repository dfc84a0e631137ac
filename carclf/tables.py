"""Tables: the one writer of carclf's CSV and Markdown tables (trials, comparisons).

Rows are plain dicts; a CSV takes the union of their keys in first-seen order (missing cells
empty), a Markdown table the first row's keys, each cell formatted by a ``cell`` function.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Cell = Callable[[str, Any], str]


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Rows with possibly different keys as one CSV (missing cells empty)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def number_cell(digits: int = 3, missing: str = "") -> Cell:
    """A cell format: floats to ``digits`` decimals, None as ``missing``, the rest as text."""

    def cell(_: str, value: Any) -> str:
        if value is None:
            return missing
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    return cell


def markdown_table(rows: Sequence[dict[str, Any]], cell: Cell | None = None) -> list[str]:
    """The lines of a Markdown table of ``rows`` (columns: the first row's keys)."""
    cell = cell or number_cell()
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(h, row.get(h)) for h in header) + " |" for row in rows]
