"""yacs configuration: the official Focal Transformer keys, our additions, YAML loading with
`BASE:` inheritance, command-line overrides and validation.

`get_config(args)` returns a frozen CfgNode. YAML files written for the official repository load
unchanged; an unknown key or a bad value raises `ConfigError` naming the key.
"""
import argparse
import os
from typing import Any, Optional, Sequence

import timm
import yaml
from yacs.config import CfgNode as CN

from models.focal_attention import ATTN_BACKENDS
from utils import UserError

_C = CN()

# Base config files, relative to the file that names them; later files override earlier ones.
_C.BASE = ['']

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size per process; --batch-size overrides it.
_C.DATA.BATCH_SIZE = 128
# ImageNet-style root with train/ and val/ (or train.zip, val.zip and their map files with
# --zip). Empty: the procedural demo dataset under DATA.DEMO.ROOT.
_C.DATA.DATA_PATH = ''
# Official: accepted for compatibility, unused (the data is whatever DATA_PATH holds).
_C.DATA.DATASET = 'imagenet'
_C.DATA.IMG_SIZE = 224
# Resize interpolation: random, bilinear or bicubic.
_C.DATA.INTERPOLATION = 'bicubic'
# Per-channel (RGB) normalisation of training and evaluation images; default: ImageNet's.
_C.DATA.MEAN = (0.485, 0.456, 0.406)
_C.DATA.STD = (0.229, 0.224, 0.225)
# Read train.zip / val.zip with train_map.txt / val_map.txt instead of folders.
_C.DATA.ZIP_MODE = False
# Zip mode only: 'no' reads from the zip each time, 'full' holds every image's bytes in memory,
# 'part' holds only this process's shard of the training set.
_C.DATA.CACHE_MODE = 'part'
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8

# The procedural dataset used when DATA_PATH is empty (see data/demo.py).
_C.DATA.DEMO = CN()
# Where it is written once; empty: .cache/demo_dataset in the repository.
_C.DATA.DEMO.ROOT = ''
_C.DATA.DEMO.TRAIN_PER_CLASS = 200
_C.DATA.DEMO.VAL_PER_CLASS = 50
_C.DATA.DEMO.IMAGE_SIZE = 48

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# 'focal' (models.FocalTransformer) or 'timm' (MODEL.TIMM.NAME).
_C.MODEL.TYPE = 'focal'
_C.MODEL.NAME = 'focal_tiny_patch4_window7_224'
# Checkpoint to resume training from, or to evaluate with --eval.
_C.MODEL.RESUME = ''
# Checkpoint whose weights start a new training run (another resolution or class count is fine).
_C.MODEL.PRETRAINED = ''
# Overwritten by the dataset's class count when data is built.
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
# Official: model-specific extras; accepted for compatibility, unused.
_C.MODEL.SPEC = CN(new_allowed=True)

_C.MODEL.FOCAL = CN()
_C.MODEL.FOCAL.PATCH_SIZE = 4
_C.MODEL.FOCAL.IN_CHANS = 3
_C.MODEL.FOCAL.EMBED_DIM = 96
_C.MODEL.FOCAL.DEPTHS = [2, 2, 6, 2]
_C.MODEL.FOCAL.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.FOCAL.WINDOW_SIZE = 7
_C.MODEL.FOCAL.MLP_RATIO = 4.
_C.MODEL.FOCAL.QKV_BIAS = True
_C.MODEL.FOCAL.QK_SCALE = False
_C.MODEL.FOCAL.APE = False
_C.MODEL.FOCAL.PATCH_NORM = True
_C.MODEL.FOCAL.USE_SHIFT = False
_C.MODEL.FOCAL.FOCAL_POOL = 'none'
_C.MODEL.FOCAL.FOCAL_STAGES = [0, 1, 2, 3]
_C.MODEL.FOCAL.FOCAL_LEVELS = [1, 1, 1, 1]
_C.MODEL.FOCAL.FOCAL_WINDOWS = [7, 5, 3, 1]
_C.MODEL.FOCAL.EXPAND_STAGES = [0, 1, 2, 3]
_C.MODEL.FOCAL.EXPAND_SIZES = [3, 3, 3, 3]
_C.MODEL.FOCAL.EXPAND_LAYER = 'all'
_C.MODEL.FOCAL.USE_CONV_EMBED = False
_C.MODEL.FOCAL.USE_LAYERSCALE = False
_C.MODEL.FOCAL.LAYERSCALE_VALUE = 1e-4
_C.MODEL.FOCAL.USE_PRE_NORM = False
# How focal attention runs: 'auto' (the fused Triton kernel where it can run, else SDPA), 'sdpa', 'fused'.
_C.MODEL.FOCAL.ATTN_BACKEND = 'auto'

