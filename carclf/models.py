"""Models: every timm model by name, plus carclf's own registered into timm's registry.

Registering ``scratch_cnn``, ``scratch_cnn_bn`` and ``tv_googlenet`` (torchvision's GoogLeNet,
which timm lacks) with timm means one ``timm.create_model`` call builds any model, and their
preprocessing config travels with them like any timm model's.
"""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request
from typing import Any, ClassVar

import huggingface_hub
import timm
import torch
import torchvision
from timm.models import register_model
from torch import nn

from carclf.config import ModelConfig
from carclf.data.transforms import Preprocess, preprocess_for
from carclf.errors import UserInputError
from carclf.weights import WeightsReport, load_backbone

SCRATCH_DATA_CFG: dict[str, Any] = {
    "input_size": (3, 128, 128),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "num_classes": 1000,
}
HUB_PROBE_TIMEOUT_S = 5.0
GOOGLENET_DATA_CFG: dict[str, Any] = {  # torchvision's GoogLeNet_Weights.IMAGENET1K_V1
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "num_classes": 1000,
}
default_cfgs = {
    "scratch_cnn": dict(SCRATCH_DATA_CFG),
    "scratch_cnn_bn": dict(SCRATCH_DATA_CFG),
    "tv_googlenet": dict(GOOGLENET_DATA_CFG),
}


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
        # The last block's output (after its ReLU and pooling), as timm's feature_info names a
        # stage: the map at this reduction that the head pools, and the one Grad-CAM hooks. The
        # raw conv before them is signed, and XGradCAM divides by each channel's sum: a sum
        # near zero flips and inflates that channel's weight, and the heatmap lands elsewhere.
        self.feature_info = [
            {
                "num_chs": channels,
                "reduction": 2 ** len(filters),
                "module": f"features.{len(layers) - 1}",
            }
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


class GoogLeNet(torchvision.models.GoogLeNet):
    """torchvision's GoogLeNet (Inception v1) with the parts of timm's model API carclf uses."""

    feature_info: ClassVar[list[dict]] = [
        {"num_chs": 1024, "reduction": 32, "module": "inception5b"}
    ]
    num_features = 1024

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)

    def group_matcher(self, coarse: bool = False) -> Any:
        """Stem first, then each inception block in order, head last (layer-wise decay)."""
        blocks = [n for n, _ in self.named_children() if n.startswith("inception")]

        def ordinal(param: str) -> float:
            top = param.split(".")[0]
            if top.startswith(("conv", "maxpool")):
                return 0.0
            return float(blocks.index(top) + 1) if top in blocks else float("inf")

        return ordinal


