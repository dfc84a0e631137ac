"""The data audit as a new user meets it: a messy tree with every bad kind, refusals, leakage."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from carclf.cli import main
from carclf.data.audit import audit_tree, run_audit, summary_lines, write_audit
from carclf.data.audit_report import audit_report, report_markdown
from carclf.data.dataset import ManifestDataset
from carclf.data.duplicates import near_duplicates
from carclf.data.manifest import read_manifest, write_manifest
from carclf.data.splits import assign_splits
from carclf.data.transforms import eval_transform, load_image, preprocess_for
from carclf.errors import UserInputError
from carclf.models import create_model
from carclf.recipes import build_optimizer, build_step_tools
from carclf.train import train_one_epoch

from .conftest import tiny_config

# --- building a messy tree ----------------------------------------------------------------------


def _blocks(seed: int, size: tuple[int, int] = (90, 80)) -> Image.Image:
    """Random 9x8 colour blocks scaled up: distinct per seed, and robust to re-encoding."""
    cells = np.random.default_rng(seed).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.NEAREST)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png() -> bytes:
    """A valid PNG header claiming 20000x20000 pixels, with next to no data behind it."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + (_png_chunk(b"IEND", b""))
    )


def _corrupt_png() -> bytes:
    """A PNG whose header is fine and whose pixel data is garbage from the middle on."""
    noise = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = bytearray(_encode(Image.fromarray(noise), "PNG", compress_level=0))
    mid = len(data) // 2
    data[mid : mid + 400] = bytes(range(200)) * 2
    return bytes(data)


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("photo.jpg", b"not really")
    return buf.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    return _encode(_blocks(50, (60, 30)), "JPEG", exif=exif.tobytes())


# Every kind of file the audit must exclude, and the kind it must record.
BAD = {
    "empty.jpg": (b"", "empty"),
    "notes.jpg": (b"just some notes, not a photo\n", "not-image"),
    "paper.jpg": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not-image"),
    "archive.jpg": (_zip_bytes(), "not-image"),
    "truncated.jpg": (_encode(_blocks(60), "JPEG")[:1500], "truncated"),
    "corrupt.png": (_corrupt_png(), "corrupt"),
    "bomb.png": (_bomb_png(), "bomb"),
    "portable.ppm": (_encode(_blocks(61), "PPM"), "format"),
}
# Every kind the audit must keep (and load converts), as encoded bytes.
ODD_GOOD = {
    "gray.jpg": _encode(_blocks(70).convert("L"), "JPEG"),
    "palette.png": _encode(_blocks(71).convert("P"), "PNG"),
    "rgba.png": _encode(_blocks(72).convert("RGBA"), "PNG"),
    "cmyk.jpg": _encode(_blocks(73).convert("CMYK"), "JPEG"),
    "sixteen.png": _encode(
        Image.fromarray(np.asarray(_blocks(74).convert("L"), np.uint16) * 257), "PNG"
    ),
    "rotated.jpg": _exif_rotated(),
    "png_named.jpg": _encode(_blocks(75), "PNG"),
}
CLASSES = ("alpha", "beta", "gamma")
PER_SPLIT = {"train": 4, "val": 2, "test": 2}