# timm baselines (MODEL.TYPE timm): timm.create_model(NAME, **KWARGS).
_C.MODEL.TIMM = CN()
_C.MODEL.TIMM.NAME = ''
_C.MODEL.TIMM.KWARGS = CN(new_allowed=True)

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# Learning rates per 512 images; main.py scales them linearly with the total batch.
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
# Gradient-norm clipping threshold; 0 disables clipping (the norm is still logged).
_C.TRAIN.CLIP_GRAD = 5.0
# Resume from the newest checkpoint in the output folder.
_C.TRAIN.AUTO_RESUME = True
# Micro-batches per optimizer step (0 and 1 both mean no accumulation).
_C.TRAIN.ACCUMULATION_STEPS = 0
# Gradient checkpointing in the model.
_C.TRAIN.USE_CHECKPOINT = False
# Stop with an error after this many optimizer steps in a row with a non-finite loss.
_C.TRAIN.MAX_NONFINITE_STEPS = 5

_C.TRAIN.LR_SCHEDULER = CN()
# 'cosine', 'linear' or 'step'; stepped once per optimizer step.
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
# False (the official code): the decay curve spans all steps and warm-up overrides its start,
# so the peak is a little below BASE_LR. True: the decay starts after warm-up, at BASE_LR.
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = False
# 'step' only: epochs between decays and the decay factor.
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
# 'adamw' or 'sgd'.
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# Exponential moving average of the weights (timm ModelEmaV3), evaluated and checkpointed.
_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998

# -----------------------------------------------------------------------------
# Augmentation (timm create_transform and Mixup)
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Probability of a horizontal flip (0: never).
_C.AUG.HFLIP = 0.5
# Random-resized-crop ranges: area fraction of the image and aspect ratio (width / height).
_C.AUG.SCALE = (0.08, 1.0)
_C.AUG.RATIO = (3. / 4., 4. / 3.)
_C.AUG.COLOR_JITTER = 0.4
# RandAugment / AutoAugment policy string, or 'none'.
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# 'batch', 'pair' or 'elem'.
_C.AUG.MIXUP_MODE = 'batch'

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Resize to IMG_SIZE * 256 / 224 then centre-crop; otherwise resize straight to IMG_SIZE.
_C.TEST.CROP = True

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Official apex flag kept as an alias of native AMP: 'O0' turns AMP off, 'O1'/'O2' turn it on.
_C.AMP_OPT_LEVEL = ''
# Autocast dtype: 'auto' (bf16 on GPUs that support it, else fp16; off on CPU), 'bf16',
# 'fp16' (with a gradient scaler) or 'none'.
_C.AMP_DTYPE = 'auto'
# Wrap the model in torch.compile.
_C.COMPILE = False
# Root of all runs; the run folder is OUTPUT/MODEL.NAME/TAG.
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 100
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
# Official: accepted for compatibility, unused (the local rank comes from the launcher, see
# distributed.init_distributed).
_C.DEBUG_MODE = False
_C.LOCAL_RANK = 0

_CHOICES = {
    'MODEL.TYPE': ('focal', 'timm'),
    'MODEL.FOCAL.ATTN_BACKEND': ATTN_BACKENDS,
    'DATA.CACHE_MODE': ('no', 'full', 'part'),
    'DATA.INTERPOLATION': ('random', 'bilinear', 'bicubic'),
    'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'step'),
    'TRAIN.OPTIMIZER.NAME': ('adamw', 'sgd'),
    'AUG.MIXUP_MODE': ('batch', 'pair', 'elem'),
    'AMP_OPT_LEVEL': ('', 'O0', 'O1', 'O2'),
    'AMP_DTYPE': ('auto', 'bf16', 'fp16', 'none'),
    'MODEL.FOCAL.FOCAL_POOL': ('fc', 'mean', 'max', 'conv', 'none'),
    'MODEL.FOCAL.EXPAND_LAYER': ('all', 'even', 'odd'),
}
_POSITIVE = ('DATA.BATCH_SIZE', 'DATA.IMG_SIZE', 'TRAIN.EPOCHS', 'SAVE_FREQ', 'PRINT_FREQ',
             'TRAIN.MAX_NONFINITE_STEPS')


class ConfigError(UserError):
    """A config file, override or value the user has to fix."""


def get_defaults() -> CN:
    """A fresh, unfrozen copy of the defaults."""
    return _C.clone()


