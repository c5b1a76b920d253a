"""Checkpoint files: atomic saving, finding the newest training state to resume from, and
loading weights in two ways: exactly, for resuming, evaluation and export (`exact_weights`), or
adapted to another model, for fine-tuning (`load_pretrained`).

A training checkpoint is a dict of tensors and plain Python data only (`torch.load(...,
weights_only=True)` reads it): 'model', 'optimizer', 'scaler', 'ema' (or None), 'epoch' (the
last finished one), 'max_accuracy' and 'best_epoch' (the best validation top-1 so far and its
epoch: what best.pth holds), 'config' (the run's config as given, nested dicts), 'derived' (the
values the run derived from it: scaled learning rates, class count, total batch, steps per
epoch) and 'classes'. It holds no scheduler state: the schedule follows the config in force.
'format_version' (`FORMAT_VERSION`) says which layout this is; a file without it is of the layout
before versions were recorded, read as before, and one of a newer version is refused.
"""
import errno
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from models import FocalTransformer, checkpoint_filter_fn, unwrap_state_dict
from models.focal_attention import selection_state_from_official
from models.focal_transformer import is_selection_buffer
from utils import UserError

EPOCH_CHECKPOINT = re.compile(r'^ckpt_epoch_(\d+)\.pth$')
BEST_CHECKPOINT = 'best.pth'
# The layout of the training states `training_state` writes: raise it when the layout changes, and
# read the files of each earlier version (none: written before it was recorded) as they are.
FORMAT_VERSION = 1

logger = logging.getLogger('focal')


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, damaged or for another model."""


class NewerFormatError(UserError):
    """A checkpoint of a newer `FORMAT_VERSION` than this code knows. Not a `CheckpointError`:
    resuming does not skip it for an older checkpoint, which would roll its run back."""


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


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Run `write` on a temporary file next to `path`, then rename it to `path`, so that `path`
    is either the previous complete file or the new complete one, never a partial file. A
    failed write removes its temporary file."""
    tmp_path = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp_path, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """`torch.save(state)` to `path` through `write_atomically`. A full disk is a
    `CheckpointError` saying how much space the checkpoint needs."""
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        needed_mb = tensor_bytes(state) / 2**20
        free_mb = shutil.disk_usage(folder).free / 2**20
        raise CheckpointError(
            f"no space left to save {os.path.basename(path)} in {folder}: it needs about "
            f"{needed_mb:.0f} MB, {free_mb:.0f} MB are free; older checkpoints are intact, "
            f"free some space and rerun to resume") from None


def copy_checkpoint(source: str, path: str) -> None:
    """Copy the checkpoint file `source` to `path` through `write_atomically`."""
    def copy(f: BinaryIO) -> None:
        with open(source, 'rb') as original:
            shutil.copyfileobj(original, f)
    write_atomically(path, copy)