def build_messy_tree(root: Path) -> dict[str, set[str]]:
    """A pre-split tree with every bad and odd kind, hidden clutter and duplicates.

    Returns:
        ``{"good": relative paths that must be in the manifest, "bad": …, "hidden": …}``.
    """
    good, hidden = set(), set()
    seed = 0
    for split, n in PER_SPLIT.items():
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                seed += 1
                (folder / f"{label}{i}.jpg").write_bytes(_encode(_blocks(seed), "JPEG"))
                good.add(f"{split}/{label}/{label}{i}.jpg")
    odd = root / "train" / "alpha"
    for name, data in ODD_GOOD.items():
        (odd / name).write_bytes(data)
        good.add(f"train/alpha/{name}")
    bad_dir = root / "train" / "beta"
    for name, (data, _) in BAD.items():
        (bad_dir / name).write_bytes(data)
    (bad_dir / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    # Leakage: a train image copied into val and test, and a copy within train.
    src = root / "train" / "gamma" / "gamma0.jpg"
    for rel in ("val/gamma/copy_of_gamma0.jpg", "test/gamma/copy_of_gamma0.jpg"):
        shutil.copyfile(src, root / rel)
        good.add(rel)
    shutil.copyfile(src, root / "train/gamma/gamma0_again.jpg")
    good.add("train/gamma/gamma0_again.jpg")
    # A near-duplicate: the same pixels as a train image, re-encoded as PNG into test.
    (root / "test/beta/beta_png.png").write_bytes(
        _encode(Image.open(root / "train/beta/beta1.jpg"), "PNG")
    )
    good.add("test/beta/beta_png.png")
    # Hidden clutter, with bad bytes so that reading it would show up as an exclusion.
    for rel in (
        ".DS_Store",
        "train/.DS_Store",
        "train/alpha/.DS_Store",
        "train/alpha/.ipynb_checkpoints/alpha0-checkpoint.jpg",
        "train/.ipynb_checkpoints/alpha/x.jpg",
        "val/.hidden_class/x.jpg",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x00junk")
        hidden.add(rel)
    return {
        "good": good,
        "bad": {f"train/beta/{n}" for n in [*BAD, "dangling.jpg"]},
        "hidden": hidden,
    }


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): sha256 and mode of files, targets of links."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest() + oct(
                    path.stat().st_mode
                )
            else:
                state[rel] = "dir" + oct(path.stat().st_mode)
    return state


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    root = tmp_path_factory.mktemp("messy") / "cars"
    return root, build_messy_tree(root)


@pytest.fixture(scope="module")
def audited(messy, tmp_path_factory: pytest.TempPathFactory):
    root = messy[0]
    before = tree_state(root)
    run = run_audit(root, tmp_path_factory.mktemp("out") / "manifest.parquet")
    return run, before


def _rel(paths, root: Path) -> set[str]:
    return {Path(p).relative_to(root.resolve()).as_posix() for p in paths}


# --- the messy tree -----------------------------------------------------------------------------


def test_every_bad_file_is_named_with_its_reason(messy, audited) -> None:
    _, expected = messy
    run, _ = audited
    excluded = {Path(e["path"]).name: e for e in run.report["excluded"]}
    assert set(excluded) == {Path(p).name for p in expected["bad"]}
    for name, (_, kind) in BAD.items():
        assert excluded[name]["kind"] == kind, excluded[name]
        assert excluded[name]["split"] == "train" and excluded[name]["label"] == "beta"
    assert excluded["dangling.jpg"]["kind"] == "unreadable"
    assert "PDF" in excluded["paper.jpg"]["reason"]
    assert "zip" in excluded["archive.jpg"]["reason"]
    assert "text" in excluded["notes.jpg"]["reason"]
    markdown = run.report_paths[1].read_text()
    assert all(e["path"] in markdown and e["reason"] in markdown for e in excluded.values())


def test_corrupt_png_fails_only_at_full_decode(messy) -> None:
    root, _ = messy
    with Image.open(root / "train/beta/corrupt.png") as img:  # the header parses fine
        assert img.size == (64, 64)
        with pytest.raises(Exception):  # noqa: B017 - any decoder error will do
            img.load()


def test_every_good_file_is_in_the_manifest_and_loads(messy, audited) -> None:
    root, expected = messy
    run, _ = audited
    manifest = read_manifest(run.manifest)
    paths = manifest.table["path"].to_pylist()
    assert _rel(paths, root) == expected["good"]
    for path in paths:
        img = load_image(path)
        assert img.mode == "RGB" and min(img.size) > 0
    rows = {Path(p).name: r for p, r in zip(paths, manifest.table.to_pylist(), strict=True)}
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (30, 60)  # upright
    assert rows["png_named.jpg"]["format"] == "PNG" and rows["cmyk.jpg"]["format"] == "JPEG"
    assert manifest.labels == list(CLASSES)
    assert manifest.root == str(root.resolve())


