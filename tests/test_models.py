import pytest
import torch

from carclf.config import ModelConfig
from carclf.errors import UserInputError
from carclf.models import ScratchCNN, cam_target_layer, check_model_name, create_model


@pytest.mark.parametrize("name", ["scratch_cnn", "scratch_cnn_bn", "resnet10t"])
def test_models_build_with_the_class_count(name: str) -> None:
    model = create_model(ModelConfig(name=name), num_classes=7)
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 7)
    layer = dict(model.named_modules())[cam_target_layer(model)]
    assert isinstance(layer, torch.nn.Module)


def test_scratch_cnn_is_configurable() -> None:
    cfg = ModelConfig(
        name="scratch_cnn_bn",
        drop_rate=0.3,
        kwargs={"filters": [4, 8, 16, 32], "kernel_size": 5, "dense_units": 0},
    )
    model = create_model(cfg, num_classes=3)
    assert isinstance(model, ScratchCNN)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32]
    assert convs[0].kernel_size == (5, 5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert dict(model.named_modules())[cam_target_layer(model)] is model.features[-1]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_scratch_cnns_cam_layer_is_its_last_blocks_output(batch_norm: bool) -> None:
    """Grad-CAM hooks what the head pools, rectified and at feature_info's reduction; the raw
    last conv (signed) put XGradCAM's heatmap beside the object."""
    model = ScratchCNN(num_classes=3, filters=(4, 8), dense_units=0, batch_norm=batch_norm)
    seen: list[torch.Tensor] = []
    layer = dict(model.named_modules())[cam_target_layer(model)]
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert len(seen) == 1 and torch.equal(seen[0], features) and features.min() >= 0
    info = model.feature_info[-1]
    side = 32 // info["reduction"]
    assert features.shape[1:] == (info["num_chs"], side, side)


def test_unknown_model_and_bad_kwargs_are_user_errors() -> None:
    with pytest.raises(UserInputError, match="unknown model 'resnet_9000'"):
        check_model_name("resnet_9000")
    with pytest.raises(UserInputError, match=r"model\.kwargs"):
        create_model(ModelConfig(name="scratch_cnn", kwargs={"wings": 2}), 3)
    with pytest.raises(UserInputError, match="no pretrained weights"):
        create_model(ModelConfig(name="scratch_cnn", pretrained=True), 3)


def test_local_pretrained_file_loads_the_backbone_and_resets_the_head(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=1000)  # as published: 1000 classes
    weights = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    cfg = ModelConfig(name="test_resnet", pretrained=True, pretrained_file=str(weights))
    model = create_model(cfg, num_classes=7)
    src, new = source.state_dict(), model.state_dict()
    backbone = [k for k in src if not k.startswith("fc.")]
    assert backbone and all(torch.equal(src[k], new[k]) for k in backbone)
    assert new["fc.weight"].shape == (7, src["fc.weight"].shape[1])  # a fresh 7-way head
    missing = ModelConfig(name="test_resnet", pretrained=True, pretrained_file="nope.safetensors")
    with pytest.raises(UserInputError, match="pretrained_file"):
        create_model(missing, 7)


def test_googlenet_comes_from_torchvision_with_a_local_weights_file(tmp_path) -> None:
    import torchvision

    torch.manual_seed(2)
    # As torchvision publishes it: 1000 classes and the two auxiliary heads.
    source = torchvision.models.GoogLeNet(aux_logits=True, init_weights=True)
    weights = tmp_path / "googlenet.pth"
    torch.save(source.state_dict(), weights)
    cfg = ModelConfig(name="tv_googlenet", pretrained=True, pretrained_file=str(weights))
    model = create_model(cfg, num_classes=7).eval()
    src, new = source.state_dict(), model.state_dict()
    backbone = [k for k in new if not k.startswith("fc.")]
    assert backbone and all(torch.equal(src[k], new[k]) for k in backbone)
    assert new["fc.weight"].shape == (7, 1024) and not any(k.startswith("aux") for k in new)
    assert model(torch.zeros(1, 3, 96, 96)).shape == (1, 7)
    assert cam_target_layer(model) == "inception5b"
    from carclf.recipes import parameter_groups

    groups = parameter_groups(model)  # stem, nine inception blocks, head: for layer decay
    assert len(groups) == 11 and all(n.startswith("fc.") for n in groups[-1])


def test_unreachable_hub_fails_at_once_and_a_cached_file_loads_offline(
    tmp_path, monkeypatch
) -> None:
    import time

    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    import carclf.models

    monkeypatch.setattr(carclf.models, "_hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = ModelConfig(name="resnet10t", pretrained=True)
    start = time.monotonic()
    with pytest.raises(UserInputError, match="pretrained_file"):
        create_model(cfg, 7)
    assert time.monotonic() - start < 5
    # The same weights in the hub cache's layout load without the network.
    hub_id = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    repo = tmp_path / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    source = timm.create_model("resnet10t", num_classes=1000)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    model = create_model(cfg, 7)
    assert torch.equal(model.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


@pytest.mark.parametrize("name", ["resnet10t", "efficientnet_b0", "tv_googlenet"])
def test_two_layer_mlp_head_is_the_head_that_freezing_keeps_trainable(name: str) -> None:
    from carclf.config import validate_config
    from carclf.recipes import head_parameter_names, trainable_names

    cfg = validate_config(
        {
            "output_dir": "unused",
            "data": {"manifest": "unused.parquet"},
            "model": {"name": name, "head_hidden": 32, "drop_rate": 0.3},
            "train": {"freeze_epochs": 1},
        }
    )
    model = create_model(cfg.model, num_classes=7).eval()
    head = model.get_classifier()
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears][1:] == [(32, 7)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in head.modules())
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    heads = head_parameter_names(model)
    assert len(heads) == 4 and trainable_names(model, cfg, epoch=0) == heads


def test_flip_tta_averages_the_image_and_its_mirror() -> None:
    from carclf.models import FlipTTA, with_tta

    class Left(torch.nn.Module):  # logits = mean of the left and right halves
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = x.shape[3] // 2
            return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], 1)

    x = torch.zeros(2, 3, 4, 4)
    x[0, :, :, :2] = 1.0  # image 0 bright on the left
    plain = Left()
    assert with_tta(plain, "none") is plain
    assert torch.allclose(plain(x)[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(FlipTTA(plain)(x), torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="tta"):
        with_tta(plain, "five-crop")


def test_drop_path_rate_reaches_timm_and_is_not_passed_to_carclf_models() -> None:
    model = create_model(ModelConfig(name="efficientnet_lite0", drop_path_rate=0.2), 3)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2, abs=0.02)
    create_model(ModelConfig(name="scratch_cnn"), 3)  # no drop_path_rate argument
