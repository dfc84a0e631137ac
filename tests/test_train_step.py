"""The per-worker step is plain PyTorch: it runs and learns without Ray."""

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from carclf.data.dataset import ManifestDataset
from carclf.data.manifest import read_manifest
from carclf.data.transforms import eval_transform, preprocess_for
from carclf.models import create_model
from carclf.recipes import build_optimizer, build_step_tools
from carclf.train import predict_loader, train_one_epoch

from .conftest import tiny_config


def _setup(tmp_path: Path, manifest_path: Path, **train: object):
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, manifest_path, model={"name": "scratch_cnn_bn"}, train=train)
    manifest = read_manifest(manifest_path)
    model = create_model(cfg.model, len(manifest.labels))
    pre = preprocess_for(model, cfg.model.img_size)
    data = ManifestDataset(manifest.split("train"), eval_transform(pre))
    loader = DataLoader(data, batch_size=8, shuffle=True, drop_last=True)
    optimizer = build_optimizer(model, cfg)
    tools = build_step_tools(model, optimizer, cfg, 7, len(loader), torch.device("cpu"))
    return cfg, model, loader, optimizer, tools


def test_plain_pytorch_step_learns(tmp_path: Path, toy_manifest: Path) -> None:
    cfg, model, loader, optimizer, tools = _setup(tmp_path, toy_manifest, epochs=8, lr=1e-2)
    losses = [
        train_one_epoch(model, loader, optimizer, tools)["train_loss"]
        for _ in range(cfg.train.epochs)
    ]
    assert losses[-1] < losses[0] * 0.9
    logits, labels = predict_loader(model, DataLoader(loader.dataset, batch_size=16))
    assert logits.shape == (len(loader.dataset), 7) and labels.shape == (len(loader.dataset),)


def test_mixup_clipping_and_ema_run_together(tmp_path: Path, toy_manifest: Path) -> None:
    _, model, loader, optimizer, tools = _setup(
        tmp_path, toy_manifest, mixup=0.4, cutmix=1.0, grad_clip=0.5, ema_decay=0.9
    )
    assert tools.mixup is not None and tools.ema is not None
    before = {k: v.clone() for k, v in tools.ema.module.state_dict().items()}
    stats = train_one_epoch(model, loader, optimizer, tools)
    assert torch.isfinite(torch.tensor(stats["train_loss"]))
    after = tools.ema.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # EMA moved
    model_w = model.state_dict()
    assert any(not torch.equal(model_w[k], after[k]) for k in after)  # but lags the model