def _lookup(config: CN, dotted_key: str) -> Any:
    node = config
    for part in dotted_key.split('.'):
        node = node[part]
    return node


def merge_config_file(config: CN, cfg_file: str) -> None:
    """Merge `cfg_file` into `config`, after the files its `BASE:` list names (recursively)."""
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: {cfg_file}")
    try:
        with open(cfg_file) as f:
            yaml_cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{yaml_error_place(cfg_file, e)} is not valid YAML: "
                          f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    for base in yaml_cfg.get('BASE', ['']) or ['']:
        if base:
            merge_config_file(config, os.path.join(os.path.dirname(cfg_file), base))
    try:
        config.merge_from_other_cfg(CN(yaml_cfg))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"{cfg_file}: {_yacs_message(e)}") from None


def yaml_error_place(cfg_file: str, error: yaml.YAMLError) -> str:
    """`file:line:column` of a YAML syntax error (1-based), or the file alone."""
    mark = getattr(error, 'problem_mark', None)
    return f"{cfg_file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else cfg_file


def merge_overrides(config: CN, opts: list) -> None:
    """Merge `--opts KEY VALUE ...` pairs."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    try:
        config.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"--opts: {_yacs_message(e)}") from None


def _yacs_message(error: Exception) -> str:
    message = error.args[0] if error.args else str(error)
    for yacs_wording in ('Non-existent config key', 'Non-existent key'):
        message = str(message).replace(yacs_wording, 'unknown config key')
    return message


def validate_config(config: CN) -> None:
    """Reject values the code would otherwise misread or fail on deep inside a run."""
    for key, choices in _CHOICES.items():
        value = _lookup(config, key)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
    for key in _POSITIVE:
        if _lookup(config, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {_lookup(config, key)!r}")
    if config.MODEL.TYPE == 'timm' and not timm.is_model(config.MODEL.TIMM.NAME):
        raise ConfigError(f"MODEL.TIMM.NAME {config.MODEL.TIMM.NAME!r} is not a timm model "
                          f"(MODEL.TYPE is 'timm')")
    if config.MODEL.TYPE == 'focal':
        validate_focal_config(config)
    if config.TRAIN.WARMUP_EPOCHS < 0 or config.TRAIN.WARMUP_EPOCHS > config.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.WARMUP_EPOCHS must be in [0, TRAIN.EPOCHS], "
                          f"got {config.TRAIN.WARMUP_EPOCHS!r}")
    if config.TRAIN.ACCUMULATION_STEPS < 0:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS must be >= 0, "
                          f"got {config.TRAIN.ACCUMULATION_STEPS!r}")
    if mixup_active(config) and config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f"DATA.BATCH_SIZE must be even with mixup/cutmix, "
                          f"got {config.DATA.BATCH_SIZE}")
    if not 0.0 <= config.TRAIN.EMA.DECAY < 1.0:
        raise ConfigError(f"TRAIN.EMA.DECAY must be in [0, 1), got {config.TRAIN.EMA.DECAY!r}")
    _validate_augmentation(config)


def _numbers(value: Any, count: int) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == count
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))


def _validate_augmentation(config: CN) -> None:
    """The flip probability, crop ranges and normalisation the transforms are built with."""
    hflip = config.AUG.HFLIP
    if not _numbers([hflip], 1) or not 0.0 <= hflip <= 1.0:
        raise ConfigError(f"AUG.HFLIP must be a probability in [0, 1], got {hflip!r}")
    scale, ratio = config.AUG.SCALE, config.AUG.RATIO
    if not _numbers(scale, 2) or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"AUG.SCALE must be [low, high] with 0 < low <= high <= 1, "
                          f"got {scale!r}")
    if not _numbers(ratio, 2) or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"AUG.RATIO must be [low, high] with 0 < low <= high, got {ratio!r}")
    mean, std = config.DATA.MEAN, config.DATA.STD
    if not _numbers(mean, 3):
        raise ConfigError(f"DATA.MEAN must be 3 numbers (R, G, B), got {mean!r}")
    if not _numbers(std, 3) or min(std) <= 0:
        raise ConfigError(f"DATA.STD must be 3 positive numbers (R, G, B), got {std!r}")


def validate_focal_config(config: CN) -> None:
    """The architecture keys of MODEL.FOCAL, checked here so that the model's constructor
    only fails on bugs (which keep their traceback)."""
    focal = config.MODEL.FOCAL
    num_stages = len(focal.DEPTHS)
    for key in ('NUM_HEADS', 'FOCAL_LEVELS', 'FOCAL_WINDOWS', 'EXPAND_SIZES'):
        if len(focal[key]) != num_stages:
            raise ConfigError(f"MODEL.FOCAL.{key} has {len(focal[key])} entries, one per stage "
                              f"of MODEL.FOCAL.DEPTHS ({num_stages})")
    if any(window % 2 == 0 for window in focal.FOCAL_WINDOWS):
        raise ConfigError(f"MODEL.FOCAL.FOCAL_WINDOWS must be odd, got {list(focal.FOCAL_WINDOWS)}")
    for stage, heads in enumerate(focal.NUM_HEADS):
        dim = focal.EMBED_DIM * 2 ** stage
        if heads <= 0 or dim % heads:
            raise ConfigError(f"MODEL.FOCAL.NUM_HEADS[{stage}] = {heads} does not divide the "
                              f"stage's width {dim} (EMBED_DIM x 2^{stage})")
    # Each stage after the first halves the resolution; the last one needs at least one token.
    smallest = focal.PATCH_SIZE * 2 ** (num_stages - 1)
    if config.DATA.IMG_SIZE < smallest:
        raise ConfigError(f"DATA.IMG_SIZE {config.DATA.IMG_SIZE} is too small for this Focal "
                          f"Transformer: with PATCH_SIZE {focal.PATCH_SIZE} and {num_stages} "
                          f"stages inputs need {smallest} px or more (smaller images are padded "
                          f"to DATA.IMG_SIZE)")


def mixup_active(config: CN) -> bool:
    aug = config.AUG
    return aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None


def accumulation_steps(config: CN) -> int:
    """Micro-batches per optimizer step (the official 0 means 1)."""
    return max(1, config.TRAIN.ACCUMULATION_STEPS)


def run_folder(config: CN) -> str:
    """Where a run's checkpoints, logs and metrics go: OUTPUT/MODEL.NAME/TAG."""
    return os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)