def non_finite_tensors(value: Any, name: str = '') -> List[str]:
    """Dotted names of the floating-point tensors in a nest of dicts and lists that hold NaN
    or infinity (e.g. 'optimizer.state.3.exp_avg')."""
    if isinstance(value, torch.Tensor):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return [] if finite else [name]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [found for key, item in items
            for found in non_finite_tensors(item, f'{name}.{key}' if name else str(key))]


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True`; clear errors for a missing,
    unreadable or damaged file, and for one of a newer format version. A checkpoint with NaN or
    infinite values is damaged (training never saves one): it is refused here, naming them,
    whatever reads it."""
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
            f"checkpoint {path} holds Python objects besides weights (a whole model saved with "
            f"torch.save(model), or the official code's training checkpoints, which keep their "
            f"yacs config), which are not loaded unpickled; if you trust the file, extract its "
            f"weights: python scripts/convert_checkpoint.py {path} WEIGHTS.pth") from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, "
                              f"not a dict of weights")
    version = checkpoint.get('format_version', 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NewerFormatError(f"checkpoint {path} has format version {version!r}, of a later "
                               f"version of this code, which reads versions up to {FORMAT_VERSION}: "
                               f"update the code to read it")
    non_finite = non_finite_tensors(checkpoint)
    if non_finite:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {len(non_finite)} of its tensors hold NaN or "
            f"infinite values (e.g. {', '.join(non_finite[:3])}); use another checkpoint")
    return checkpoint


def looks_like_torch_file(path: str) -> bool:
    """Whether `path` starts like a file of `torch.save`: a zip archive (its first local file
    header), or the legacy format, which begins with a pickle protocol 2+ header (0x80). A
    truncated checkpoint still starts right and gets torch's own error."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head == b'PK\x03\x04' or head[:1] == b'\x80'


def read_training_state(path: str) -> Dict[str, Any]:
    """`read_checkpoint`, refusing a file that holds weights only."""
    checkpoint = read_checkpoint(path)
    if 'optimizer' not in checkpoint or not isinstance(checkpoint.get('epoch'), int):
        raise CheckpointError(f"{path} holds weights only, not a training state: use "
                              f"--pretrained to start from it, or --eval to evaluate it")
    return checkpoint


@dataclass
class SavedStates:
    """The checkpoints of a run folder.

    newest: the newest usable training state, (path, contents): the `ckpt_epoch_N.pth` of the
        highest N, or best.pth when it is newer (its epoch's checkpoint skipped by `SAVE_FREQ`,
        or every epoch checkpoint since lost); None when there is none.
    best: 'epoch', 'max_accuracy' and 'best_epoch' of best.pth; None when missing or unusable.
    files: the names of all checkpoint files present, usable or not.
    unusable: why each file that could not be used was skipped (one line each).
    """
    newest: Optional[Tuple[str, Dict[str, Any]]]
    best: Optional[Dict[str, Any]]
    files: List[str]
    unusable: List[str]


def find_saved_states(run_dir: str) -> SavedStates:
    """Read the checkpoints of `run_dir` newest first until one is usable (unreadable,
    truncated or damaged files are skipped), and best.pth."""
    if not os.path.isdir(run_dir):
        return SavedStates(None, None, [], [])
    epochs = sorted((int(match.group(1)) for match in map(EPOCH_CHECKPOINT.match, os.listdir(run_dir))
                     if match), reverse=True)
    best_path = os.path.join(run_dir, BEST_CHECKPOINT)
    files = [epoch_checkpoint_name(epoch) for epoch in epochs]
    unusable = []
    best_state = None
    if os.path.isfile(best_path):
        files.append(BEST_CHECKPOINT)
        try:
            best_state = read_training_state(best_path)
        except CheckpointError as error:
            unusable.append(str(error))
    newest = None
    for epoch in epochs:
        if best_state is not None and best_state['epoch'] > epoch:
            break
        path = os.path.join(run_dir, epoch_checkpoint_name(epoch))
        try:
            newest = (path, read_training_state(path))
            break
        except CheckpointError as error:
            unusable.append(str(error))
    if newest is None and best_state is not None:
        newest = (best_path, best_state)
    best = {key: best_state.get(key) for key in ('epoch', 'max_accuracy', 'best_epoch')} \
        if best_state is not None else None
    return SavedStates(newest, best, files, unusable)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The path of the newest usable training state in `run_dir` (see `find_saved_states`),
    or None; files skipped on the way are logged."""
    saved = find_saved_states(run_dir)
    for reason in saved.unusable:
        logger.warning(f"skipping {reason}")
    return saved.newest[0] if saved.newest else None


@dataclass
class TrainingParts:
    """What a training checkpoint saves and restores besides the progress counters."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[nn.Module] = None  # timm ModelEmaV3: the averaged weights are `ema.module`


def training_state(parts: TrainingParts, epoch: int, max_accuracy: float,
                   best_epoch: Optional[int], config: dict, derived: dict,
                   classes: Optional[List[str]] = None) -> Dict[str, Any]:
    """Everything needed to continue a run after `epoch`: `config` as plain data (as given:
    what config.yaml holds), `derived` the values the run derived from it, and the class names
    in the order of the head's outputs."""
    return {
        'model': parts.model.state_dict(), 'optimizer': parts.optimizer.state_dict(),
        'scaler': parts.scaler.state_dict() if parts.scaler is not None else None,
        'ema': parts.ema.module.state_dict() if parts.ema is not None else None,
        'epoch': epoch, 'max_accuracy': max_accuracy, 'best_epoch': best_epoch,
        'config': config, 'derived': derived, 'classes': classes, 'format_version': FORMAT_VERSION,
    }


def restore_training(checkpoint: Dict[str, Any], path: str, parts: TrainingParts,
                     classes: Optional[List[str]] = None) -> None:
    """Load the `training_state` `checkpoint` (read from `path`) into `parts`.

    The optimizer gets its per-parameter state (moments, step counts) back, but keeps the
    hyperparameters it was built with from the config in force (learning rate, weight decay,
    betas): the schedule then sets the rate of each step. An EMA missing from the checkpoint
    starts from the loaded weights. A checkpoint trained on other classes than `classes` is
    refused.
    """
    trained_classes = checkpoint.get('classes')
    if classes is not None and trained_classes is not None \
            and list(trained_classes) != list(classes):
        differing = sorted(set(trained_classes) ^ set(classes))[:5] or ['(their order)']
        raise CheckpointError(
            f"{path} was trained on {len(trained_classes)} classes, the training data has "
            f"{len(classes)}, differing in {', '.join(differing)}: resume it on its own data, "
            f"or start a new run (another --tag) with --pretrained {path}")
    load_exactly(parts.model, checkpoint['model'], path)
    optimizer = parts.optimizer
    hyperparameters = [{key: value for key, value in group.items() if key != 'params'}
                       for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"the optimizer state in {path} does not fit this model's "
                              f"parameters (another architecture?): {error}") from None
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)
    if parts.scaler is not None and checkpoint.get('scaler'):
        parts.scaler.load_state_dict(checkpoint['scaler'])
    if parts.ema is not None:
        load_exactly(parts.ema.module, checkpoint.get('ema') or parts.model.state_dict(), path)


def model_weights(checkpoint: Dict[str, Any], model: nn.Module, path: str) -> Dict[str, torch.Tensor]:
    """The state dict in `checkpoint` (ours, an official release, or bare) adapted to `model` for
    fine-tuning: through `models.checkpoint_filter_fn` for a FocalTransformer, as stored otherwise."""
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
        logger.warning(f"{path}: kept initial values for {result.missing_keys}, "
                       f"ignored {result.unexpected_keys}")


def is_derived_buffer(name: str, value: torch.Tensor) -> bool:
    """Whether a tensor a file holds beyond the model is one that models derive from their
    geometry instead of learning: an integer index table or an attention mask (the official
    releases store `relative_position_index`, `valid_ind_rolled` and `attn_mask`, which ours
    recompute)."""
    return not value.is_floating_point() or name.rsplit('.', 1)[-1].endswith('mask')


def first_names(names: List[str], shown: int = 4) -> str:
    return ', '.join(names[:shown]) + (f' ... ({len(names)} in all)' if len(names) > shown else '')


def exact_weights(checkpoint: Dict[str, Any], model: nn.Module, path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of `model.state_dict()` as `checkpoint` holds it (under 'model' or
    'state_dict', or bare; `module.` prefixes removed), with the model's shape; else a
    `CheckpointError` listing what is missing, of another shape, or beyond the model.

    Evaluation, resuming and export use this: they measure, continue or ship the weights as
    trained, and a head left at its initialisation or a resized position table would make up
    their result. Fine-tuning adapts instead (`load_pretrained`). Works for any model: it
    compares names and shapes only. Official Focal-fast files are read in this model's form
    (`selection_state_from_official`, lossless); a Focal-fast key selection made for another
    input size than the model's is not learned state: the model keeps the one it computed for its
    size (what a model built at the file's size computes at this size)."""
    weights = selection_state_from_official(unwrap_state_dict(checkpoint))
    own = model.state_dict()
    for name in filter(is_selection_buffer, own):
        if name not in weights or weights[name].shape != own[name].shape:
            logger.info(f"checkpoint {path}: {name} selects keys for another input size: using the "
                        f"selection this model computed for its size")
            weights[name] = own[name]
    missing = [name for name in own if name not in weights]
    differing = [f"{name} {tuple(weights[name].shape)} -> {tuple(value.shape)}"
                 for name, value in own.items() if name in weights and weights[name].shape != value.shape]
    beyond = [name for name, value in weights.items()
              if name not in own and not is_derived_buffer(name, value)]
    if missing or differing or beyond:
        found = (('missing', missing), ('shape differs (file -> model):', differing),
                 ('not in the model:', beyond))
        problems = '; '.join(f'{title} {first_names(names)}' for title, names in found if names)
        raise CheckpointError(
            f"checkpoint {path} does not fit this {type(model).__name__} exactly: {problems}. "
            f"Evaluating, resuming and exporting take every weight as trained: use the config it "
            f"was trained with, or fine-tune from it (main.py --pretrained {path})")
    return {name: weights[name] for name in own}


def load_exactly(model: nn.Module, checkpoint: Dict[str, Any], path: str) -> None:
    """Load `exact_weights(checkpoint, model, path)` into `model`."""
    model.load_state_dict(exact_weights(checkpoint, model, path), strict=True)


def classifier_rows(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[int]:
    """The output count of the classifier (`model.get_classifier()`) as stored in
    `state_dict`, or None when it holds no such weight."""
    classifier = model.get_classifier()
    name = next((name for name, module in model.named_modules() if module is classifier), None)
    weight = state_dict.get(f'{name}.weight') if name is not None else None
    return weight.shape[0] if weight is not None and weight.ndim == 2 else None


def load_for_evaluation(path: str, model: nn.Module, checkpoint: Optional[Dict[str, Any]] = None,
                        ema: bool = False) -> None:
    """Load the weights of `path` (ours or a released one, already read as `checkpoint` if
    given) into `model` exactly (`exact_weights`); with `ema`, the EMA weights it holds. A head
    for another number of classes than the model's gets its own error: the validation data
    has other classes than the checkpoint was trained on."""
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    if ema and not checkpoint.get('ema'):
        raise CheckpointError(f"checkpoint {path} holds no EMA weights (its run trained without "
                              f"--model-ema): evaluate its model weights, without --model-ema")
    weights = checkpoint['ema'] if ema else checkpoint
    trained = classifier_rows(unwrap_state_dict(weights), model)
    expected = classifier_rows(model.state_dict(), model)
    if trained is not None and trained != expected:
        raise CheckpointError(
            f"checkpoint {path} has a head for {trained} classes but the validation data has "
            f"{expected}: evaluate it on the classes it was trained on")
    load_exactly(model, weights, path)


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
