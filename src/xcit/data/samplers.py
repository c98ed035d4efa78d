"""Samplers that shard across ranks and resume mid-epoch."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler[int]):
    """Shuffled by (seed, epoch), sharded across ranks, optionally repeat-augmented, resumable.

    Like DistributedSampler, every rank gets the same number of indices (the
    permutation is padded by wrapping), so ranks step in lockstep. With
    `repeats > 1` each index appears that many times in a row before sharding,
    so its copies land on different ranks with different augmentations
    (DeiT's repeated augmentation), and each rank still sees about
    len(dataset) / world_size indices per epoch. `skip(n)` drops the first n
    indices of this rank's shard: the ones a resumed run has already trained on.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, repeats: int = 1):
        self.size, self.num_replicas, self.rank, self.seed, self.repeats = size, num_replicas, rank, seed, repeats
        self.num_samples = math.ceil(size * repeats / num_replicas) if repeats == 1 else size // num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def skip(self, count: int) -> None:
        self.start = count

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        order = torch.cat([order, order[: total - len(order)]])  # pad by wrapping
        shard = order[self.rank::self.num_replicas][: self.num_samples]
        return iter(shard[self.start:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes indices r, r + world, ...; no padding, so no sample is counted twice."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
