"""Outputs on a pyarrow filesystem: URIs resolve, staged files go up, Ray Train writes there."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyarrow import fs as pafs

from carclf.errors import UserInputError
from carclf.pipeline import check_data, run_pipeline
from carclf.storage import open_storage
from tests.conftest import tiny_config


def test_a_plain_path_and_a_file_uri_are_local(tmp_path: Path) -> None:
    plain = open_storage(str(tmp_path / "x" / "train"))
    uri = open_storage(f"file://{tmp_path}/x/train/")
    assert plain.is_local and uri.is_local
    assert plain.path == uri.path == str(tmp_path / "x" / "train")
    assert uri.sibling("bundle").uri == f"file://{tmp_path}/x/bundle"
    assert uri.ray_storage() == {"storage_path": str(tmp_path / "x")}


def test_an_unknown_scheme_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="output_dir: cannot open 'nope://b/train'"):
        open_storage("nope://b/train")


def test_upload_copies_a_staged_tree(tmp_path: Path) -> None:
    remote = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    (tmp_path / "bucket").mkdir()
    staged = tmp_path / "stage" / "eval"
    (staged / "plots").mkdir(parents=True)
    (staged / "metrics.json").write_text("{}")
    (staged / "plots" / "cm.png").write_bytes(b"png")
    target = open_storage("runs/x/train", filesystem=remote).sibling("eval")
    assert not target.is_local and not target.exists()
    target.upload(staged)
    assert (tmp_path / "bucket" / "runs" / "x" / "eval" / "plots" / "cm.png").read_bytes() == b"png"
    assert target.exists("metrics.json")
    assert target.ray_storage()["storage_filesystem"] is remote


def test_a_missing_data_set_is_refused_before_ray(tmp_path: Path, toy_manifest: Path) -> None:
    cfg = tiny_config(tmp_path / "train", toy_manifest)
    missing = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"manifest": "no.parquet"})}
    )
    with pytest.raises(UserInputError, match=r"^data\.manifest: no such file: no\.parquet$"):
        check_data(missing)
    rooted = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"manifest": None, "root": str(tmp_path / "x")})}
    )
    with pytest.raises(UserInputError, match=r"^data\.root: no such directory: "):
        check_data(rooted)


@pytest.mark.integration
def test_job_outputs_on_a_remote_filesystem(
    ray_session, tmp_path: Path, toy_manifest: Path
) -> None:
    """Ray Train checkpoints straight to the filesystem; bundle and evaluation are copied up."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    remote = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())
    cfg = tiny_config(Path("runs/toy/train"), toy_manifest)
    result = run_pipeline(cfg, staging=tmp_path / "stage", filesystem=remote)
    assert result.bundle_uri == "runs/toy/bundle"
    runs = bucket / "runs" / "toy"
    assert list((runs / "train").glob("checkpoint_*/model.safetensors"))
    assert (runs / "train" / "run.json").is_file() and (runs / "train" / "epochs.csv").is_file()
    assert (runs / "bundle" / "bundle.json").is_file() and (
        runs / "eval" / "metrics.json"
    ).is_file()
    assert not list((tmp_path / "stage" / "train").glob("checkpoint_*"))  # not staged twice
