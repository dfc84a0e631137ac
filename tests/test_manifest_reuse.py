"""Reusing a manifest notices when its tree changed: photos added, removed or rewritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from carclf.cli import main
from carclf.data.audit import run_audit
from carclf.data.manifest import LISTING_KEY, read_manifest
from carclf.data.reuse import check_unchanged
from carclf.errors import UserInputError


def _photo(seed: int) -> Image.Image:
    """Random 9x8 colour blocks scaled up: distinct per seed."""
    cells = np.random.default_rng(seed).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((72, 64), Image.Resampling.NEAREST)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A flat tree of three classes of six photos, plus two files the audit excludes."""
    root = tmp_path / "photos"
    for c, label in enumerate(("cab", "limo", "taxi")):
        (root / label).mkdir(parents=True)
        for i in range(6):
            _photo(100 * c + i).save(root / label / f"{i}.png")
    (root / "cab" / "empty.jpg").write_bytes(b"")
    (root / "limo" / "notes.jpg").write_text("not a photo")
    return root


def _rel(manifest: Path, root: Path) -> set[str]:
    paths = read_manifest(manifest).table["path"].to_pylist()
    return {Path(p).relative_to(root.resolve()).as_posix() for p in paths}


def _add(root: Path) -> str:
    _photo(999).save(root / "cab" / "new.png")
    return "1 added"


def _remove(root: Path) -> str:
    (root / "limo" / "2.png").unlink()
    return "1 removed"


def _modify(root: Path) -> str:
    path = root / "taxi" / "3.png"
    before = path.stat().st_size
    _photo(12345).resize((80, 70)).save(path)  # other bytes, and another size
    assert path.stat().st_size != before
    return "1 modified"


def _several(root: Path) -> str:
    _add(root)
    _photo(998).save(root / "taxi" / "new.png")
    _remove(root)
    return "2 added, 1 removed"


def test_an_unchanged_tree_is_reused_without_a_re_audit(tree: Path, tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.parquet"
    assert run_audit(tree, manifest).reused is False
    assert len(_rel(manifest, tree)) == 18  # the two bad files are excluded, not listed as rows
    capsys.readouterr()
    stamp = manifest.stat().st_mtime_ns
    for _ in range(2):
        assert run_audit(tree, manifest).reused is True
    assert manifest.stat().st_mtime_ns == stamp
    assert "[carclf]" not in capsys.readouterr().err  # excluded files do not look like changes
    check_unchanged(manifest)


@pytest.mark.parametrize("change", [_add, _remove, _modify, _several])
def test_a_changed_tree_is_audited_again_and_says_what_changed(
    tree: Path, tmp_path: Path, capsys, change
) -> None:
    manifest = tmp_path / "m.parquet"
    run_audit(tree, manifest)
    before = {r["path"]: r["sha256"] for r in read_manifest(manifest).table.to_pylist()}
    what = change(tree)
    capsys.readouterr()
    run = run_audit(tree, manifest)
    assert run.reused is False
    err = capsys.readouterr().err
    assert f"[carclf] {tree.resolve()} changed since its audit ({what}): re-auditing" in err
    after = {r["path"]: r["sha256"] for r in read_manifest(manifest).table.to_pylist()}
    on_disk = {p.relative_to(tree).as_posix() for p in tree.rglob("*.png")}
    assert _rel(manifest, tree) == on_disk
    if change is _modify:
        path = str((tree / "taxi" / "3.png").resolve())
        assert after[path] != before[path]
    assert run_audit(tree, manifest).reused is True  # the new listing is the one recorded
    assert "[carclf]" not in capsys.readouterr().err


def test_the_cli_audits_a_changed_tree_again(tree: Path, tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.parquet"
    args = ["data", "audit", str(tree), "--manifest", str(manifest)]
    assert main(args) == 0
    _add(tree)
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "changed since its audit (1 added): re-auditing" in err and "reusing" not in err
    assert out.strip().splitlines()[-1] == str(manifest)
    assert "cab/new.png" in _rel(manifest, tree)
    assert json.loads((tmp_path / "m.audit.json").read_text())["images"] == 19
    assert main(args) == 0
    assert "reusing the existing" in capsys.readouterr().err


def test_other_settings_are_refused_before_the_tree_is_looked_at(tree: Path, tmp_path) -> None:
    manifest = tmp_path / "m.parquet"
    run_audit(tree, manifest)
    _add(tree)
    with pytest.raises(UserInputError, match="seed=42, not 7"):
        run_audit(tree, manifest, seed=7)


def _strip_listing(manifest: Path) -> None:
    """Rewrite ``manifest`` as an audit before listings were recorded wrote it."""
    table = pq.read_table(manifest)
    meta = {k: v for k, v in table.schema.metadata.items() if k != LISTING_KEY}
    pq.write_table(table.replace_schema_metadata(meta), manifest)


def test_a_manifest_without_a_listing_is_reused_with_a_note(tree: Path, tmp_path, capsys) -> None:
    manifest = tmp_path / "m.parquet"
    run_audit(tree, manifest)
    _strip_listing(manifest)
    _add(tree)
    capsys.readouterr()
    assert run_audit(tree, manifest).reused is True
    assert "records no listing" in capsys.readouterr().err
    check_unchanged(manifest)  # nothing to compare: accepted
    assert run_audit(tree, manifest, force=True).reused is False
    assert read_manifest(manifest).listing


def test_a_given_manifest_of_a_changed_tree_is_refused_not_rewritten(
    tree: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.parquet"
    run_audit(tree, manifest, ratios=(0.5, 0.25, 0.25), seed=3)
    _remove(tree)
    stamp = manifest.stat().st_mtime_ns
    with pytest.raises(UserInputError) as caught:
        check_unchanged(manifest)
    message = str(caught.value)
    assert f"{manifest}: {tree.resolve()} changed since its audit (1 removed)" in message
    rebuild = f"carclf data audit {tree.resolve()} --manifest {manifest} --ratios 0.5,0.25,0.25"
    assert f"`{rebuild} --seed 3 --force` rebuilds it" in message
    assert manifest.stat().st_mtime_ns == stamp
    os.rename(tree, tmp_path / "elsewhere")  # its tree is not on this machine: nothing to check
    check_unchanged(manifest)


def test_every_command_refuses_a_given_manifest_of_a_changed_tree(
    tree: Path, tmp_path: Path
) -> None:
    from carclf.config import validate_config
    from carclf.runs import resolve_manifest

    manifest = tmp_path / "m.parquet"
    run_audit(tree, manifest)
    raw = {"output_dir": str(tmp_path / "run"), "data": {"manifest": str(manifest)}}
    assert resolve_manifest(validate_config(raw)) == manifest.resolve()
    added = _add(tree)
    with pytest.raises(UserInputError, match=f"changed since its audit \\({added}\\)"):
        resolve_manifest(validate_config(raw))
