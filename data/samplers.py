"""Samplers that split a dataset over processes.

`DistributedSampler` pads its shards to equal length by repeating images, which is harmless in
training but double-counts images in evaluation; the samplers here never pad.
"""
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Indices `rank, rank + world_size, ...` in order: every index goes to exactly one process.

    Shards differ in length by at most one, so evaluation must sum counts over processes rather
    than average per-process accuracies.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ShardRandomSampler(Sampler[int]):
    """A fresh random order of a fixed set of indices each epoch (`set_epoch`).

    Used with `--cache-mode part`, where each process holds only its own shard in memory. The
    caller trims shards to equal length so that every process runs the same number of steps.
    """

    def __init__(self, indices: Sequence[int], seed: int = 0) -> None:
        self.indices = list(indices)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.indices), generator=generator).tolist()
        return (self.indices[i] for i in order)

    def __len__(self) -> int:
        return len(self.indices)
