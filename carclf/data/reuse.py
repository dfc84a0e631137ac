"""Manifest reuse: what an audit records in its manifest, and whether an earlier one still fits.

An audit records in its manifest the root, the settings that decide its rows
(:func:`audit_settings`) and the listing of the tree (:func:`tree_listing`: every file the scan
finds, kept or excluded, with its size and modification time, taken before any file is read). One
rule decides whether an earlier manifest fits: :func:`check_reusable` and :func:`tree_changes`.

- another root, or other settings: refused (``UserInputError``, exit 2) with the way to rebuild it,
  so an earlier audit is never silently used for a different one;
- the same root and settings, but files added, removed or modified since (another size or
  modification time): the tree changed. An audit that owns the manifest (``carclf data audit``
  without ``--force``, and every command that audits ``data.root`` on the fly) audits again and
  says so in one line; a manifest given as ``data.manifest`` is never rewritten behind the user's
  back: :func:`check_unchanged` refuses it, naming what changed and the command that rebuilds it;
- nothing changed: reused as it is, after a walk of the tree and one ``stat`` per file (no file
  is read or hashed).

Files the audit excluded (unreadable, corrupt, …) are part of the listing, so they do not make a
tree look changed. A manifest written before listings were recorded is accepted as it is, with a
note that changes to its tree cannot be seen (``--force`` re-audits it): auditing it again
unasked could move images between splits under runs already trained on it. A file rewritten with
the same size and modification time is not noticed; ``--force`` rebuilds in any case.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carclf.data.manifest import Manifest, read_manifest
from carclf.data.scan import Layout, scan_tree
from carclf.errors import UserInputError

_REBUILD = "(`carclf data audit … --force` rebuilds it)"
_NOT_A_FILE = (-1, -1)  # what the listing records for an entry it cannot stat


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


# --- the listing of a tree -----------------------------------------------------------------


def tree_listing(root: Path, layout: Layout | None = None) -> dict[str, tuple[int, int]]:
    """``relative path → (size, mtime_ns)`` of every file of the tree that the audit looks at.

    Args:
        root: The audited root.
        layout: :func:`carclf.data.scan.scan_tree` of ``root``, when already scanned.
    """
    root = Path(root).resolve()
    layout = scan_tree(root) if layout is None else layout
    listing = {}
    for cand in layout.files:
        try:
            stat = cand.path.stat()
            listing[cand.path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        except OSError:  # gone or unreadable: it is still part of what was audited
            listing[cand.path.relative_to(root).as_posix()] = _NOT_A_FILE
    for entry in layout.excluded:  # broken links, FIFOs: excluded, but part of the tree
        listing[Path(entry.path).relative_to(root).as_posix()] = _NOT_A_FILE
    return listing


def encode_listing(listing: dict[str, tuple[int, int]]) -> str:
    """The listing as the manifest stores it: sorted JSON, zlib-compressed, base64 (ASCII)."""
    rows = sorted([path, *facts] for path, facts in listing.items())
    packed = zlib.compress(json.dumps(rows, separators=(",", ":")).encode())
    return base64.b64encode(packed).decode("ascii")


def decode_listing(text: str) -> dict[str, tuple[int, int]]:
    """The inverse of :func:`encode_listing`; an unreadable listing is a broken manifest."""
    try:
        rows = json.loads(zlib.decompress(base64.b64decode(text)))
        return {path: (int(size), int(mtime)) for path, size, mtime in rows}
    except (binascii.Error, zlib.error, ValueError, TypeError) as exc:
        raise UserInputError(
            f"the manifest's file listing is unreadable ({exc}) {_REBUILD}"
        ) from None


@dataclass(frozen=True)
class TreeChanges:
    """What changed in a tree since its audit: relative paths added, removed and modified."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    unknown: bool = False  # the manifest records no listing (written before listings were)

    @property
    def changed(self) -> bool:
        """Whether any file was added, removed or modified."""
        return bool(self.added or self.removed or self.modified)

    def __str__(self) -> str:
        parts = (("added", self.added), ("removed", self.removed), ("modified", self.modified))
        return ", ".join(f"{len(paths)} {what}" for what, paths in parts if paths) or "unchanged"


def tree_changes(manifest: Manifest, root: Path) -> TreeChanges:
    """What changed under ``root`` since ``manifest`` was audited from it (the one rule)."""
    if not manifest.listing:
        return TreeChanges(unknown=True)
    old, new = decode_listing(manifest.listing), tree_listing(root)
    return TreeChanges(
        added=tuple(sorted(new.keys() - old.keys())),
        removed=tuple(sorted(old.keys() - new.keys())),
        modified=tuple(sorted(p for p in new.keys() & old.keys() if new[p] != old[p])),
    )


# --- the two uses --------------------------------------------------------------------------


def check_reusable(manifest: Path, root: Path, settings: dict[str, Any]) -> TreeChanges:
    """Refuse a manifest built from another tree or with other settings; else say what changed.

    A setting the manifest does not record (one written before the setting existed) counts as
    the same. The caller audits again when the result has ``changed``.

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
    return tree_changes(existing, Path(existing.root or root))


def rebuild_command(manifest: Manifest) -> str:
    """The ``carclf data audit`` command that rebuilds ``manifest`` with its recorded settings."""
    settings = manifest.settings
    words = ["carclf data audit", manifest.root, "--manifest", str(manifest.path)]
    if "ratios" in settings:
        words += [
            "--ratios",
            ",".join(map(str, settings["ratios"])),
            "--seed",
            str(settings["seed"]),
        ]
    if settings.get("dedupe"):
        words.append("--dedupe")
    if settings.get("group_near_duplicates") is False:
        words.append("--no-group-near-duplicates")
    return " ".join([*words, "--force"])


def check_unchanged(manifest: str | Path) -> None:
    """Refuse a manifest given as it is (``data.manifest``) whose tree changed since its audit.

    Such a manifest is the user's, so it is never rewritten here. One that records no root or no
    listing, or whose root is not on this machine, cannot be checked and is accepted.

    Raises:
        UserInputError: the tree changed; the message says how, and the command that rebuilds it.
    """
    existing = read_manifest(manifest)
    if not existing.root or not existing.listing or not Path(existing.root).is_dir():
        return
    changes = tree_changes(existing, Path(existing.root))
    if changes.changed:
        raise UserInputError(
            f"{manifest}: {existing.root} changed since its audit ({changes}); "
            f"`{rebuild_command(existing)}` rebuilds it"
        )