@register_model
def tv_googlenet(pretrained: bool = False, **kwargs: Any) -> GoogLeNet:
    """GoogLeNet through torchvision, with its ImageNet weights (download or a local file)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    num_classes = kwargs.pop("num_classes", 1000)
    # The published weights expect transform_input (they were converted from Caffe's inputs);
    # always on, so a model rebuilt without weights (export) computes what the trained one did.
    model = GoogLeNet(
        num_classes=1000,
        aux_logits=False,
        transform_input=True,
        init_weights=not pretrained,
        dropout=kwargs.pop("drop_rate", 0.2),
        **kwargs,
    )
    if pretrained:  # a local file is loaded after the build, by carclf.weights
        weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
        state = weights.get_state_dict(progress=False, check_hash=True)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("aux")})
    model.reset_classifier(num_classes)
    model.pretrained_cfg = dict(GOOGLENET_DATA_CFG, architecture="tv_googlenet")
    return model


def check_model_name(name: str) -> None:
    """Refuse a name that is neither a timm model nor a carclf one, before any worker starts."""
    if not timm.is_model(name):
        raise UserInputError(
            f"model.name: unknown model {name!r} (a timm name such as 'resnet50', "
            "or 'scratch_cnn' / 'scratch_cnn_bn' / 'tv_googlenet')"
        )


def _hub_weights(name: str) -> str | None:
    """The model's Hugging Face weights file if it is already in the local cache."""
    pcfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pcfg, "hf_hub_id", None)
    if not hub_id:
        return None
    for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        path = huggingface_hub.try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can this machine open a connection to the Hugging Face hub (or has a proxy for it)?"""
    if urllib.request.getproxies().get("https"):
        return True  # the proxy decides; a direct probe would say nothing
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _hub_source(name: str) -> dict[str, str] | None:
    """Where timm should read hub weights from: the local cache when they are there.

    Without this, an offline machine spends over a minute in huggingface_hub's retries before
    failing; with it, cached weights load without the network and missing ones fail at once.
    """
    cached = _hub_weights(name)
    if cached:
        return {"file": cached}
    if getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) and not _hub_reachable():
        host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname
        raise UserInputError(
            f"model.pretrained: {name} weights are not cached and {host} cannot be reached; "
            "set model.pretrained_file to a local weights file, or model.pretrained=false"
        )
    return None


def create_model(cfg: ModelConfig, num_classes: int, pretrained: bool | None = None) -> nn.Module:
    """Build the model of ``cfg`` with a fresh ``num_classes``-way head.

    Args:
        cfg: the model section of the config.
        num_classes: size of the classifier head.
        pretrained: overrides ``cfg.pretrained`` (export rebuilds without loading weights).
    """
    return build_model(cfg, num_classes, pretrained)[0]


def build_model(
    cfg: ModelConfig, num_classes: int, pretrained: bool | None = None
) -> tuple[nn.Module, WeightsReport | None]:
    """:func:`create_model`, and what was loaded from ``model.pretrained_file`` (None: no file).

    A file is loaded by :func:`carclf.weights.load_backbone` (any naming, every backbone tensor
    or an error), never by timm's lenient loader, which skips what does not match.
    """
    check_model_name(cfg.name)
    pretrained = cfg.pretrained if pretrained is None else pretrained
    from_file = bool(pretrained and cfg.pretrained_file)
    overlay = _hub_source(cfg.name) if pretrained and not from_file else None
    try:
        model = timm.create_model(
            cfg.name,
            pretrained=pretrained and not from_file,
            num_classes=num_classes,
            drop_rate=cfg.drop_rate,
            pretrained_cfg_overlay=overlay,
            # Only when set: carclf's own models take no stochastic depth.
            **({"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate else {}),
            **cfg.kwargs,
        )
    except TypeError as exc:
        raise UserInputError(f"model.kwargs: not accepted by {cfg.name}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if not pretrained or from_file:
            raise
        raise RuntimeError(
            f"could not download pretrained weights for {cfg.name} ({exc.__class__.__name__}); "
            "set model.pretrained_file to a local weights file, or model.pretrained=false"
        ) from exc
    report = load_backbone(model, cfg.pretrained_file, cfg.name) if from_file else None
    if cfg.head_hidden:
        mlp_head(model, cfg.head_hidden, cfg.drop_rate, num_classes)
    return model, report


class FlipTTA(nn.Module):
    """Test-time augmentation: the mean of the logits of each image and of its mirror image.

    Both views go through the wrapped model as one batch (twice the images, one call), so the
    ONNX export is a single graph and serving needs no change to use it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(torch.cat([x, torch.flip(x, dims=[3])]))
        # (2N, K) → (2, N, K) without naming N, so the export keeps a dynamic batch size.
        return logits.unflatten(0, (2, -1)).mean(0)


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """``model`` as ``export.tta`` runs it at test time: wrapped in :class:`FlipTTA` or as is."""
    if tta == "flip":
        return FlipTTA(model)
    if tta != "none":
        raise ValueError(f"tta {tta!r} is not one of none, flip")
    return model


def model_preprocess(cfg: ModelConfig) -> Preprocess:
    """The preprocessing of ``cfg``'s model: timm's data config with ``img_size``/``crop_pct``.

    Resolved once on the driver and handed to every stage (workers, checkpoints, the bundle).
    The model is built on the meta device: its config is all that is read, no weights.
    """
    with torch.device("meta"):
        model = create_model(cfg, num_classes=2, pretrained=False)
    return preprocess_for(model, cfg.img_size, cfg.crop_pct, cfg.crop_mode)


def mlp_head(model: nn.Module, hidden: int, drop_rate: float, num_classes: int) -> nn.Module:
    """Swap the model's linear classifier for Linear → GELU → Dropout → Linear, in place.

    The new head is what ``get_classifier()`` returns, so freezing treats it as the head.
    """
    old = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(old, nn.Linear):
        kind = type(old).__name__ if old is not None else "missing"
        raise UserInputError(f"model.head_hidden: the classifier is {kind}, not a linear layer")
    path = next(name for name, module in model.named_modules() if module is old)
    parent_path, _, attr = path.rpartition(".")
    head = nn.Sequential(
        nn.Linear(old.in_features, hidden),
        nn.GELU(),
        nn.Dropout(drop_rate),
        nn.Linear(hidden, num_classes),
    )
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, head)
    return model


def preflight_pretrained(cfg: ModelConfig, num_classes: int = 2) -> WeightsReport | None:
    """Load the pretrained weights once on the driver, so a failure comes before any worker.

    Hub weights are fetched (or found cached), and workers on the same node then read them from
    the local cache; a ``pretrained_file`` is loaded fully or refused here.

    Returns:
        What was loaded from ``model.pretrained_file``; None for hub weights or none.
    """
    if cfg.pretrained:
        return build_model(cfg, num_classes)[1]
    return None


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
