"""Checkpoint files: atomic saving, finding the newest one to resume from, and loading weights
for resuming, evaluation or fine-tuning.

A checkpoint is a dict of tensors and plain Python data only (`torch.load(...,
weights_only=True)` reads it): 'model', 'optimizer', 'lr_scheduler', 'scaler', 'ema' (or None),
'epoch' (the last finished one), 'max_accuracy' and 'config' (nested dicts).
"""
import logging
import os
import pickle
import re
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from models import FocalTransformer, checkpoint_filter_fn, unwrap_state_dict
from utils import UserError

EPOCH_CHECKPOINT = re.compile(r'^ckpt_epoch_(\d+)\.pth$')
BEST_CHECKPOINT = 'best.pth'

logger = logging.getLogger('focal')


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or for another model."""


def epoch_checkpoint_name(epoch: int) -> str:
    return f'ckpt_epoch_{epoch}.pth'


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write `state` to `path` through a temporary file and a rename, so that `path` is either
    the previous complete checkpoint or the new complete one, never a partial file."""
    tmp_path = f'{path}.tmp.{os.getpid()}'
    with open(tmp_path, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True`; clear errors for a missing or
    unreadable file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        if 'Weights only load failed' not in str(error):
            raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
        raise CheckpointError(
            f"checkpoint {path} holds Python objects besides weights (the official code saves its "
            f"yacs config in training checkpoints), which are not loaded unpickled; if you trust "
            f"the file, extract its weights: python scripts/convert_checkpoint.py {path} "
            f"WEIGHTS.pth") from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, "
                              f"not a dict of weights")
    return checkpoint


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest readable `ckpt_epoch_N.pth` in `run_dir`, or None. An unreadable newest file
    (e.g. copied in half) is reported and the next older one is tried."""
    if not os.path.isdir(run_dir):
        return None
    epochs = sorted((int(match.group(1)) for match in map(EPOCH_CHECKPOINT.match, os.listdir(run_dir))
                     if match), reverse=True)
    for epoch in epochs:
        path = os.path.join(run_dir, epoch_checkpoint_name(epoch))
        try:
            read_checkpoint(path)
        except CheckpointError as error:
            logger.warning(f"skipping {error}")
            continue
        return path
    return None


def training_state(model: nn.Module, optimizer, scheduler, scaler, ema, epoch: int,
                   max_accuracy: float, config: dict) -> Dict[str, Any]:
    """Everything needed to continue a run after `epoch` (`config` as plain data)."""
    return {
        'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
        'lr_scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict() if scaler is not None else None,
        'ema': ema.module.state_dict() if ema is not None else None,
        'epoch': epoch, 'max_accuracy': max_accuracy, 'config': config,
    }


def restore_training(path: str, model: nn.Module, optimizer, scheduler, scaler,
                     ema) -> Tuple[int, float]:
    """Load a `training_state` checkpoint into every training component; returns the epoch to
    start at and the best accuracy so far. An EMA missing from the checkpoint starts from the
    loaded weights."""
    checkpoint = read_checkpoint(path)
    if 'optimizer' not in checkpoint or 'epoch' not in checkpoint:
        raise CheckpointError(f"{path} holds weights only, not a training state: use "
                              f"--pretrained to start from it, or --eval to evaluate it")
    load_weights(model, checkpoint['model'], path)
    optimizer.load_state_dict(checkpoint['optimizer'])
    scheduler.load_state_dict(checkpoint['lr_scheduler'])
    if scaler is not None and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    if ema is not None:
        ema.module.load_state_dict(checkpoint.get('ema') or model.state_dict())
    return checkpoint['epoch'] + 1, float(checkpoint.get('max_accuracy', 0.0))


def model_weights(checkpoint: Dict[str, Any], model: nn.Module, path: str) -> Dict[str, torch.Tensor]:
    """The state dict in `checkpoint` (ours, an official release, or bare) made to fit `model`:
    through `models.checkpoint_filter_fn` for a FocalTransformer, as stored otherwise."""
    if isinstance(model, FocalTransformer):
        try:
            return checkpoint_filter_fn(checkpoint, model)
        except ValueError as error:
            raise CheckpointError(f"checkpoint {path} does not fit this FocalTransformer "
                                  f"(another architecture?): {error}") from None
    return unwrap_state_dict(checkpoint)


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str,
                 strict: bool = True) -> None:
    """`model.load_state_dict` with a one-line error naming the file and the first keys that
    do not fit."""
    try:
        result = model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        detail = ' '.join(str(error).split())[:300]
        raise CheckpointError(f"checkpoint {path} does not fit the model "
                              f"(another architecture?): {detail}") from None
    if not strict and (result.missing_keys or result.unexpected_keys):
        logger.info(f"{path}: kept initial values for {result.missing_keys}, "
                    f"ignored {result.unexpected_keys}")


def load_for_evaluation(path: str, model: nn.Module) -> Dict[str, Any]:
    """Load the weights of `path` (ours or a released one) into `model`; returns the raw
    checkpoint for its other entries (e.g. 'ema')."""
    checkpoint = read_checkpoint(path)
    load_weights(model, model_weights(checkpoint, model, path), path)
    return checkpoint


def load_pretrained(path: str, model: nn.Module) -> None:
    """Start from the weights of `path`: position tables and embeddings are resized and a head
    of another class count re-initialised (FocalTransformer's checkpoint filter); for other
    models, tensors whose shape differs are left at their initial values."""
    checkpoint = read_checkpoint(path)
    weights = model_weights(checkpoint, model, path)
    if isinstance(model, FocalTransformer):
        load_weights(model, weights, path)
        return
    own = model.state_dict()
    fitting = {name: value for name, value in weights.items()
               if name in own and own[name].shape == value.shape}
    if not fitting:
        raise CheckpointError(f"checkpoint {path} shares no weights with the model "
                              f"(another architecture?)")
    load_weights(model, fitting, path, strict=False)
