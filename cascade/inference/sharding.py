"""Sharded batch prediction: ``torchrun --nproc_per_node N [--nnodes M …] -m cascade predict …``.

``torchrun`` starts one process per device and tells each its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. Every
rank lists the same inputs (sorted, so the same list everywhere), takes every ``WORLD_SIZE``-th one starting at
its rank (strided, so clusters of positives — the slow images — spread over all ranks), predicts them on its own
device (``cuda:LOCAL_RANK``, or the CPU), and the per-image results are gathered back into the original order, so
rank 0 writes exactly the CSV a single process would. Only small per-image records travel (ImageId, RLE, decision,
error), over a gloo process group, which works for CPU and GPU ranks and across machines alike. Without
``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is the identity and nothing is initialised.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

TIMEOUT = datetime.timedelta(minutes=30)
"""How long a rank waits for the others at the gather: the slowest rank's whole share must fit in it."""


@dataclass(frozen=True)
class Shard:
    """This process's place among the ``world`` processes of a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world``-th one, starting at ``rank``."""
        return list(items[self.rank :: self.world])

    def device(self, device: str) -> torch.device:
        """The device for a ``--device`` setting: under torchrun, ``auto`` or ``cuda`` with CUDA present is
        ``cuda:LOCAL_RANK`` (one GPU per process); :func:`cascade.common.devices.resolve_device`."""
        from cascade.common.devices import resolve_device

        return resolve_device(device, self.local_rank if self.world > 1 else None)


def current_shard() -> Shard:
    """The shard ``torchrun`` assigned through the environment (rank 0 of 1 when not started by it)."""
    return Shard(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


@contextlib.contextmanager
def process_group(shard: Shard) -> Iterator[None]:
    """Join the job's gloo process group for the block when there are several ranks; leave it afterwards."""
    if shard.world == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gather_in_order(mine: list[T], shard: Shard) -> list[T]:
    """Every rank's results (each rank's share from :meth:`Shard.take`) merged back into the original order.

    Every rank gets the full list (so every rank can return the same exit status).
    """
    if shard.world == 1:
        return mine
    import torch.distributed as dist

    parts: list[list[T]] = [[] for _ in range(shard.world)]
    dist.all_gather_object(parts, mine)
    merged: list[T] = []
    for i in range(max(len(p) for p in parts)):
        merged.extend(p[i] for p in parts if i < len(p))
    return merged
