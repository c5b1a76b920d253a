"""`build_loader(config)`: datasets, transforms, samplers, loaders and mixup for a run."""
import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from timm.data import Mixup
from yacs.config import CfgNode as CN

from .demo import demo_dataset_dir, write_demo_dataset
from .images import (DataError, ImageDataset, collate_eval, collate_train, folder_samples,
                     zip_samples)
from .samplers import ShardRandomSampler, ShardSampler, WorkerSeeder
from .transforms import build_transform

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Loaders:
    """The training side is None when only evaluating. `classes` are the class names in the
    order of the model's outputs; validation targets index into them."""
    dataset_train: Optional[ImageDataset]
    dataset_val: ImageDataset
    loader_train: Optional[torch.utils.data.DataLoader]
    loader_val: torch.utils.data.DataLoader
    mixup_fn: Optional[Mixup]
    classes: List[str]
    worker_seeder: Optional[WorkerSeeder] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle and seed the training workers for `epoch` (call before iterating)."""
        self.loader_train.sampler.set_epoch(epoch)
        self.worker_seeder.set_epoch(epoch)


class LoaderWorkerDiedError(DataError):
    """A data-loading worker process ended without an error of its own (e.g. killed by a
    signal)."""


@contextlib.contextmanager
def loader_worker_deaths_reported() -> Iterator[None]:
    """Turn PyTorch's report of a loader worker that died (a `RuntimeError` from the loader,
    'DataLoader worker (pid N) is killed by signal: Killed.' or '... exited unexpectedly')
    into a `LoaderWorkerDiedError`: the cause is outside the program (most often the system's
    out-of-memory killer), so the run ends with one line instead of a traceback."""
    def reports_a_worker_death(error: BaseException) -> bool:
        return isinstance(error, RuntimeError) and str(error).startswith('DataLoader worker (pid')

    try:
        yield
    except RuntimeError as error:
        if not reports_a_worker_death(error):
            raise
        while reports_a_worker_death(error.__cause__):  # the signal, where the loader saw it
            error = error.__cause__
        raise LoaderWorkerDiedError(
            f"a data-loading worker died: {str(error).strip().rstrip('.')}. If the system killed "
            f"it for memory, lower DATA.NUM_WORKERS or --batch-size; a training run resumes from "
            f"its last checkpoint") from None


def demo_data_path(config: CN) -> str:
    """Where the procedural demo dataset for this config lives."""
    demo = config.DATA.DEMO
    cache_root = demo.ROOT or os.path.join(REPO_ROOT, '.cache')
    return demo_dataset_dir(cache_root, demo.IMAGE_SIZE, demo.TRAIN_PER_CLASS,
                            demo.VAL_PER_CLASS)


def prepare_demo_data(config: CN) -> Tuple[str, bool]:
    """Write the demo dataset unless it is there, and return its path and whether this call
    wrote it. Every process calls it: one draws, the others wait for it (`write_demo_dataset`),
    also where processes on several machines have caches of their own."""
    root = demo_data_path(config)
    demo = config.DATA.DEMO
    written = write_demo_dataset(root, demo.IMAGE_SIZE, demo.TRAIN_PER_CLASS, demo.VAL_PER_CLASS,
                                 seed=config.SEED)
    return root, written


def build_dataset(is_train: bool, config: CN, data_path: str,
                  classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """The train or val split; `classes` (the training classes) fixes the class indices."""
    split = 'train' if is_train else 'val'
    if config.DATA.ZIP_MODE:
        samples, found = zip_samples(data_path, split)
        if classes is not None and len(found) > len(classes):
            raise DataError(f"{split}_map.txt uses class index {len(found) - 1} but there are "
                            f"only {len(classes)} training classes")
    else:
        samples, found = folder_samples(os.path.join(data_path, split), classes)
    return ImageDataset(samples, classes if classes is not None else found,
                        build_transform(is_train, config))


def shard_indices(num_samples: int, rank: int, world_size: int, equal_length: bool) -> range:
    stop = (num_samples // world_size) * world_size if equal_length else num_samples
    return range(rank, stop, world_size)


def data_path_of(config: CN) -> str:
    """`DATA.DATA_PATH`, or the demo dataset's folder when it is empty."""
    return config.DATA.DATA_PATH or demo_data_path(config)


def mixup_active(config: CN) -> bool:
    """Whether the config's AUG keys ask for mixup or cutmix (`build_loader` then gives a Mixup)."""
    aug = config.AUG
    return aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None


def build_loader(config: CN, rank: int = 0, world_size: int = 1, with_train: bool = True,
                 classes: Optional[Sequence[str]] = None) -> Loaders:
    """Datasets and loaders for `DATA.DATA_PATH` (the ImageNet layout, or its zip form with
    `DATA.ZIP_MODE`), or for the demo dataset, which `prepare_demo_data` must have written.

    Training shuffles with a `DistributedSampler`, or with `--cache-mode part` over the images
    this process cached. Validation gives each image to exactly one process (`ShardSampler`).
    In zip mode `DATA.CACHE_MODE` holds all training images ('full') or this process's shard
    ('part') in memory; the validation shard is cached unless the mode is 'no'. Mixup targets
    have one entry per training class (`Loaders.num_classes`). Without `with_train` only the
    validation side is built, so evaluation needs no training images.

    The training classes define the class indices and validation folders map onto them by
    name; without training data, `classes` (e.g. a checkpoint's) does, else the validation
    folders themselves. Training workers are seeded per epoch (`Loaders.set_epoch`).
    """
    data_path = data_path_of(config)
    if not os.path.isdir(data_path):
        raise DataError(f"data path not found: {data_path}")
    dataset_train = build_dataset(True, config, data_path) if with_train else None
    if dataset_train is not None:
        classes = dataset_train.classes
    dataset_val = build_dataset(False, config, data_path, classes)
    sampler_val = ShardSampler(len(dataset_val), rank, world_size)
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE != 'no':
        dataset_val.cache(sampler_val.indices)
    common = dict(batch_size=config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
                  pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
                  persistent_workers=config.DATA.NUM_WORKERS > 0)
    loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, drop_last=False, collate_fn=collate_eval, **common)
    if not with_train:
        return Loaders(None, dataset_val, None, loader_val, None, dataset_val.classes)

    cache_part = config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part'
    if cache_part:
        own_train = shard_indices(len(dataset_train), rank, world_size, equal_length=True)
        dataset_train.cache(own_train)
        sampler_train = ShardRandomSampler(own_train, seed=config.SEED)
    else:
        if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'full':
            dataset_train.cache(range(len(dataset_train)))
        sampler_train = torch.utils.data.DistributedSampler(
            dataset_train, num_replicas=world_size, rank=rank, shuffle=True, seed=config.SEED)
    worker_seeder = WorkerSeeder(config.SEED, rank)
    loader_train = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler_train, drop_last=True, collate_fn=collate_train,
        worker_init_fn=worker_seeder, **dict(common, persistent_workers=False))

    mixup_fn = None
    if mixup_active(config):
        aug = config.AUG
        mixup_fn = Mixup(
            mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
            prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
            label_smoothing=config.MODEL.LABEL_SMOOTHING,
            num_classes=len(dataset_train.classes))
    return Loaders(dataset_train, dataset_val, loader_train, loader_val, mixup_fn,
                   dataset_train.classes, worker_seeder)

