"""Class-balanced sampling for the torch loader: one seeded weighted draw, sharded over workers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class BalancedDistributedSampler(Sampler[int]):
    """Indices drawn with replacement, each image weighted by 1 / (images of its class).

    Every worker draws the same global sequence from ``seed + epoch`` and keeps every
    ``num_replicas``-th index from ``rank`` on, so the workers' shards are disjoint parts of one
    draw, and one worker with batch B sees the same images as N workers with batch B / N. An
    epoch draws as many indices as there are images (rounded down to a multiple of the workers).
    """

    def __init__(
        self, labels: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        labels = np.asarray(labels)
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.num_samples = len(labels) // num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw another sequence for ``epoch`` (the same on every worker)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        drawn = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(drawn[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
