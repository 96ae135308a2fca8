"""Batches that never mix buckets, in an order that is a pure function of (seed, epoch).

Resuming needs no saved state: a run that stopped after k batches of epoch e continues with
`batches_for_epoch(e)[k:]`. Under DDP every rank builds the same global list and takes every
`num_replicas`-th batch of it; the list is padded by repeating its first batches so all ranks step equally often.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from typing import Iterator, Protocol

from torch.utils.data import Sampler


class BucketedDataset(Protocol):
    def __len__(self) -> int: ...

    def bucket_of(self, index: int) -> tuple[int, int]: ...


class BucketBatchSampler(Sampler[list[int]]):
    """A batch sampler for `DataLoader(batch_sampler=...)`, or read directly with `batches_for_epoch`."""

    def __init__(self, dataset: BucketedDataset, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in range(len(dataset)):
            groups[dataset.bucket_of(index)].append(index)
        self._groups = [groups[bucket] for bucket in sorted(groups)]
        self._total = sum(math.ceil(len(group) / batch_size) for group in self._groups)
        self.epoch = 0

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in training order. A bucket's last batch may be smaller."""
        rng = random.Random(f"{self.seed}/{epoch}/batches")
        batches: list[list[int]] = []
        for group in self._groups:
            order = list(group)
            rng.shuffle(order)
            batches += [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        padded = list(itertools.islice(itertools.cycle(batches), len(self) * self.num_replicas))
        return padded[self.rank::self.num_replicas]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches_for_epoch(self.epoch))

    def __len__(self) -> int:
        """Batches per epoch on each rank."""
        return math.ceil(self._total / self.num_replicas)