def test_hidden_files_and_folders_are_ignored(messy, audited) -> None:
    root, expected = messy
    run, _ = audited
    seen = [e["path"] for e in run.report["excluded"]] + run.report["ignored"]
    seen += read_manifest(run.manifest).table["path"].to_pylist()
    for rel in _rel(seen, root):
        assert not any(part.startswith(".") for part in rel.split("/")), rel
    assert run.report["ignored"] == [] and expected["hidden"]


def test_the_tree_is_byte_for_byte_unchanged(messy, audited) -> None:
    root, _ = messy
    _, before = audited
    assert tree_state(root) == before


def test_duplicates_are_reported_and_cross_split_ones_warned(messy, audited) -> None:
    root, _ = messy
    run, _ = audited
    cross = run.report["cross_split_duplicates"]
    assert len(cross) == 1
    assert _rel(cross[0]["paths"], root) == {
        "train/gamma/gamma0.jpg",
        "train/gamma/gamma0_again.jpg",
        "val/gamma/copy_of_gamma0.jpg",
        "test/gamma/copy_of_gamma0.jpg",
    }
    assert cross[0]["splits"] == ["train", "val", "test"]
    near = run.report["near_duplicates"]["listed"]
    assert [_rel(p["paths"], root) for p in near] == [
        {"train/beta/beta1.jpg", "test/beta/beta_png.png"}
    ]
    assert "## Identical files across splits: leakage (1 groups)" in run.report_paths[1].read_text()


def test_dedupe_keeps_one_copy_in_train_and_leaves_the_tree_alone(messy, audited, tmp_path) -> None:
    root, _ = messy
    _, before = audited
    run = run_audit(root, tmp_path / "deduped.parquet", dedupe_files=True)
    paths = _rel(read_manifest(run.manifest).table["path"].to_pylist(), root)
    assert "train/gamma/gamma0.jpg" in paths
    dropped = {"train/gamma/gamma0_again.jpg", "val/gamma/copy_of_gamma0.jpg"}
    dropped.add("test/gamma/copy_of_gamma0.jpg")
    assert not paths & dropped
    assert _rel([d["path"] for d in run.report["deduplicated"]], root) == dropped
    assert {d["kept"] for d in run.report["deduplicated"]} == {
        str(root.resolve() / "train/gamma/gamma0.jpg")
    }
    assert tree_state(root) == before


def test_training_runs_on_the_audited_manifest(audited, tmp_path: Path) -> None:
    run, _ = audited
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, run.manifest)
    manifest = read_manifest(run.manifest)
    model = create_model(cfg.model, len(manifest.labels))
    data = ManifestDataset(manifest.split("train"), eval_transform(preprocess_for(model, 32)))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    optimizer = build_optimizer(model, cfg)
    tools = build_step_tools(
        model, optimizer, cfg, len(manifest.labels), len(loader), torch.device("cpu")
    )
    stats = train_one_epoch(model, loader, optimizer, tools)
    assert np.isfinite(stats["train_loss"]) and stats["images_per_s"] > 0


