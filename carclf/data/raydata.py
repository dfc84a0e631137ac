"""The Ray Data loader (``data.loader: ray``): manifest → decode → transform → Ray Train workers.

The driver builds one dataset per split (:func:`build_datasets`) and hands them to the
``TorchTrainer``; each worker reads its shard as ``(images, labels)`` batches
(:func:`shard_loaders`). Decoding and the transforms are ``carclf.data.transforms``' own, run in
Ray Data tasks, so they scale with the cluster's CPUs instead of each worker's.

* The training split is reshuffled every epoch from ``seed`` (Ray Data reseeds each execution),
  then split equally over the workers, as DDP needs the same number of steps on each.
* The validation split is split unequally, so that no image is dropped; the worker gathers the
  predictions (``carclf.train.validate``).
* With ``data.cache`` the decoded, resized images are materialised in the object store once;
  epochs then start from them.
* Augmentation randomness inside Ray Data tasks is not seeded (only the shuffle is).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray.data
import ray.train
import torch
from PIL import Image

from carclf.config import Config
from carclf.data.manifest import Manifest
from carclf.data.transforms import (
    Preprocess,
    cache_resize,
    eval_transform,
    load_image,
    train_transform_of,
)

TRAIN, VAL = "train", "val"
ROWS_PER_BLOCK = 64  # small blocks: decoding spreads over tasks, shards stay balanced


def build_datasets(cfg: Config, manifest: Manifest, pre: Preprocess) -> dict[str, ray.data.Dataset]:
    """The ``train`` and ``val`` datasets, rows ``{"image": CHW float32, "label": int}``."""
    resize = cache_resize(pre) if cfg.data.cache else None
    train = _images(manifest.split(TRAIN), resize, shuffle_seed=cfg.seed)
    val = _images(manifest.split(VAL), resize, shuffle_seed=None)
    augment = train_transform_of(pre, cfg.data)
    return {
        TRAIN: train.map(_transform_row, fn_kwargs={"transform": augment}),
        VAL: val.map(_transform_row, fn_kwargs={"transform": eval_transform(pre)}),
    }


def _images(
    records: list[tuple[str, int]],
    resize: Callable[[Image.Image], Image.Image] | None,
    shuffle_seed: int | None,
) -> ray.data.Dataset:
    """Decoded images (uint8 HWC) with labels; resized and materialised when ``resize`` is set."""
    rows = [{"path": path, "label": label} for path, label in records]
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / ROWS_PER_BLOCK))
    shuffle = ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
    if resize is None:  # shuffle the light records before decoding, not the decoded images
        ds = ds if shuffle_seed is None else ds.random_shuffle(seed=shuffle)
        return ds.map(_decode_row, fn_kwargs={"resize": None})
    ds = ds.map(_decode_row, fn_kwargs={"resize": resize}).materialize()
    return ds if shuffle_seed is None else ds.random_shuffle(seed=shuffle)


def _decode_row(row: dict[str, Any], resize: Callable | None) -> dict[str, Any]:
    image = load_image(row["path"])
    if resize is not None:
        image = resize(image)
    return {"image": np.asarray(image), "label": row["label"]}


def _transform_row(row: dict[str, Any], transform: Callable) -> dict[str, Any]:
    image = transform(Image.fromarray(row["image"]))
    return {"image": image.numpy(), "label": row["label"]}


class ValidationKeptWhole(ray.train.DataConfig):
    """Train's split, except that ``val`` is split unequally: no validation image is dropped.

    Train splits every dataset equally (``streaming_split(equal=True)``), which drops up to
    ``world_size - 1`` rows; for validation every image must be scored exactly once.
    """

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Split ``train`` (and anything else) as Train does, ``val`` with ``equal=False``."""
        rest = {k: v for k, v in datasets.items() if k != VAL}
        out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if VAL in datasets:
            shards = datasets[VAL].streaming_split(world_size, equal=False)
            for rank, shard in enumerate(shards):
                out[rank][VAL] = shard
        return out


class ShardBatches:
    """``(images, labels)`` batches of this worker's shard, as ``train_one_epoch`` expects.

    Each iteration is a new execution of the dataset (a new shuffle for ``train``).
    """

    def __init__(self, name: str, batch_size: int, drop_last: bool, steps: int | None) -> None:
        self.shard = ray.train.get_dataset_shard(name)
        self.batch_size, self.drop_last, self.steps = batch_size, drop_last, steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=self.drop_last
        ):
            yield batch["image"], batch["label"]

    def __len__(self) -> int:
        if self.steps is None:  # the unequal validation shards have no length known in advance
            raise TypeError(f"the length of this shard is unknown ({self.shard})")
        return self.steps


def shard_loaders(cfg: Config, n_train: int, world: int) -> tuple[ShardBatches, ShardBatches]:
    """This worker's train and validation batches (inside a Ray Train worker)."""
    per_worker = max(cfg.train.batch_size // world, 1)
    # The equal split gives each worker n_train // world images; drop_last as the torch loader.
    steps = (n_train // world) // per_worker
    train = ShardBatches(TRAIN, per_worker, drop_last=True, steps=steps)
    val = ShardBatches(VAL, per_worker, drop_last=False, steps=None)
    return train, val
