"""The Stanford Cars import on a tiny fake devkit written with scipy: labels, crops, margin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from carclf.cli import main
from carclf.data.manifest import read_manifest
from carclf.data.stanford import crop_box, import_stanford_cars, label_of, make_of
from carclf.data.transforms import load_image
from carclf.errors import UserInputError

from .test_audit import tree_state

NAMES = [
    "AM General Hummer SUV 2000",
    "BMW M3 Coupe 2012",
    "BMW X5 SUV 2007",
    "Ram C/V Cargo Van Minivan 2012",
]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]
SIZE = (120, 90)
PER_CLASS = {"train": 4, "test": 2}


def _draw(seed: int, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> Image.Image:
    """Grey noise with the 1-based inclusive ``box`` filled with ``colour``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 140, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1 - 1 : y2, x1 - 1 : x2] = colour
    return Image.fromarray(pixels)


def _box(seed: int) -> tuple[int, int, int, int]:
    rng = np.random.default_rng(1000 + seed)
    x1, y1 = int(rng.integers(1, 40)), int(rng.integers(1, 30))
    return x1, y1, x1 + int(rng.integers(30, 70)), y1 + int(rng.integers(25, 55))


def _mat_annotations(rows: list[tuple], path: Path, with_class: bool = True) -> None:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", *(["class"] if with_class else [])]
    arr = np.zeros((1, len(rows)), dtype=[(f, object) for f in [*fields, "fname"]])
    for i, (fname, box, cls) in enumerate(rows):
        values = [np.uint16(v) for v in box] + ([np.uint8(cls)] if with_class else [])
        arr[0, i] = (*values, fname)
    savemat(path, {"annotations": arr})


def write_fake_devkit(root: Path, csv: bool = False) -> dict[str, list[tuple]]:
    """Images plus annotations laid out like the real download; returns the annotations."""
    annos: dict[str, list[tuple]] = {"train": [], "test": []}
    seed = 0
    for split, n in PER_CLASS.items():
        (root / f"cars_{split}").mkdir(parents=True)
        for cls, colour in enumerate(COLOURS, start=1):
            for _ in range(n):
                seed += 1
                fname, box = f"{seed:05d}.jpg", _box(seed)
                _draw(seed, box, colour).save(root / f"cars_{split}" / fname, quality=98)
                annos[split].append((fname, box, cls))
    devkit = root / "devkit"
    devkit.mkdir()
    if csv:
        (devkit / "names.csv").write_text("\n".join(NAMES) + "\n")
        for split, rows in annos.items():
            lines = [f"{f},{','.join(map(str, b))},{c}" for f, b, c in rows]
            header = ["fname,bbox_x1,bbox_y1,bbox_x2,bbox_y2,class"] if split == "train" else []
            (root / f"anno_{split}.csv").write_text("\n".join(header + lines) + "\n")
    else:
        savemat(devkit / "cars_meta.mat", {"class_names": np.array([NAMES], dtype=object)})
        _mat_annotations(annos["train"], devkit / "cars_train_annos.mat")
        _mat_annotations(annos["test"], devkit / "cars_test_annos.mat", with_class=False)
        # As in the real download, the test labels come as a separate file in the root.
        _mat_annotations(annos["test"], root / "cars_test_annos_withlabels.mat")
    return annos


@pytest.fixture(scope="module")
def devkit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple]]]:
    root = tmp_path_factory.mktemp("stanford")
    return root, write_fake_devkit(root)


def _rows_by_stem(manifest: Path) -> dict[str, dict]:
    return {Path(r["path"]).stem: r for r in read_manifest(manifest).table.to_pylist()}


def test_model_level_labels_splits_and_tight_crops(devkit, tmp_path: Path) -> None:
    root, annos = devkit
    before = tree_state(root)
    run = import_stanford_cars(root, tmp_path / "out")
    assert tree_state(root) == before  # the devkit is only read
    manifest = read_manifest(run.audit.manifest)
    assert manifest.labels == sorted(label_of(n, "model") for n in NAMES)
    assert "Ram C-V Cargo Van Minivan 2012" in manifest.labels  # "/" cannot be in a folder name
    assert run.audit.report["counts"] == {
        "train": {label: 3 for label in manifest.labels},
        "val": {label: 1 for label in manifest.labels},
        "test": {label: 2 for label in manifest.labels},
    }
    rows = _rows_by_stem(run.audit.manifest)
    for split, group in annos.items():
        for fname, (x1, y1, x2, y2), cls in group:
            row = rows[Path(fname).stem]
            assert row["label"] == label_of(NAMES[cls - 1], "model")
            assert (split == "test") == (row["split"] == "test")
            assert (row["width"], row["height"]) == (x2 - x1 + 1, y2 - y1 + 1)
            crop = np.asarray(load_image(row["path"]), dtype=float)
            # The crop is the filled box: its colour, not the grey noise around it.
            assert np.abs(crop.mean(axis=(0, 1)) - COLOURS[cls - 1]).max() < 12
    record = json.loads((tmp_path / "out" / "import.json").read_text())
    assert record == run.record
    assert record["written"] == {"train": 12, "val": 4, "test": 8} and record["skipped"] == []


