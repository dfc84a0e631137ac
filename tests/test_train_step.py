"""The per-worker step is plain PyTorch: it runs and learns without Ray."""

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from carclf.data.dataset import ManifestDataset
from carclf.data.manifest import read_manifest
from carclf.data.transforms import eval_transform, preprocess_for
from carclf.models import create_model
from carclf.train import build_optimizer, build_scheduler, predict_loader, train_one_epoch

from .conftest import tiny_config


def test_plain_pytorch_step_learns(tmp_path: Path, toy_manifest: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(
        tmp_path, toy_manifest, model={"name": "scratch_cnn_bn"}, train={"epochs": 8, "lr": 1e-2}
    )
    manifest = read_manifest(toy_manifest)
    model = create_model(cfg.model, len(manifest.labels))
    pre = preprocess_for(model, cfg.model.img_size)
    data = ManifestDataset(manifest.split("train"), eval_transform(pre))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    criterion = torch.nn.CrossEntropyLoss()
    losses = [
        train_one_epoch(model, loader, optimizer, criterion, scheduler)["train_loss"]
        for _ in range(cfg.train.epochs)
    ]
    assert losses[-1] < losses[0] * 0.9
    logits, labels = predict_loader(model, DataLoader(data, batch_size=16))
    assert logits.shape == (len(data), len(manifest.labels)) and labels.shape == (len(data),)


def test_cosine_schedule_warms_up_then_decays(tmp_path: Path, toy_manifest: Path) -> None:
    cfg = tiny_config(tmp_path, toy_manifest, train={"epochs": 4, "warmup_epochs": 1, "lr": 1.0})
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[9] == max(lrs) and lrs[-1] < 0.05
