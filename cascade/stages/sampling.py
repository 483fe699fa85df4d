"""The epoch sampler: every positive image each epoch plus enough negatives that positives make a chosen share.

One sampler serves both stages and any number of processes. With ``share=None`` an epoch is a shuffle of every
image (the classifier's default); with a share ``s`` an epoch holds all positives and ``round(P·(1-s)/s)`` negatives
drawn without replacement (all negatives when fewer exist), so the segmenter sees many positives early and more
negatives later (the winners' 0.8 → 0.4 schedule), and ``share=0.5`` is class-balanced sampling for the classifier.

The order is a function of ``(seed, epoch)`` only, so a resumed run draws exactly what an uninterrupted one would.
Under DDP each rank takes every ``world_size``-th index of the same order, padded (like ``DistributedSampler``) so
every rank runs the same number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_indices(positive: np.ndarray, share: float | None, seed: int, epoch: int) -> np.ndarray:
    """The shuffled dataset indices of one epoch (before splitting across ranks)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n = len(positive)
    if share is None:
        return torch.randperm(n, generator=g).numpy()
    pos = np.flatnonzero(positive)
    neg = np.flatnonzero(~positive)
    wanted = round(len(pos) * (1.0 - share) / share)
    take = neg[torch.randperm(len(neg), generator=g).numpy()[: min(wanted, len(neg))]]
    chosen = np.concatenate([pos, take])
    return chosen[torch.randperm(len(chosen), generator=g).numpy()]


class PositiveShareSampler(Sampler[int]):
    """Yields this rank's indices for the epoch set by ``set_epoch``; ``shares[epoch]`` is that epoch's share."""

    def __init__(
        self,
        positive: np.ndarray,
        shares: Sequence[float | None],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.positive = np.asarray(positive, dtype=bool)
        self.shares = list(shares)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        order = epoch_indices(self.positive, self.shares[self.epoch], self.seed, self.epoch)
        per_rank = math.ceil(len(order) / self.world_size)
        padded = np.resize(order, per_rank * self.world_size) if len(order) else order
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return len(self._indices())
