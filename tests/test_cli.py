"""Bad input anywhere on the way gets exit code 2 and a one-line reason, before Ray starts."""

from pathlib import Path

import pytest
import yaml

from carclf.cli import main

from .conftest import tiny_config


def _config(tmp_path: Path, cfg_dict: dict) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    return str(path)


def _fails_with_2(argv: list[str], capsys: pytest.CaptureFixture, needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = {"output_dir": str(tmp_path / "run"), "data": {"root": str(tmp_path / "nowhere")}}
    _fails_with_2(["train", "--config", _config(tmp_path, cfg)], capsys, "data folder not found")
    _fails_with_2(
        ["data", "audit", str(tmp_path / "nowhere"), "--manifest", "m.parquet"],
        capsys,
        "data folder not found",
    )


def test_unknown_model_name(
    tmp_path: Path, toy_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tiny_config(tmp_path / "run", toy_manifest, model={"name": "resnet_9000"})
    path = _config(tmp_path, cfg.model_dump(mode="json"))
    _fails_with_2(["train", "--config", path], capsys, "unknown model 'resnet_9000'")


def test_unknown_config_key(
    tmp_path: Path, toy_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _config(tmp_path, tiny_config(tmp_path / "run", toy_manifest).model_dump(mode="json"))
    _fails_with_2(["train", "--config", path, "--set", "train.speed=9"], capsys, "train.speed")


def test_batch_larger_than_the_data(
    tmp_path: Path, toy_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tiny_config(tmp_path / "run", toy_manifest, train={"batch_size": 10_000})
    path = _config(tmp_path, cfg.model_dump(mode="json"))
    _fails_with_2(["train", "--config", path], capsys, "train.batch_size")


def test_missing_bundle_and_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fails_with_2(["predict", str(tmp_path), "x.jpg"], capsys, "not a bundle")


def test_synth_prints_the_path_last(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "toy"
    args = ["data", "synth", str(out), "--train", "1", "--val", "1", "--test", "1", "--size", "32"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert len(list(out.rglob("*.jpg"))) == 21


def test_predict_and_explain_without_serve(
    fake_run: Path, tmp_path: Path, toy_root: Path, capsys: pytest.CaptureFixture
) -> None:
    bundle = tmp_path / "bundle"
    assert main(["export", str(fake_run), "--out", str(bundle), "--name", "body"]) == 0
    image = str(next((toy_root / "test" / "van").glob("*.jpg")))
    assert main(["predict", str(bundle), image, "--top-k", "3"]) == 0
    assert '"top_k"' in capsys.readouterr().out
    assert main(["explain", str(bundle), image, "--out", str(tmp_path / "cams")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "cams")
    assert len(list((tmp_path / "cams").glob("*.overlay.png"))) == 1


def test_serve_flags_become_the_ingress_settings() -> None:
    from carclf.cli import build_parser
    from serve.launch import app_args

    hosts = ["--allowed-host", "cars.example.com", "--allowed-host", "*.lan"]
    args = build_parser().parse_args(["serve", "b1", *hosts, "--max-images", "8", "--api-key", "k"])
    settings = {"allowed_hosts": args.allowed_host, "max_images": args.max_images}
    app = app_args(args.bundles, args.api_key, **settings)
    assert app.ingress.allowed_hosts == ["cars.example.com", "*.lan"]
    assert (app.ingress.max_images, app.ingress.api_key) == (8, "k")
    defaults = app_args(["b1"], None, allowed_hosts=None, max_images=None).ingress
    assert (
        defaults.allowed_hosts == ["localhost", "127.0.0.1", "[::1]"] and defaults.max_images == 32
    )
