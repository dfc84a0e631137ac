"""A PyTorch dataset over manifest records."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from carclf.data.transforms import load_image


class ManifestDataset(Dataset):
    """``(image tensor, label index)`` for each ``(path, label_index)`` record."""

    def __init__(self, records: Sequence[tuple[str, int]], transform: Callable) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.records[i]
        return self.transform(load_image(path)), label
