"""Where a training run starts: the newest training state of its run folder (or MODEL.RESUME)
restored into the training components, best.pth made to hold the best epoch so far, and a
refusal to start over an earlier run.

What a folder holds is never rolled back silently: a run resumes from the newest state it can
use (best.pth included, which is a full training state), and one that would start afresh in a
folder holding an earlier run's checkpoints or records stops with an error instead.
"""
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from yacs.config import CfgNode as CN

from checkpoint import (BEST_CHECKPOINT, CheckpointError, SavedStates, TrainingParts,
                        epoch_checkpoint_name, find_saved_states, read_training_state,
                        restore_training)
from run_outputs import RunOutputs
from utils import UserError


class EarlierRunError(UserError):
    """A run would start over the checkpoints or records of an earlier run in its folder."""


@dataclass
class Progress:
    """Where training stands: `start_epoch` is the next epoch to train; `max_accuracy` and
    `best_epoch` are the validation top-1 of the model best.pth holds and its epoch (0.0 and
    None before there is one): only a better epoch replaces best.pth."""
    start_epoch: int = 0
    max_accuracy: float = 0.0
    best_epoch: Optional[int] = None


def flatten(config: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """A nested config dict as {'TRAIN.EPOCHS': 300, ...}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def log_changes(logger: logging.Logger, path: str, checkpoint: Dict[str, Any],
                config: Dict[str, Any], derived: Dict[str, Any]) -> None:
    """Log how the config in force and the values derived from it differ from those `path`
    was trained with: the schedule follows the new ones from here on."""
    before = checkpoint.get('derived')
    if not isinstance(before, dict) or not isinstance(checkpoint.get('config'), dict):
        return  # saved by an older version, whose config held scaled rates
    old, new = flatten(checkpoint['config']), flatten(config)
    changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key)]
    if changed:
        logger.info(f"config changed since {path}: {', '.join(changed)}")
    if before.get('total_batch') != derived['total_batch']:
        logger.info(
            f"total batch changed from {before.get('total_batch')} to {derived['total_batch']} "
            f"images per optimizer step ({derived['processes']} processes x "
            f"{config['DATA']['BATCH_SIZE']} x {derived['accumulation_steps']} accumulation "
            f"steps): the learning rates follow it, base {derived['TRAIN.BASE_LR']:.3e} (was "
            f"{before.get('TRAIN.BASE_LR', float('nan')):.3e}), over "
            f"{derived['steps_per_epoch']} steps per epoch (were {before.get('steps_per_epoch')})")
    old_epochs, new_epochs = old.get('TRAIN.EPOCHS'), new.get('TRAIN.EPOCHS')
    if old_epochs != new_epochs:
        logger.info(f"TRAIN.EPOCHS changed from {old_epochs} to {new_epochs}: the schedule "
                    f"now spans {new_epochs} epochs")


def refuse_starting_over(outputs: RunOutputs, saved: SavedStates, start_epoch: int,
                         auto_resume: bool) -> None:
    """Stop a run that does not continue its folder's newest state when the folder holds
    checkpoints, or training records beyond `start_epoch` (a record of `start_epoch` itself is
    what a run killed before saving that epoch leaves)."""
    later = [epoch for epoch in outputs.training_record_epochs() if epoch > start_epoch]
    if not saved.files and not later:
        return
    held = list(saved.files)
    if later:
        held.append(f"metrics.jsonl records up to epoch {later[-1]}")
    if saved.newest is not None and not auto_resume:
        why = 'TRAIN.AUTO_RESUME is False'
    elif saved.files:
        why = 'none of its checkpoints can be used (see the warnings above)'
    else:
        why = 'its checkpoints are gone'
    raise EarlierRunError(
        f"run folder {outputs.folder} holds an earlier run ({', '.join(held)}) that this run "
        f"would start over, as {why}: train under another --tag, or move those files away")


def describe_best(best: Optional[Dict[str, Any]]) -> str:
    if best is None:
        return 'is missing or unusable'
    return f"holds epoch {best['epoch']} (Acc@1 {best['max_accuracy']:.2f}%)"


def reconcile_best(outputs: RunOutputs, saved: SavedStates, progress: Progress,
                   resumed_path: str, resumed_epoch: int, logger: logging.Logger) -> None:
    """Make best.pth hold the best epoch the resumed state records. A kill between an epoch's
    checkpoint and its best.pth leaves an older best.pth (or none): it is rewritten from that
    epoch's checkpoint. A best.pth at least as good is kept; and where the best epoch's
    checkpoint is gone, `progress` takes what best.pth holds. Either way only an epoch better
    than best.pth replaces it."""
    held = saved.best
    if held is not None and (held['epoch'] == progress.best_epoch
                             or float(held['max_accuracy'] or 0.0) >= progress.max_accuracy):
        if held['epoch'] != progress.best_epoch and progress.best_epoch is not None:
            logger.warning(f"best.pth {describe_best(held)}, at least as good as what {resumed_path} "
                           f"records (epoch {progress.best_epoch}): kept")
        progress.max_accuracy, progress.best_epoch = float(held['max_accuracy'] or 0.0), held['epoch']
        return
    if progress.best_epoch is None and progress.max_accuracy <= 0.0:
        return  # nothing evaluated yet
    source = resumed_path if resumed_epoch == progress.best_epoch else None
    if source is None and progress.best_epoch is not None:
        candidate = os.path.join(outputs.folder, epoch_checkpoint_name(progress.best_epoch))
        try:
            if read_training_state(candidate)['epoch'] == progress.best_epoch:
                source = candidate
        except CheckpointError:
            pass
    epoch = f"epoch {progress.best_epoch}, " if progress.best_epoch is not None else ''
    best = f"the best so far ({epoch}Acc@1 {progress.max_accuracy:.2f}%)"
    if source is not None:
        outputs.copy_checkpoint(source, BEST_CHECKPOINT)
        logger.warning(f"best.pth {describe_best(held)}, not {best}: rewrote it from {source}")
        return
    logger.warning(f"{best} has no usable checkpoint left and best.pth {describe_best(held)}: "
                   f"only an epoch better than best.pth replaces it")
    progress.max_accuracy, progress.best_epoch = \
        (float(held['max_accuracy'] or 0.0), held['epoch']) if held is not None else (0.0, None)


def resume_training(outputs: RunOutputs, config: CN, parts: TrainingParts,
                    classes: Optional[List[str]], record: Dict[str, Any],
                    derived: Dict[str, Any], logger: logging.Logger) -> Progress:
    """Restore `parts` from the newest usable training state of the run folder (with
    `TRAIN.AUTO_RESUME`), else from `MODEL.RESUME`, else start at `TRAIN.START_EPOCH`; return
    the progress to continue from. `record` and `derived` are the config in force (as saved)
    and the values the run derived from it, compared with the checkpoint's in the log."""
    saved = find_saved_states(outputs.folder)
    for reason in saved.unusable:
        logger.warning(f"skipping {reason}")
    if config.TRAIN.AUTO_RESUME and saved.newest is not None:
        path, checkpoint = saved.newest
    elif config.MODEL.RESUME:
        path = config.MODEL.RESUME
        checkpoint = read_training_state(path)
        refuse_starting_over(outputs, saved, checkpoint['epoch'] + 1, config.TRAIN.AUTO_RESUME)
    else:
        refuse_starting_over(outputs, saved, config.TRAIN.START_EPOCH, config.TRAIN.AUTO_RESUME)
        return Progress(start_epoch=config.TRAIN.START_EPOCH)
    restore_training(checkpoint, path, parts, classes)
    progress = Progress(start_epoch=checkpoint['epoch'] + 1,
                        max_accuracy=float(checkpoint.get('max_accuracy') or 0.0),
                        best_epoch=checkpoint.get('best_epoch'))
    log_changes(logger, path, checkpoint, record, derived)
    reconcile_best(outputs, saved, progress, path, checkpoint['epoch'], logger)
    logger.info(f"resumed from {path}: continuing at epoch {progress.start_epoch}, best Acc@1 "
                f"so far {progress.max_accuracy:.2f}%")
    return progress
