"""Freezing, schedules, clipping, early stopping and layer decay on bare PyTorch models."""

import json
from pathlib import Path

import pytest
import torch

from carclf.config import validate_config
from carclf.models import create_model
from carclf.recipes import (
    EarlyStopping,
    Schedule,
    amp_dtype,
    build_optimizer,
    build_step_tools,
    head_parameter_names,
    set_trainable,
    trainable_names,
)
from carclf.train import _backward_and_step


def _cfg(**train: object):
    return validate_config(
        {
            "output_dir": "x",
            "data": {"manifest": "m"},
            "model": {"name": "test_resnet"},
            "train": {"epochs": 4, **train},
        }
    )


def test_freeze_then_unfreeze_changes_which_parameters_get_gradients() -> None:
    cfg = _cfg(freeze_epochs=1, unfreeze_blocks=1)
    model = create_model(cfg.model, 5)
    head = head_parameter_names(model)
    assert head == {"fc.weight", "fc.bias"}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def grads_after_step(epoch: int) -> set[str]:
        set_trainable(model, trainable_names(model, cfg, epoch))
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n for n, p in model.named_parameters() if p.grad is not None}

    assert grads_after_step(0) == head
    epoch1 = grads_after_step(1)
    assert head < epoch1 and all(n.startswith(("fc.", "layer4.")) for n in epoch1)
    all_names = {n for n, _ in model.named_parameters()}
    assert grads_after_step(1) != all_names
    assert trainable_names(model, _cfg(freeze_epochs=1), 1) == all_names


def test_freeze_epochs_must_leave_epochs_to_train() -> None:
    with pytest.raises(Exception, match="freeze_epochs"):
        _cfg(freeze_epochs=4)


