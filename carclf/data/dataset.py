"""A PyTorch dataset over manifest records, with an optional cache of decoded, resized images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import Dataset

from carclf.data.manifest import Manifest
from carclf.data.transforms import Preprocess, load_image, resized_size


class ManifestDataset(Dataset):
    """``(image tensor, label index)`` for each ``(path, label_index)`` record.

    With ``cache_resize`` (``transforms.cache_resize``), each image is decoded and resized once
    and kept as a uint8 array; later epochs apply ``transform`` to the kept copy. The cache lives
    in the process that reads the dataset: with DataLoader workers, each worker process holds
    its own.
    """

    def __init__(
        self,
        records: Sequence[tuple[str, int]],
        transform: Callable,
        cache_resize: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.cache_resize = cache_resize
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.records[i]
        if self.cache_resize is None:
            return self.transform(load_image(path)), label
        if i not in self._cache:
            self._cache[i] = np.asarray(self.cache_resize(load_image(path)))
        return self.transform(Image.fromarray(self._cache[i])), label


def cache_bytes(manifest: Manifest, pre: Preprocess, splits: Sequence[str]) -> int:
    """Bytes the decoded-image cache takes for ``splits``: the sum of resized H × W × 3."""
    total = 0
    for split in splits:
        rows = manifest.table.filter(pc.equal(manifest.table["split"], split))
        for width, height in zip(
            rows["width"].to_pylist(), rows["height"].to_pylist(), strict=True
        ):
            w, h = resized_size(width, height, pre)
            total += w * h * 3
    return total