def update_config(config: CN, args: argparse.Namespace) -> None:
    """Merge the config file, `--opts` and the dedicated command-line flags, in that order."""
    merge_config_file(config, args.cfg)
    merge_overrides(config, args.opts or [])
    flag_to_key = {
        'batch_size': 'DATA.BATCH_SIZE', 'data_path': 'DATA.DATA_PATH',
        'cache_mode': 'DATA.CACHE_MODE', 'resume': 'MODEL.RESUME',
        'pretrained': 'MODEL.PRETRAINED', 'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS',
        'amp_opt_level': 'AMP_OPT_LEVEL', 'amp_dtype': 'AMP_DTYPE', 'output': 'OUTPUT',
        'tag': 'TAG', 'epochs': 'TRAIN.EPOCHS',
    }
    switch_to_key = {
        'zip': 'DATA.ZIP_MODE', 'use_checkpoint': 'TRAIN.USE_CHECKPOINT', 'eval': 'EVAL_MODE',
        'throughput': 'THROUGHPUT_MODE', 'compile': 'COMPILE', 'model_ema': 'TRAIN.EMA.ENABLE',
    }
    overrides = []
    for flag, key in flag_to_key.items():
        value = getattr(args, flag, None)
        if value not in (None, ''):
            overrides += [key, value]
    for flag, key in switch_to_key.items():
        if getattr(args, flag, False):
            overrides += [key, True]
    for key, value in zip(overrides[::2], overrides[1::2]):
        node, leaf = key.rsplit('.', 1) if '.' in key else ('', key)
        target = _lookup(config, node) if node else config
        target[leaf] = value


def load_config(path: str, opts: Sequence[str] = ()) -> CN:
    """The frozen, validated config of a YAML file with `KEY VALUE` overrides: for scripts and
    tests, which have no command line of main.py."""
    config = get_defaults()
    merge_config_file(config, path)
    merge_overrides(config, list(opts))
    validate_config(config)
    config.freeze()
    return config


def get_config(args: Optional[argparse.Namespace] = None) -> CN:
    """The frozen, validated config for `args` (defaults only when `args` is None)."""
    config = get_defaults()
    if args is not None:
        update_config(config, args)
    validate_config(config)
    config.freeze()
    return config


def config_to_dict(config: CN) -> dict:
    """The config as nested plain dicts and lists: storable in a `weights_only` checkpoint."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value
    return plain(config)


def dump_config(config: CN, path: str) -> None:
    """Write the merged config as YAML, loadable again with --cfg (its `BASE:` files are
    already merged in, so the list is emptied)."""
    plain = config_to_dict(config)
    plain['BASE'] = ['']
    with open(path, 'w') as f:
        yaml.safe_dump(plain, f, sort_keys=False)
