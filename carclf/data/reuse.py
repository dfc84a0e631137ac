"""Manifest reuse: the settings an audit records in its manifest, and whether an earlier one fits.

An audit whose manifest already exists reuses it instead of reading the tree again (unless
``force``), whichever command asks: ``carclf data audit``, or any that audits ``data.root`` on the
fly. A manifest built from another tree, or with settings that would change its rows, is refused
with the way to rebuild it, so an earlier audit is never silently used for a different one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carclf.data.manifest import read_manifest
from carclf.errors import UserInputError

_REBUILD = "(`carclf data audit … --force` rebuilds it)"


def audit_settings(
    flat: bool,
    *,
    ratios: tuple[float, float, float],
    seed: int,
    dedupe_files: bool,
    max_pixels: int,
    group_near_duplicates: bool,
) -> dict[str, Any]:
    """The settings that decide a manifest's rows, as the manifest records them.

    Args:
        flat: Whether the root is flat: only a flat root's split depends on the ratios, the seed
            and the grouping of near-duplicates, so only then are they recorded.
        ratios: Train/val/test fractions of a flat root.
        seed: Seed of a flat root's split.
        dedupe_files: Whether one copy of identical files is kept.
        max_pixels: The pixel limit above which images are excluded.
        group_near_duplicates: Whether a flat root keeps near-duplicates within one split.
    """
    settings: dict[str, Any] = {"dedupe": dedupe_files, "max_pixels": max_pixels}
    if flat:
        settings |= {
            "ratios": list(ratios),
            "seed": seed,
            "group_near_duplicates": group_near_duplicates,
        }
    return settings


def check_reusable(manifest: Path, root: Path, settings: dict[str, Any]) -> None:
    """Refuse to reuse a manifest that was built from another tree or with other settings.

    A setting the manifest does not record (one written before the setting existed) counts as
    the same.

    Raises:
        UserInputError: the manifest is unreadable, or names another root or another setting.
    """
    try:
        existing = read_manifest(manifest)
    except UserInputError as exc:
        raise UserInputError(f"{exc} {_REBUILD}") from None
    if existing.root and existing.root != str(root):
        raise UserInputError(f"{manifest}: was built from {existing.root}, not {root} {_REBUILD}")
    for key, value in settings.items():
        old = existing.settings.get(key, value)
        if old != value:
            raise UserInputError(f"{manifest}: was built with {key}={old}, not {value} {_REBUILD}")
