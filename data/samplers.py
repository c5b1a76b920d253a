"""Samplers that split a dataset over processes, and the seeding of training loader workers.

`DistributedSampler` pads its shards to equal length by repeating images, which is harmless in
training but double-counts images in evaluation; the samplers here never pad.
"""
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from utils import seed_everything


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


class WorkerSeeder:
    """`worker_init_fn` of the training loader: seeds Python, NumPy and torch in each worker
    from (seed, epoch, rank, worker id), so that an epoch draws the same augmentations whether
    the run was interrupted before it or not. Workers must start afresh each epoch (no
    `persistent_workers`) and read the epoch set by `set_epoch` when they start."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, worker_id: int) -> None:
        entropy = [self.seed, self.epoch, self.rank, worker_id]
        seed_everything(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