def test_pixel_limit_is_a_setting(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            _blocks(i + (10 if label == "b" else 0)).save(root / label / f"{i}.png")
    _blocks(99, (200, 200)).save(root / "a" / "big.png")
    result = audit_tree(root, max_pixels=100 * 100)
    assert [(Path(e.path).name, e.kind) for e in result.excluded] == [("big.png", "bomb")]


def test_unreadable_file_is_excluded(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "flat"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            _blocks(i + (10 if label == "b" else 0)).save(root / label / f"{i}.png")
    locked = root / "a" / "locked.png"
    _blocks(50).save(locked)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads files whatever their mode: make the read fail instead
        read_bytes = Path.read_bytes

        def refuse(path: Path) -> bytes:
            if path.name == "locked.png":
                raise PermissionError(13, "Permission denied", str(path))
            return read_bytes(path)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    result = audit_tree(root)
    assert [(Path(e.path).name, e.kind, e.reason) for e in result.excluded] == [
        ("locked.png", "unreadable", "unreadable: Permission denied")
    ]
    assert len(result.rows) == 6  # the rest still loads


# --- refusals -----------------------------------------------------------------------------------


def _copy(messy, tmp_path: Path) -> Path:
    root = tmp_path / "cars"
    shutil.copytree(messy[0], root, symlinks=True)
    return root


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: shutil.rmtree(r / "val" / "gamma"), "class 'gamma' is missing from split 'val'"),
        (
            lambda r: [(r / s / "delta").mkdir() for s in PER_SPLIT],
            "class 'delta' has no usable image in split 'train' (no files)",
        ),
        (
            lambda r: [shutil.rmtree(r / s / c) for s in PER_SPLIT for c in ("beta", "gamma")],
            "found 1 class folder(s); at least 2 are needed",
        ),
        (lambda r: shutil.rmtree(r / "train"), "split 'train' is missing"),
    ],
    ids=["missing-from-val", "empty-class", "one-class", "no-train"],
)
def test_refusals_name_class_and_split(messy, tmp_path: Path, capsys, change, message) -> None:
    root = _copy(messy, tmp_path)
    change(root)
    manifest = tmp_path / "m.parquet"
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_audit(root, manifest)
    assert main(["data", "audit", str(root), "--manifest", str(manifest)]) == 2
    assert message in capsys.readouterr().err
    assert not manifest.exists()


def test_a_class_with_only_bad_files_and_one_missing_from_val_are_both_reported(
    messy, tmp_path: Path
) -> None:
    root = _copy(messy, tmp_path)
    shutil.rmtree(root / "val" / "gamma")
    for split in PER_SPLIT:
        (root / split / "delta").mkdir()
        (root / split / "delta" / "empty.jpg").write_bytes(b"")
    before = tree_state(root)
    with pytest.raises(UserInputError, match=r"\(and \d+ more\); see .*m\.audit\.md"):
        run_audit(root, tmp_path / "m.parquet")
    problems = json.loads((tmp_path / "m.audit.json").read_text())["problems"]
    assert "class 'gamma' is missing from split 'val'" in problems
    assert "class 'delta' has no usable image in split 'val' (1 file(s) excluded: 1 empty)" in (
        problems
    )
    assert tree_state(root) == before


# --- the CLI and the reuse of a manifest --------------------------------------------------------


