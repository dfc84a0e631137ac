"""Models: every timm model by name, plus the from-scratch CNNs registered into timm's registry.

Registering ``scratch_cnn`` and ``scratch_cnn_bn`` with timm means one ``timm.create_model`` call
builds any model, and their preprocessing config travels with them like any timm model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import register_model
from torch import nn

from carclf.config import ModelConfig
from carclf.errors import UserInputError

SCRATCH_DATA_CFG: dict[str, Any] = {
    "input_size": (3, 128, 128),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "num_classes": 1000,
}
default_cfgs = {"scratch_cnn": dict(SCRATCH_DATA_CFG), "scratch_cnn_bn": dict(SCRATCH_DATA_CFG)}


class ScratchCNN(nn.Module):
    """Conv blocks (conv → [BN] → ReLU → max-pool), global pooling and a dense head.

    Args:
        num_classes: outputs of the classifier.
        filters: output channels of each conv block.
        kernel_size: side of every conv kernel.
        dense_units: width of the hidden dense layer (0 for none).
        drop_rate: dropout before the classifier.
        batch_norm: insert BatchNorm after every conv.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        filters: tuple[int, ...] = (32, 64, 128),
        kernel_size: int = 3,
        dense_units: int = 128,
        drop_rate: float = 0.0,
        batch_norm: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width in filters:
            layers.append(nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2))
            layers.append(nn.BatchNorm2d(width) if batch_norm else nn.Identity())
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        last_conv = len(layers) - 4
        self.feature_info = [
            {"num_chs": channels, "reduction": 2 ** len(filters), "module": f"features.{last_conv}"}
        ]
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = [nn.Linear(channels, dense_units), nn.ReLU(inplace=True)] if dense_units else []
        self.pre_logits = nn.Sequential(nn.Flatten(), *hidden, nn.Dropout(drop_rate))
        self.fc = nn.Linear(dense_units or channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pre_logits(self.pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def _scratch(batch_norm: bool, name: str, pretrained: bool, **kwargs: Any) -> ScratchCNN:
    if pretrained:
        raise UserInputError(f"model.pretrained: {name} has no pretrained weights; set it false")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = ScratchCNN(batch_norm=batch_norm, **kwargs)
    model.pretrained_cfg = dict(SCRATCH_DATA_CFG, architecture=name)
    return model


@register_model
def scratch_cnn(pretrained: bool = False, **kwargs: Any) -> ScratchCNN:
    """The from-scratch CNN of the seeds' ablation."""
    return _scratch(False, "scratch_cnn", pretrained, **kwargs)


@register_model
def scratch_cnn_bn(pretrained: bool = False, **kwargs: Any) -> ScratchCNN:
    """The from-scratch CNN with BatchNorm after every conv."""
    return _scratch(True, "scratch_cnn_bn", pretrained, **kwargs)


def check_model_name(name: str) -> None:
    """Refuse a name that is neither a timm model nor a carclf one, before any worker starts."""
    if not timm.is_model(name):
        raise UserInputError(
            f"model.name: unknown model {name!r} (a timm name such as 'resnet50', "
            "or 'scratch_cnn' / 'scratch_cnn_bn')"
        )


def create_model(cfg: ModelConfig, num_classes: int, pretrained: bool | None = None) -> nn.Module:
    """Build the model of ``cfg`` with a fresh ``num_classes``-way head.

    Args:
        cfg: the model section of the config.
        num_classes: size of the classifier head.
        pretrained: overrides ``cfg.pretrained`` (export rebuilds without loading weights).
    """
    check_model_name(cfg.name)
    pretrained = cfg.pretrained if pretrained is None else pretrained
    overlay = None
    if pretrained and cfg.pretrained_file:
        if not Path(cfg.pretrained_file).is_file():
            raise UserInputError(f"model.pretrained_file: not found: {cfg.pretrained_file}")
        overlay = {"file": str(Path(cfg.pretrained_file).resolve())}
    try:
        return timm.create_model(
            cfg.name,
            pretrained=pretrained,
            num_classes=num_classes,
            drop_rate=cfg.drop_rate,
            pretrained_cfg_overlay=overlay,
            **cfg.kwargs,
        )
    except TypeError as exc:
        raise UserInputError(f"model.kwargs: not accepted by {cfg.name}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if not pretrained or overlay:
            raise
        raise RuntimeError(
            f"could not download pretrained weights for {cfg.name} ({exc.__class__.__name__}); "
            "set model.pretrained_file to a local weights file, or model.pretrained=false"
        ) from exc


def preflight_pretrained(cfg: ModelConfig) -> None:
    """Fetch (or find cached) hub weights on the driver, so a failure comes before any worker.

    Workers on the same node then read the weights from the local cache.
    """
    if cfg.pretrained and not cfg.pretrained_file:
        create_model(cfg, num_classes=2)
    elif cfg.pretrained_file and not Path(cfg.pretrained_file).is_file():
        raise UserInputError(f"model.pretrained_file: not found: {cfg.pretrained_file}")


def cam_target_layer(model: nn.Module) -> str:
    """Name of the module Grad-CAM hooks: the last feature stage, else the last conv."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and "module" in info[-1]:
        return info[-1]["module"]
    if hasattr(info, "module_name"):
        return info.module_name(-1)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("no conv layer found for Grad-CAM; set the target layer explicitly")
    return convs[-1]