def test_layer_decay_gives_early_layers_smaller_learning_rates() -> None:
    cfg = _cfg(layer_decay=0.5, lr=1.0)
    optimizer = build_optimizer(create_model(cfg.model, 5), cfg)
    scales = sorted({g["lr"] for g in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == pytest.approx(1.0) and scales[0] < 0.1


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "plateau", "none"])
def test_schedules(kind: str) -> None:
    cfg = _cfg(scheduler=kind, warmup_epochs=1, lr=1.0, plateau_patience=0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = Schedule(optimizer, cfg, steps_per_epoch=5)
    lrs = []
    for _epoch in range(4):
        for _ in range(5):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step_batch()
        schedule.step_epoch({"val_acc": 0.5}, "val_acc")  # never improves
    if kind == "none":
        assert set(lrs) == {1.0}
    elif kind == "plateau":
        assert lrs[0] == 1.0 and lrs[-1] < 1.0  # halved after an epoch without improvement
    else:
        assert lrs[0] < max(lrs) and lrs[-1] < 0.1 * max(lrs)  # warm up, then decay
    restored = Schedule(optimizer, cfg, steps_per_epoch=5)
    restored.load_state_dict(schedule.state_dict())


def test_gradient_clipping_bounds_the_update() -> None:
    param = torch.nn.Parameter(torch.zeros(10))
    optimizer = torch.optim.SGD([param], lr=1.0)
    cfg = _cfg(grad_clip=1e-3)
    tools = build_step_tools(torch.nn.Linear(1, 1), optimizer, cfg, 5, 1, torch.device("cpu"))
    loss = (param * 1000.0).sum()
    _backward_and_step(loss, optimizer, [param], tools)
    assert param.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_early_stopping() -> None:
    stopper = EarlyStopping(patience=2, mode="max")
    assert [stopper.update(v) for v in (0.5, 0.6, 0.55, 0.6, 0.7, 0.6, 0.6)] == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    never = EarlyStopping(patience=None)
    assert not any(never.update(0.1) for _ in range(10))
    assert EarlyStopping(patience=1, mode="min").update(1.0) is False


NAN = float("nan")


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_nan_epoch_never_improves_nor_blocks_a_later_improvement(mode: str) -> None:
    """A diverged epoch counts as an epoch without improvement, and never as the best: compared
    raw, a NaN first epoch made every later one a bad epoch (stopped while improving)."""
    sign = 1.0 if mode == "max" else -1.0
    stopper = EarlyStopping(patience=2, mode=mode)
    rising = [sign * v for v in (0.5, 0.6, 0.7, 0.8)]
    assert [stopper.update(v) for v in (NAN, *rising)] == [False] * 5
    assert stopper.best == pytest.approx(0.8) and stopper.bad_epochs == 0
    assert [stopper.update(v) for v in (NAN, sign * 0.9, NAN, NAN)] == [False, False, False, True]
    only_nan = EarlyStopping(patience=2, mode=mode)
    assert [only_nan.update(NAN) for _ in range(2)] == [False, True]  # diverged from the start
    assert only_nan.best is None


def test_early_stopping_resumes_from_a_nan_best_as_from_none() -> None:
    """The state a checkpoint keeps (``vars``, as JSON) resumes; a NaN best that one written
    before NaN ranked last may hold blocks nothing."""
    stopper = EarlyStopping(patience=2, mode="max")
    stopper.update(0.5)
    resumed = EarlyStopping(patience=2, mode="max")
    vars(resumed).update(json.loads(json.dumps(vars(stopper))))
    assert resumed.update(0.4) is False and resumed.update(0.45) is True
    old = EarlyStopping(patience=2, mode="max")
    vars(old).update({"patience": 2, "sign": 1.0, "best": NAN, "bad_epochs": 1})
    assert old.update(0.3) is False and old.best == 0.3 and old.bad_epochs == 0


@pytest.mark.parametrize(("monitor", "sign"), [("val_acc", 1.0), ("val_loss", -1.0)])
def test_the_plateau_counts_a_nan_epoch_as_bad_and_the_next_real_one_improves(
    monitor: str, sign: float
) -> None:
    cfg = _cfg(scheduler="plateau", lr=1.0, plateau_patience=0, monitor=monitor)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = Schedule(optimizer, cfg, steps_per_epoch=1)
    lrs = []
    for value in (NAN, 0.5, 0.6, NAN, 0.7, 0.8):
        schedule.step_epoch({monitor: sign * value}, monitor)  # NaN stays NaN
        lrs.append(optimizer.param_groups[0]["lr"])
    # patience 0: each epoch without improvement halves the rate, and only those do.
    assert lrs == [0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert schedule.plateau is not None and schedule.plateau.best == pytest.approx(0.8)


def test_amp_is_off_on_cpu() -> None:
    assert amp_dtype("auto", "cpu") is None and amp_dtype("bf16", "cpu") is None
    assert amp_dtype("off", "cuda") is None and amp_dtype("fp16", "cuda") == torch.float16


def test_head_of_the_scratch_cnn(tmp_path: Path) -> None:
    model = create_model(_cfg().model.model_copy(update={"name": "scratch_cnn"}), 3)
    assert head_parameter_names(model) == {"fc.weight", "fc.bias"}


def test_head_lr_scale_gives_the_head_its_own_rate_and_keeps_layer_decay() -> None:
    cfg = _cfg(lr=1e-3, layer_decay=0.5, head_lr_scale=10.0)
    model = create_model(cfg.model, 5)
    head = {id(p) for p in model.fc.parameters()}
    optimizer = build_optimizer(model, cfg)
    rates = {
        id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]
    }  # every parameter in exactly one group
    assert len(rates) == len(list(model.parameters()))
    head_rates = {rates[i] for i in head}
    others = [r for i, r in rates.items() if i not in head]
    assert len(head_rates) == 1 and head_rates.pop() == pytest.approx(1e-2)
    assert min(others) < max(others) < 1e-3  # layer decay kept below the head's own rate


def test_progressive_unfreezing_adds_blocks_from_the_top_each_epoch() -> None:
    cfg = _cfg(epochs=8, freeze_epochs=1, unfreeze_step=1)
    model = create_model(cfg.model, 5)
    all_names = {n for n, _ in model.named_parameters()}
    sizes = [len(trainable_names(model, cfg, epoch)) for epoch in range(8)]
    assert sizes[0] == len(head_parameter_names(model))
    assert sizes == sorted(sizes) and len(set(sizes)) >= 4  # grows one block per epoch
    assert trainable_names(model, cfg, 7) == all_names
    epoch1 = trainable_names(model, cfg, 1) - head_parameter_names(model)
    assert epoch1 and all(n.startswith("layer4.") for n in epoch1)  # the top block first
    capped = _cfg(epochs=8, freeze_epochs=1, unfreeze_step=1, unfreeze_blocks=2)
    assert trainable_names(model, capped, 7) == trainable_names(model, capped, 2)