def test_cli_audit_reuses_and_never_silently_overwrites(messy, tmp_path: Path, capsys) -> None:
    root, _ = messy
    manifest = tmp_path / "m.parquet"
    assert main(["data", "audit", str(root), "--manifest", str(manifest)]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == str(manifest)
    assert "excluded 9 file(s)" in err and "across splits (--dedupe)" in err
    stamp = manifest.stat().st_mtime_ns
    assert main(["data", "audit", str(root), "--manifest", str(manifest)]) == 0
    assert "reusing the existing" in capsys.readouterr().err
    assert manifest.stat().st_mtime_ns == stamp
    # Other settings, or another tree, on the same manifest: refused, not overwritten.
    assert main(["data", "audit", str(root), "--manifest", str(manifest), "--dedupe"]) == 2
    assert (
        "dedupe=False, not True (`carclf data audit … --force` rebuilds it)"
        in capsys.readouterr().err
    )
    assert main(["data", "audit", str(tmp_path), "--manifest", str(manifest)]) == 2
    assert "was built from" in capsys.readouterr().err
    assert manifest.stat().st_mtime_ns == stamp
    args = ["data", "audit", str(root), "--manifest", str(manifest), "--dedupe", "--force"]
    assert main(args) == 0
    assert "left out 3 identical copies" in capsys.readouterr().err
    assert read_manifest(manifest).settings["dedupe"] is True


def test_a_broken_manifest_is_not_reused(messy, tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    manifest.write_text("not parquet")
    with pytest.raises(UserInputError, match=r"not a Parquet manifest.*--force` rebuilds it"):
        write_audit(messy[0], manifest)
    assert write_audit(messy[0], manifest, force=True) == manifest


# --- flat roots: a stratified, deterministic split ---------------------------------------------


def _flat_tree(root: Path, per_class: int = 10) -> None:
    for c, label in enumerate(("cab", "limo", "taxi")):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            _blocks(100 * c + i).save(root / label / f"{label}_{i:02d}.jpg")
    shutil.copyfile(root / "cab" / "cab_00.jpg", root / "cab" / "cab_dup.jpg")


def _splits(result, root: Path) -> dict[str, str]:
    return {Path(r["path"]).relative_to(root.resolve()).as_posix(): r["split"] for r in result.rows}


def test_flat_root_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "a" / "flat"
    _flat_tree(root)
    first = _splits(audit_tree(root, (0.6, 0.2, 0.2), seed=3), root)
    assert first == _splits(audit_tree(root, (0.6, 0.2, 0.2), seed=3), root)
    moved = tmp_path / "b" / "elsewhere"
    shutil.copytree(root, moved)
    assert _splits(audit_tree(moved, (0.6, 0.2, 0.2), seed=3, workers=1), moved) == first
    assert _splits(audit_tree(root, (0.6, 0.2, 0.2), seed=4), root) != first
    for label, n_unique in (("cab", 10), ("limo", 10), ("taxi", 10)):
        splits = [s for p, s in first.items() if p.startswith(label)]
        counts = {s: splits.count(s) for s in ("train", "val", "test")}
        assert counts["val"] == counts["test"] == round(0.2 * n_unique)
    assert first["cab/cab_00.jpg"] == first["cab/cab_dup.jpg"]  # identical files stay together


def test_flat_root_refuses_a_class_too_small_to_split(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _flat_tree(root)
    (root / "solo").mkdir()
    _blocks(999).save(root / "solo" / "only.jpg")
    with pytest.raises(UserInputError, match="class 'solo' has 1 distinct usable image"):
        run_audit(root, tmp_path / "m.parquet")
    with pytest.raises(UserInputError, match="--ratios must add up to 1"):
        audit_tree(root, (0.5, 0.2, 0.2))


def test_cli_flat_root_with_ratios_and_seed(tmp_path: Path, capsys) -> None:
    root = tmp_path / "flat"
    _flat_tree(root)
    manifest = tmp_path / "m.parquet"
    args = ["data", "audit", str(root), "--manifest", str(manifest)]
    assert main([*args, "--ratios", "0.5,0.25,0.25", "--seed", "7"]) == 0
    assert read_manifest(manifest).settings == {
        "dedupe": False,
        "max_pixels": 64_000_000,
        "ratios": [0.5, 0.25, 0.25],
        "seed": 7,
        "group_near_duplicates": True,
    }
    assert main([*args, "--ratios", "0.5,0.25,0.25", "--seed", "8"]) == 2
    assert "seed=7, not 8" in capsys.readouterr().err


# --- flat roots: near-duplicate clusters stay within one split --------------------------------

RATIOS = (0.6, 0.2, 0.2)
# Clusters of near-duplicates per class: (seed of the photo, shots of it).
CLUSTERS = {"cab": ((7000, 6), (7001, 4), (7002, 3)), "limo": ((7003, 2),)}


def _shot(seed: int, k: int) -> Image.Image:
    """Shot ``k`` of one photo: a little brighter each time and one pixel changed (k > 0)."""
    arr = np.clip(np.asarray(_blocks(seed), dtype=np.int16) + 3 * k, 0, 255).astype(np.uint8)
    if k:
        arr[k, 7 * k] = (255, 0, 0)
    return Image.fromarray(arr)


def _cluster_tree(root: Path, singles: int = 12) -> dict[str, set[str]]:
    """A flat tree of distinct photos plus :data:`CLUSTERS`; one shot also has an identical copy.

    Returns:
        The relative paths of each cluster, by ``"<class>/<seed>"``.
    """
    clusters = {}
    for c, label in enumerate(("cab", "limo", "taxi")):
        (root / label).mkdir(parents=True)
        for i in range(singles):
            _blocks(1000 * c + i).save(root / label / f"{label}_{i:02d}.png")
        for seed, shots in CLUSTERS.get(label, ()):
            names = {f"{label}/{seed}_{k}.png" for k in range(shots)}
            for k in range(shots):
                _shot(seed, k).save(root / f"{label}/{seed}_{k}.png")
            clusters[f"{label}/{seed}"] = names
    shutil.copyfile(root / "cab/7000_1.png", root / "cab/7000_copy.png")
    clusters["cab/7000"].add("cab/7000_copy.png")
    return clusters


def _cluster_splits(splits: dict[str, str], clusters: dict[str, set[str]]) -> list[set[str]]:
    return [{splits[p] for p in paths} for paths in clusters.values()]


def test_near_duplicate_clusters_stay_within_one_split(tmp_path: Path) -> None:
    root = tmp_path / "ads"
    clusters = _cluster_tree(root)
    for seed in range(4):
        result = audit_tree(root, RATIOS, seed=seed)
        splits = _splits(result, root)
        assert all(len(s) == 1 for s in _cluster_splits(splits, clusters)), seed
        assert near_duplicates(result.rows) == [] and not result.problems
        for label in ("cab", "limo", "taxi"):  # ratios hold by images, clusters counted whole
            per_class = [s for p, s in splits.items() if p.startswith(label)]
            for split, ratio in zip(("train", "val", "test"), RATIOS, strict=True):
                assert abs(per_class.count(split) - ratio * len(per_class)) < 1, (seed, label)
    report = audit_report(result)
    assert report["near_duplicate_clusters"]["clusters"] == 4
    assert report["near_duplicate_clusters"]["images"] == 6 + 1 + 4 + 3 + 2
    assert "kept 4 near-duplicate cluster(s) (16 images) within one split" in summary_lines(report)
    text = report_markdown(report)
    assert "## Near-duplicate clusters kept within one split (4 clusters, 16 images)" in text


def test_without_grouping_near_duplicates_may_cross_splits(tmp_path: Path) -> None:
    root = tmp_path / "ads"
    clusters = _cluster_tree(root)
    crossed = 0
    for seed in range(4):
        result = audit_tree(root, RATIOS, seed=seed, group_near_duplicates=False)
        splits = _splits(result, root)
        assert splits["cab/7000_1.png"] == splits["cab/7000_copy.png"]  # identical: still together
        crossed += sum(len(s) > 1 for s in _cluster_splits(splits, clusters))
        report = audit_report(result)
        assert report["near_duplicate_clusters"] is None
        assert not any(line.startswith("kept") for line in summary_lines(report))
    assert crossed and near_duplicates(result.rows)  # the tree is one that leaks without grouping


def test_a_tree_without_duplicates_splits_as_before(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _flat_tree(root, per_class=13)
    (root / "cab" / "cab_dup.jpg").unlink()
    for seed in (0, 42):
        grouped = _splits(audit_tree(root, (0.7, 0.15, 0.15), seed=seed), root)
        assert grouped == _splits(
            audit_tree(root, (0.7, 0.15, 0.15), seed=seed, group_near_duplicates=False), root
        )
        for label in ("cab", "limo", "taxi"):  # the split of the code before grouping
            paths = sorted(p for p in grouped if p.startswith(f"{label}/"))
            expected = assign_splits(len(paths), (0.7, 0.15, 0.15), seed, label)
            assert [grouped[p] for p in paths] == expected


def test_cluster_split_is_deterministic_wherever_the_tree_lies(tmp_path: Path) -> None:
    _cluster_tree(tmp_path / "a" / "ads")
    shutil.copytree(tmp_path / "a" / "ads", tmp_path / "b" / "moved")
    first = _splits(audit_tree(tmp_path / "a" / "ads", RATIOS, seed=5), tmp_path / "a" / "ads")
    moved = tmp_path / "b" / "moved"
    assert _splits(audit_tree(moved, RATIOS, seed=5, workers=1), moved) == first


def test_grouping_is_a_setting_that_re_audits(tmp_path: Path, messy) -> None:
    root = tmp_path / "ads"
    _cluster_tree(root)
    manifest = tmp_path / "m.parquet"
    assert read_manifest(write_audit(root, manifest)).settings["group_near_duplicates"] is True
    with pytest.raises(UserInputError, match="group_near_duplicates=True, not False"):
        run_audit(root, manifest, group_near_duplicates=False)
    run = run_audit(root, manifest, group_near_duplicates=False, force=True)
    assert read_manifest(run.manifest).settings["group_near_duplicates"] is False
    presplit = run_audit(messy[0], tmp_path / "presplit.parquet")  # pre-split: nothing new
    assert "group_near_duplicates" not in read_manifest(presplit.manifest).settings
    assert presplit.report["near_duplicate_clusters"] is None
    assert any("near-duplicate pair" in line for line in summary_lines(presplit.report))


def test_a_class_that_is_one_cluster_is_too_small_to_split(tmp_path: Path) -> None:
    root = tmp_path / "ads"
    _cluster_tree(root)
    (root / "solo").mkdir()
    for k in range(3):
        _shot(8000, k).save(root / "solo" / f"{k}.png")
    result = audit_tree(root, RATIOS)
    assert result.problems == [
        "class 'solo' has 3 distinct usable image(s) in 1 near-duplicate group(s), "
        "too few to split with ratios 0.6,0.2,0.2; to split it file by file, turn the grouping "
        "off: `carclf data audit ROOT --manifest M --no-group-near-duplicates` "
        "(then data.manifest=M), or run_audit(..., group_near_duplicates=False)"
    ]
    assert not audit_tree(root, RATIOS, group_near_duplicates=False).problems


# --- manifest readers say which column is wrong ---------------------------------------------------


@pytest.fixture()
def good_rows() -> list[dict]:
    return [
        {
            "path": f"/x/{i}.jpg",
            "label": "ab"[i % 2],
            "label_index": i % 2,
            "split": "train",
            "sha256": "0" * 64,
            "width": 8,
            "height": 8,
            "bytes": 100,
            "format": "JPEG",
        }
        for i in range(4)
    ]


def _rewrite(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.drop_columns(["sha256"]), "column 'sha256' is missing"),
        (
            lambda t: t.set_column(5, "width", pa.array(["8"] * 4)),
            "column 'width' is string, expected int32",
        ),
        (
            lambda t: t.set_column(
                3, "split", pa.array([None, "train", "val", "test"], pa.string())
            ),
            "column 'split' has null values",
        ),
        (
            lambda t: t.set_column(2, "label_index", pa.array([0, 1, 2, 0], pa.int32())),
            "column 'label_index' is outside the label map",
        ),
        (lambda t: t.replace_schema_metadata({}), "has no label map"),
    ],
    ids=["missing", "wrong-type", "nulls", "index-range", "no-labels"],
)
def test_manifest_reader_names_the_wrong_column(good_rows, tmp_path: Path, edit, message) -> None:
    path = write_manifest(good_rows, ["a", "b"], tmp_path / "m.parquet", root="/x")
    table = pq.read_table(path)
    assert read_manifest(path).labels == ["a", "b"]
    _rewrite(path, edit(table))
    with pytest.raises(UserInputError, match=message):
        read_manifest(path)


# --- split folder names and near-duplicate search -------------------------------------------------


def test_split_folder_aliases_and_conflicts(tmp_path: Path) -> None:
    root = tmp_path / "kaggle"
    for s, split in enumerate(("Train", "Valid", "TEST")):
        for c, label in enumerate(("x", "y")):
            (root / split / label).mkdir(parents=True)
            _blocks(500 + 2 * s + c).save(root / split / label / "0.png")
    result = audit_tree(root)
    assert set(result.counts()) == {"train", "val", "test"} and not result.problems
    (root / "validation" / "x").mkdir(parents=True)
    with pytest.raises(UserInputError, match="Valid and validation are both the 'val' split"):
        audit_tree(root)
