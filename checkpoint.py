"""Checkpoint files: atomic saving, finding the newest one to resume from, and loading weights
for resuming, evaluation or fine-tuning.

A checkpoint is a dict of tensors and plain Python data only (`torch.load(...,
weights_only=True)` reads it): 'model', 'optimizer', 'lr_scheduler', 'scaler', 'ema' (or None),
'epoch' (the last finished one), 'max_accuracy' and 'config' (nested dicts).
"""
import errno
import logging
import os
import pickle
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

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


def tensor_bytes(value: Any) -> int:
    """Bytes of all tensors in a nest of dicts and lists: about the size of its checkpoint."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write `state` to `path` through a temporary file and a rename, so that `path` is either
    the previous complete checkpoint or the new complete one, never a partial file. A failed
    write removes its temporary file; a full disk is a `CheckpointError` saying how much space
    the checkpoint needs."""
    tmp_path = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = os.path.dirname(os.path.abspath(path))
            needed_mb = tensor_bytes(state) / 2**20
            free_mb = shutil.disk_usage(folder).free / 2**20
            raise CheckpointError(
                f"no space left to save {os.path.basename(path)} in {folder}: it needs about "
                f"{needed_mb:.0f} MB, {free_mb:.0f} MB are free; older checkpoints are intact, "
                f"free some space and rerun to resume") from None
        raise


def non_finite_entries(state: Dict[str, Any]) -> List[str]:
    """Names of the floating-point tensors in the 'model', 'optimizer' and 'ema' entries of a
    `training_state` that hold NaN or infinity (a diverged run must not be saved)."""
    found = []

    def visit(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f'{name}.{key}')
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f'{name}.{index}')

    for entry in ('model', 'optimizer', 'ema'):
        visit(state.get(entry), entry)
    return found


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True`; clear errors for a missing or
    unreadable file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not looks_like_torch_file(path):
        raise CheckpointError(f"{path} is not a checkpoint: torch.save writes a zip archive "
                              f"(or, before PyTorch 1.6, a pickle) and this file starts as neither")
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


def looks_like_torch_file(path: str) -> bool:
    """Whether `path` starts like a file of `torch.save`: a zip archive (its first local file
    header), or the legacy format, which begins with a pickle protocol 2+ header (0x80). A
    truncated checkpoint still starts right and gets torch's own error."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head == b'PK\x03\x04' or head[:1] == b'\x80'


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
                   max_accuracy: float, config: dict,
                   classes: Optional[List[str]] = None) -> Dict[str, Any]:
    """Everything needed to continue a run after `epoch` (`config` as plain data), and the
    class names in the order of the head's outputs."""
    return {
        'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
        'lr_scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict() if scaler is not None else None,
        'ema': ema.module.state_dict() if ema is not None else None,
        'epoch': epoch, 'max_accuracy': max_accuracy, 'config': config, 'classes': classes,
    }


def restore_training(path: str, model: nn.Module, optimizer, scheduler, scaler, ema,
                     classes: Optional[List[str]] = None) -> Tuple[int, float]:
    """Load a `training_state` checkpoint into every training component; returns the epoch to
    start at and the best accuracy so far. An EMA missing from the checkpoint starts from the
    loaded weights. A checkpoint trained on other classes than `classes` is refused."""
    checkpoint = read_checkpoint(path)
    if 'optimizer' not in checkpoint or 'epoch' not in checkpoint:
        raise CheckpointError(f"{path} holds weights only, not a training state: use "
                              f"--pretrained to start from it, or --eval to evaluate it")
    trained_classes = checkpoint.get('classes')
    if classes is not None and trained_classes is not None \
            and list(trained_classes) != list(classes):
        differing = sorted(set(trained_classes) ^ set(classes))[:5] or ['(their order)']
        raise CheckpointError(
            f"{path} was trained on {len(trained_classes)} classes, the training data has "
            f"{len(classes)}, differing in {', '.join(differing)}: resume it on its own data, "
            f"or start a new run (another --tag) with --pretrained {path}")
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


def classifier_rows(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[int]:
    """The output count of the classifier (`model.get_classifier()`) as stored in
    `state_dict`, or None when it holds no such weight."""
    classifier = model.get_classifier()
    name = next((name for name, module in model.named_modules() if module is classifier), None)
    weight = state_dict.get(f'{name}.weight') if name is not None else None
    return weight.shape[0] if weight is not None and weight.ndim == 2 else None


def load_for_evaluation(path: str, model: nn.Module,
                        checkpoint: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load the weights of `path` (ours or a released one, already read as `checkpoint` if
    given) into `model`; returns the raw checkpoint for its other entries (e.g. 'ema'). A head
    for another number of classes than the model's is an error: a replaced head would give a
    meaningless accuracy."""
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    trained = classifier_rows(unwrap_state_dict(checkpoint), model)
    expected = classifier_rows(model.state_dict(), model)
    if trained is not None and trained != expected:
        raise CheckpointError(
            f"checkpoint {path} has a head for {trained} classes but the validation data has "
            f"{expected}: evaluate it on the classes it was trained on")
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
