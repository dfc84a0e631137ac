"""Loading: augmentation policies, class-balanced sampling, the decoded-image cache, Ray Data."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carclf.config import Config
from carclf.data.dataset import ManifestDataset, cache_bytes
from carclf.data.manifest import read_manifest
from carclf.data.sampling import BalancedDistributedSampler
from carclf.data.transforms import (
    AUGMENT_POLICIES,
    Preprocess,
    cache_resize,
    eval_resize_crop,
    eval_transform,
    load_image,
    to_model_input,
    train_transform,
)
from carclf.errors import UserInputError
from carclf.train import build_loaders, run_training

from .conftest import tiny_config

PRE = Preprocess(input_size=(3, 32, 40), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=0.875)


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_each_augment_policy_gives_the_model_input_shape(policy: str, toy_manifest: Path) -> None:
    image = load_image(read_manifest(toy_manifest).split("train")[0][0])
    out = train_transform(PRE, policy)(image)
    assert out.shape == (3, 32, 40) and out.dtype == torch.float32


def test_augment_options_reach_the_transform(toy_manifest: Path) -> None:
    from timm.data.random_erasing import RandomErasing

    from carclf.data.transforms import train_transform_of

    data = tiny_config(
        Path("o"),
        toy_manifest,
        data={"augment": "randaugment", "augment_magnitude": 5, "random_erasing": 0.5},
    ).data
    steps = train_transform_of(PRE, data).transforms
    erasing = [t for t in steps if isinstance(t, RandomErasing)]
    assert erasing and erasing[0].probability == 0.5
    assert any("m=5," in repr(t) for t in steps)  # timm's RandAugment at magnitude 5
    crop = next(t for t in steps if hasattr(t, "scale"))
    assert tuple(crop.scale) == (0.6, 1.0)
    data = tiny_config(
        Path("o"), toy_manifest, data={"augment": "basic", "crop_scale": [0.3, 1.0]}
    ).data
    crop = next(t for t in train_transform_of(PRE, data).transforms if hasattr(t, "scale"))
    assert tuple(crop.scale) == (0.3, 1.0)


def test_squash_keeps_the_whole_photo_where_the_centre_crop_cuts_its_ends() -> None:
    """A 2:1 photo with a marker at each end: the centre crop loses both, squash keeps them,
    in evaluation and in the training crops (which start from the squashed image)."""
    photo = np.zeros((40, 80, 3), np.uint8)
    photo[:, :6] = photo[:, -6:] = 255
    img = Image.fromarray(photo)
    pre = PRE.model_copy(update={"input_size": (3, 32, 32), "crop_pct": 1.0})
    centre = np.asarray(eval_resize_crop(pre)(img))
    squash = np.asarray(eval_resize_crop(pre.model_copy(update={"crop_mode": "squash"}))(img))
    assert centre.shape == squash.shape == (32, 32, 3)
    assert centre.max() == 0 and squash[:, 0].min() == 255 and squash[:, -1].min() == 255
    squashed = pre.model_copy(update={"crop_mode": "squash"})
    train = train_transform(squashed, "basic", crop_scale=(1.0, 1.0))
    assert tuple(train.transforms[0].size) == (32, 32)  # the whole photo to the square first
    assert train(img).shape == (3, 32, 32)


def test_augment_accepts_old_booleans_and_refuses_unknown_names(toy_manifest: Path) -> None:
    assert tiny_config(Path("o"), toy_manifest, data={"augment": True}).data.augment == "basic"
    assert tiny_config(Path("o"), toy_manifest, data={"augment": False}).data.augment == "none"
    with pytest.raises(UserInputError, match=r"data\.augment"):
        tiny_config(Path("o"), toy_manifest, data={"augment": "autoaugment"})
    with pytest.raises(UserInputError, match="balanced_sampling"):
        tiny_config(Path("o"), toy_manifest, data={"loader": "ray", "balanced_sampling": True})


IMBALANCED = [0] * 400 + [1] * 80 + [2] * 20  # 20:4:1


def _draw(world: int, rank: int, epoch: int, seed: int = 7) -> list[int]:
    sampler = BalancedDistributedSampler(IMBALANCED, world, rank, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def _odd_sized_images(seed: int = 0) -> list[Image.Image]:
    """Noise images in portrait, landscape, square, tiny and exact-crop shapes."""
    rng = np.random.default_rng(seed)
    sizes = [(37, 90), (301, 123), (64, 64), (5, 7), (40, 32), (1000, 3)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("input_size", [(3, 32, 40), (3, 48, 48)])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 1.15])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos"])
def test_the_eval_transform_split_in_two_gives_the_very_same_tensor(
    input_size: tuple[int, int, int],
    crop_pct: float,
    interpolation: str,
    crop_mode: str,
    toy_manifest: Path,
) -> None:
    """Serving's split (a Pillow resize and crop in the ingress, numpy normalisation in the
    classifier) is bit-identical to timm's eval transform used in evaluation and export: square
    and non-square inputs, crops that pad (``crop_pct`` over 1), images of any shape, both
    crop modes."""
    update = {"input_size": input_size, "crop_pct": crop_pct, "interpolation": interpolation}
    pre = PRE.model_copy(update=update | {"crop_mode": crop_mode})
    toy = [load_image(r[0]) for r in read_manifest(toy_manifest).split("val")[:2]]
    crop = eval_resize_crop(pre)
    for img in [*toy, *_odd_sized_images()]:
        whole = eval_transform(pre)(img).numpy()[None]
        pixels = np.asarray(crop(img))[None]
        assert pixels.dtype == np.uint8
        assert np.array_equal(to_model_input(pixels, pre), whole), img.size


def test_the_eval_crop_refuses_an_interpolation_pillow_lacks() -> None:
    with pytest.raises(UserInputError, match="interpolation"):
        eval_resize_crop(PRE.model_copy(update={"interpolation": "random"}))


def test_balanced_sampler_draws_classes_near_uniformly() -> None:
    drawn = [IMBALANCED[i] for epoch in range(4) for i in _draw(1, 0, epoch)]
    shares = np.array([Counter(drawn)[c] for c in range(3)]) / len(drawn)
    # 2000 draws of 1/3 each: the binomial standard deviation is about 0.011.
    assert np.abs(shares - 1 / 3).max() < 0.04, shares


def test_balanced_sampler_is_seeded_and_sharded_over_workers() -> None:
    assert _draw(1, 0, epoch=0) == _draw(1, 0, epoch=0)
    assert _draw(1, 0, epoch=0) != _draw(1, 0, epoch=1)
    assert _draw(1, 0, epoch=0, seed=7) != _draw(1, 0, epoch=0, seed=8)
    # Two workers take alternate positions of the one-worker draw: disjoint, same images.
    one, ranks = _draw(1, 0, 3), [_draw(2, r, 3) for r in range(2)]
    assert ranks[0] == one[0::2] and ranks[1] == one[1::2]
    assert len(ranks[0]) == len(ranks[1]) == len(IMBALANCED) // 2


def test_balanced_loaders_split_one_global_batch(tmp_path: Path, toy_manifest: Path) -> None:
    cfg = tiny_config(tmp_path, toy_manifest, data={"balanced_sampling": True})
    manifest = read_manifest(toy_manifest)
    one, _ = build_loaders(cfg, manifest, PRE, 0, 1)
    two = [build_loaders(cfg, manifest, PRE, rank, 2)[0] for rank in range(2)]
    assert isinstance(one.sampler, BalancedDistributedSampler)
    first_global = sorted(list(one.sampler)[: cfg.train.batch_size])
    per_worker = cfg.train.batch_size // 2
    assert first_global == sorted(i for t in two for i in list(t.sampler)[:per_worker])


def _copied_records(toy_manifest: Path, tmp_path: Path) -> tuple[list[tuple[str, int]], object]:
    manifest = read_manifest(toy_manifest)
    records = []
    for i, (path, label) in enumerate(manifest.split("val")[:6]):
        copy = tmp_path / f"{i}.png"
        shutil.copy(path, copy)
        records.append((str(copy), label))
    return records, manifest


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_cache_gives_the_same_eval_tensors_without_decoding_again(
    toy_manifest: Path, tmp_path: Path, crop_mode: str
) -> None:
    records, _ = _copied_records(toy_manifest, tmp_path)
    pre = PRE.model_copy(update={"crop_mode": crop_mode})
    plain = ManifestDataset(records, eval_transform(pre))
    cached = ManifestDataset(records, eval_transform(pre), cache_resize(pre))
    expected = [plain[i][0] for i in range(len(records))]
    first = [cached[i][0] for i in range(len(records))]
    for path, _ in records:  # the second epoch must not need the files
        Path(path).unlink()
    second = [cached[i][0] for i in range(len(records))]
    for want, a, b in zip(expected, first, second, strict=True):
        assert torch.equal(want, a) and torch.equal(want, b)


@pytest.mark.parametrize("size", [(3, 32, 40), (3, 48, 48)])
def test_cache_size_estimate_is_what_the_cache_holds(size: tuple, toy_manifest: Path) -> None:
    manifest = read_manifest(toy_manifest)
    pre = PRE.model_copy(update={"input_size": size})
    cached = ManifestDataset(manifest.split("val"), eval_transform(pre), cache_resize(pre))
    for i in range(len(cached)):
        cached[i]
    held = sum(a.nbytes for a in cached._cache.values())
    assert cache_bytes(manifest, pre, ["val"]) == held > 0


@pytest.mark.parametrize("world", [1, 3])
def test_validation_shards_hold_every_image_once(world: int, toy_manifest: Path) -> None:
    manifest = read_manifest(toy_manifest)
    cfg = tiny_config(Path("o"), toy_manifest)
    pre = PRE.model_copy(update={"input_size": (3, 8, 8)})
    shards = [build_loaders(cfg, manifest, pre, rank, world)[1].dataset for rank in range(world)]
    paths = [path for shard in shards for path, _ in shard.records]
    # 28 images over 3 workers: no padding, so gathered metrics count each image once.
    assert sorted(paths) == sorted(p for p, _ in manifest.split("val"))


@pytest.mark.integration
def test_ray_data_loader_trains_on_two_workers_and_scores_all_of_val(
    ray_session, toy_manifest: Path, tmp_path: Path
) -> None:
    cfg: Config = tiny_config(
        tmp_path / "run",
        toy_manifest,
        data={"loader": "ray", "cache": True, "augment": "basic"},
        train={"epochs": 2, "batch_size": 8},
        scaling={"num_workers": 2},
    )
    result = run_training(cfg)
    n_val = len(read_manifest(toy_manifest).split("val"))
    assert result.metrics["epoch"] in (0, 1)
    assert result.metrics["val_images"] == n_val
    assert np.isfinite(result.metrics["val_loss"]) and result.metrics["train_loss"] > 0
