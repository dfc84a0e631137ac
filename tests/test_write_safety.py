"""carclf replaces a whole directory only if it wrote it (issue #30, item 7): ``--out`` of
``carclf export`` and the demo's fresh start never delete a user's directory. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from carclf import cli
from carclf.bundle import (
    BUNDLE_FILE,
    MODEL_CARD_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    BundleInfo,
    check_replaceable,
    load_bundle,
    write_bundle,
)
from carclf.errors import UserInputError
from carclf.pipeline import demo_config
from tests.conftest import stand_in_bundle_info, tiny_config


def _info(name: str = "toy") -> BundleInfo:
    return stand_in_bundle_info(name)


def _writers(extra=None) -> dict:
    def stand_in(path: Path) -> None:
        path.write_bytes(f"{path.name} bytes".encode())
        if extra is not None:
            extra()

    return {name: stand_in for name in (ONNX_FILE, WEIGHTS_FILE, MODEL_CARD_FILE)}


def _users_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    return path


def test_export_to_a_users_directory_is_exit_2_and_leaves_it_untouched(
    fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _users_dir(tmp_path / "mine")
    assert cli.main(["export", str(fake_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "not a carclf bundle" in err
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]
    assert (out / "thesis.txt").read_text() == "years of work"


def test_export_onto_its_own_run_directory_is_refused(fake_run: Path) -> None:
    before = sorted(p.name for p in fake_run.iterdir())
    assert cli.main(["export", str(fake_run), "--out", str(fake_run)]) == 2
    assert sorted(p.name for p in fake_run.iterdir()) == before


@pytest.mark.parametrize("out", [".", "./", "sub/.."])
def test_out_dot_is_refused_and_the_working_directory_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    cwd = _users_dir(tmp_path / "checkout")
    (cwd / "sub").mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(UserInputError, match="not a carclf bundle"):
        write_bundle(out, _info(), _writers())
    assert (cwd / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout"]  # no temp dir left


def test_a_file_given_as_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("keep")
    with pytest.raises(UserInputError, match="not a carclf bundle"):
        write_bundle(out, _info(), _writers())
    assert out.read_text() == "keep"


def test_an_earlier_bundle_is_replaced_and_an_empty_directory_filled(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    write_bundle(out, _info("first"), _writers())
    (out / "stale.txt").write_text("from the first bundle")
    write_bundle(out, _info("second"), _writers())
    assert load_bundle(out).info.name == "second"
    assert not (out / "stale.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_bundle(write_bundle(empty, _info(), _writers()).path).info.name == "toy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "empty"]


def test_a_users_directory_beside_the_bundle_named_like_the_old_one_survives(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bundle"
    write_bundle(out, _info(), _writers())
    mine = _users_dir(tmp_path / ".bundle.old")
    write_bundle(out, _info("again"), _writers())
    assert (mine / "thesis.txt").read_text() == "years of work"


def test_a_bundle_json_that_is_not_a_bundle_does_not_make_a_bundle(tmp_path: Path) -> None:
    out = _users_dir(tmp_path / "project")
    (out / BUNDLE_FILE).write_text('{"name": "my npm-like project"}')
    with pytest.raises(UserInputError, match="not a carclf bundle"):
        check_replaceable(out)
    assert (out / "thesis.txt").exists()


def test_a_directory_that_changes_while_the_bundle_is_written_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # empty when the export starts: accepted

    def user_saves_a_file() -> None:
        (out / "thesis.txt").write_text("years of work")

    with pytest.raises(UserInputError, match="not a carclf bundle"):
        write_bundle(out, _info(), _writers(extra=user_saves_a_file))
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_demo_refuses_to_start_afresh_over_a_users_directory(
    tmp_path: Path, toy_manifest: Path
) -> None:
    run_dir = _users_dir(tmp_path / "exp" / "train")
    with pytest.raises(UserInputError, match="not an earlier carclf output"):
        demo_config(tiny_config(run_dir, toy_manifest))
    assert (run_dir / "thesis.txt").read_text() == "years of work"
    assert not (tmp_path / "exp" / "data").exists()  # refused before anything was written


def test_the_demo_refuses_a_users_bundle_place(tmp_path: Path, toy_manifest: Path) -> None:
    cfg = tiny_config(tmp_path / "exp" / "train", toy_manifest)
    mine = _users_dir(tmp_path / "exp" / "bundle")
    with pytest.raises(UserInputError, match="not an earlier carclf output"):
        demo_config(cfg)
    assert (mine / "thesis.txt").exists()