def test_margin_widens_the_box_and_clips_at_the_border(devkit, tmp_path: Path) -> None:
    root, annos = devkit
    run = import_stanford_cars(root, tmp_path / "out", margin=0.25)
    rows = _rows_by_stem(run.audit.manifest)
    for fname, box, _ in annos["train"] + annos["test"]:
        x1, y1, x2, y2 = box
        w, h = x2 - x1 + 1, y2 - y1 + 1
        left, top = max(round(x1 - 1 - w / 4), 0), max(round(y1 - 1 - h / 4), 0)
        right, bottom = min(round(x2 + w / 4), SIZE[0]), min(round(y2 + h / 4), SIZE[1])
        row = rows[Path(fname).stem]
        assert (row["width"], row["height"]) == (right - left, bottom - top)
    assert crop_box((1, 1, 10, 10), (100, 100), 0.5) == (0, 0, 15, 15)  # clipped at 0
    assert crop_box((91, 91, 100, 100), (100, 100), 0.5) == (85, 85, 100, 100)
    assert crop_box((200, 200, 210, 210), (100, 100), 0.0) is None


def test_make_level_groups_models_by_make(devkit, tmp_path: Path) -> None:
    root, _ = devkit
    run = import_stanford_cars(root, tmp_path / "out", level="make")
    assert read_manifest(run.audit.manifest).labels == ["AM General", "BMW", "Ram"]
    counts = run.audit.report["counts"]
    assert counts["test"] == {"AM General": 2, "BMW": 4, "Ram": 2}
    assert counts["train"]["BMW"] + counts["val"]["BMW"] == 8
    assert make_of("Aston Martin V8 Vantage Coupe 2012") == "Aston Martin"
    assert make_of("Land Rover LR2 SUV 2012") == "Land Rover"
    assert make_of("Mercedes-Benz C-Class Sedan 2012") == "Mercedes-Benz"


def test_csv_devkit_gives_the_same_data_set(devkit, tmp_path: Path) -> None:
    mat = import_stanford_cars(devkit[0], tmp_path / "from_mat")
    root = tmp_path / "csv"
    write_fake_devkit(root, csv=True)
    csv = import_stanford_cars(root, tmp_path / "from_csv")
    assert csv.audit.report["counts"] == mat.audit.report["counts"]
    assert csv.audit.report["labels"] == mat.audit.report["labels"]
    a, b = _rows_by_stem(mat.audit.manifest), _rows_by_stem(csv.audit.manifest)
    assert {k: (r["split"], r["sha256"]) for k, r in a.items()} == {
        k: (r["split"], r["sha256"]) for k, r in b.items()
    }


def test_missing_and_broken_images_are_skipped_and_recorded(devkit, tmp_path: Path) -> None:
    root = tmp_path / "kit"
    shutil.copytree(devkit[0], root)
    (root / "cars_train" / "00001.jpg").unlink()
    (root / "cars_train" / "00002.jpg").write_bytes(b"broken")
    run = import_stanford_cars(root, tmp_path / "out")
    skipped = json.loads((tmp_path / "out" / "import.json").read_text())["skipped"]
    assert [(Path(s["image"]).name, s["reason"].split(":")[0]) for s in skipped] == [
        ("00001.jpg", "image file not found"),
        ("00002.jpg", "cannot read the image"),
    ]
    assert run.audit.report["images"] == 4 * 6 - 2


def test_bad_devkits_and_outputs_are_refused(devkit, tmp_path: Path, capsys) -> None:
    root = tmp_path / "kit"
    shutil.copytree(devkit[0], root)
    (root / "cars_test_annos_withlabels.mat").unlink()
    shutil.move(root / "devkit" / "cars_test_annos.mat", root / "cars_test_annos_withlabels.mat")
    with pytest.raises(UserInputError, match="annotations lack class"):
        import_stanford_cars(root, tmp_path / "out")
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(
        UserInputError, match=r"no cars_test_annos_withlabels\.mat or anno_test\.csv"
    ):
        import_stanford_cars(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(UserInputError, match="mine exists"):
        import_stanford_cars(devkit[0], mine)
    with pytest.raises(UserInputError, match="not a Stanford Cars import; not replacing it"):
        import_stanford_cars(devkit[0], mine, force=True)
    assert (
        main(["data", "stanford-cars", str(devkit[0]), "--out", str(mine), "--margin", "-1"]) == 2
    )
    assert "--margin must be >= 0" in capsys.readouterr().err


def test_cli_imports_and_force_replaces_an_earlier_import(devkit, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["data", "stanford-cars", str(devkit[0]), "--out", str(out), "--level", "make"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out / "manifest.parquet")
    assert "cropped train 13, val 3, test 8; skipped 0" in captured.err  # val: 1 per make
    assert main(args) == 2
    assert main([*args, "--level", "model", "--force"]) == 0
    assert len(read_manifest(out / "manifest.parquet").labels) == len(NAMES)
