"""`build_scheduler(config, optimizer, steps_per_epoch, rates)`: the learning-rate schedule,
counted in optimizer steps (not epochs) so warm-up and decay are smooth within an epoch.

The schedule is a function of the config in force and the global step only, so a resumed run
rebuilds it (a checkpoint keeps no scheduler state): resumed with another batch size, number
of processes or `TRAIN.EPOCHS`, it follows the new values from the epoch it resumes at.
"""
from dataclasses import dataclass

from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer
from yacs.config import CfgNode as CN

# The config's learning rates are per this many images of one optimizer step.
REFERENCE_BATCH = 512


@dataclass(frozen=True)
class LearningRates:
    """`TRAIN.BASE_LR`, `WARMUP_LR` and `MIN_LR` scaled linearly from `REFERENCE_BATCH` images
    to `total_batch`, the images of one optimizer step (batch per process x processes x
    accumulation steps), as in the paper's recipe. Derived by the run, never written back into
    the config: rerunning from a saved config scales once."""
    base: float
    warmup: float
    min: float
    total_batch: int


def scaled_learning_rates(config: CN, total_batch: int) -> LearningRates:
    factor = total_batch / REFERENCE_BATCH
    train = config.TRAIN
    return LearningRates(base=train.BASE_LR * factor, warmup=train.WARMUP_LR * factor,
                         min=train.MIN_LR * factor, total_batch=total_batch)


def build_scheduler(config: CN, optimizer: Optimizer, steps_per_epoch: int,
                    rates: LearningRates) -> Scheduler:
    """Linear warm-up from `rates.warmup` over `TRAIN.WARMUP_EPOCHS`, then cosine decay to
    `rates.min` at the last step ('cosine'; see `LR_SCHEDULER.WARMUP_PREFIX`), linear decay
    ('linear') or step decay by `DECAY_RATE` every `DECAY_EPOCHS` ('step'), from the
    optimizer's rate (`rates.base`). Call `step_update(global_step)` after each optimizer step,
    and once with the first global step of a resumed run before it trains."""
    train = config.TRAIN
    total_steps = int(train.EPOCHS * steps_per_epoch)
    warmup_steps = int(train.WARMUP_EPOCHS * steps_per_epoch)
    warmup_prefix = train.LR_SCHEDULER.WARMUP_PREFIX
    if warmup_prefix:
        total_steps -= warmup_steps
    common = dict(warmup_lr_init=rates.warmup, warmup_t=warmup_steps,
                  warmup_prefix=warmup_prefix, t_in_epochs=False)
    name = train.LR_SCHEDULER.NAME
    if name == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=rates.min,
                                 cycle_limit=1, **common)
    if name == 'linear':
        return PolyLRScheduler(optimizer, t_initial=total_steps, power=1.0, lr_min=rates.min,
                               cycle_limit=1, **common)
    return StepLRScheduler(optimizer, decay_t=int(train.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch),
                           decay_rate=train.LR_SCHEDULER.DECAY_RATE, **common)
