"""`build_scheduler(config, optimizer, steps_per_epoch)`: the learning-rate schedule, counted in
optimizer steps (not epochs) so warm-up and decay are smooth within an epoch."""
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer
from yacs.config import CfgNode as CN


def build_scheduler(config: CN, optimizer: Optimizer, steps_per_epoch: int) -> Scheduler:
    """Linear warm-up from `TRAIN.WARMUP_LR` over `TRAIN.WARMUP_EPOCHS`, then cosine decay to
    `TRAIN.MIN_LR` at the last step ('cosine'; see `LR_SCHEDULER.WARMUP_PREFIX`), linear decay
    ('linear') or step decay by `DECAY_RATE` every `DECAY_EPOCHS` ('step'). Call
    `step_update(global_step)` after each optimizer step."""
    train = config.TRAIN
    total_steps = int(train.EPOCHS * steps_per_epoch)
    warmup_steps = int(train.WARMUP_EPOCHS * steps_per_epoch)
    warmup_prefix = train.LR_SCHEDULER.WARMUP_PREFIX
    if warmup_prefix:
        total_steps -= warmup_steps
    common = dict(warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps,
                  warmup_prefix=warmup_prefix, t_in_epochs=False)
    name = train.LR_SCHEDULER.NAME
    if name == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=train.MIN_LR,
                                 cycle_limit=1, **common)
    if name == 'linear':
        return PolyLRScheduler(optimizer, t_initial=total_steps, power=1.0, lr_min=train.MIN_LR,
                               cycle_limit=1, **common)
    return StepLRScheduler(optimizer, decay_t=int(train.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch),
                           decay_rate=train.LR_SCHEDULER.DECAY_RATE, **common)
