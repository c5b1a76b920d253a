"""yacs configuration: the official Focal Transformer keys, our additions, YAML loading with
`BASE:` inheritance, command-line overrides and validation.

`get_config(args)` returns a frozen CfgNode. YAML files written for the official repository load
unchanged; an unknown key or a bad value raises `ConfigError` naming the key.

Validation asks the model package for its attention backends and constructor checks; `models` is
imported there, when a config is validated, not with this module, because importing it defines the
Triton kernels (which read TRITON_INTERPRET then): `import config` loads no model code.
"""
import argparse
import ast
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import yaml
from timm.data import create_transform
from yacs.config import CfgNode as CN

from data import mixup_active
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
# 'focal' (models.FocalTransformer), 'focalv2' (models.FocalFastTransformer, Focal-fast) or 'timm'
# (MODEL.TIMM.NAME).
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
# Focal-fast (MODEL.TYPE focalv2): the nearest keys each window attends to at every level.
_C.MODEL.FOCAL.FOCAL_TOPK = 128
# How focal attention runs: 'auto' (SDPA, except on GPU architectures where the fused kernel was
# verified faster), 'sdpa', 'fused'.
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


def _choices() -> Dict[str, Sequence[str]]:
    """The keys that take one of a few values, and those values."""
    from models.focal_attention import ATTN_BACKENDS  # when validating (see the module docstring)
    return {
        'MODEL.TYPE': ('focal', 'focalv2', 'timm'),
        'MODEL.FOCAL.ATTN_BACKEND': ATTN_BACKENDS,
        'DATA.CACHE_MODE': ('no', 'full', 'part'),
        'DATA.INTERPOLATION': ('random', 'bilinear', 'bicubic'),
        'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'step'),
        'TRAIN.OPTIMIZER.NAME': ('adamw', 'sgd'),
        'AUG.MIXUP_MODE': ('batch', 'pair', 'elem'),
        'AUG.REMODE': ('const', 'rand', 'pixel'),
        'AMP_OPT_LEVEL': ('', 'O0', 'O1', 'O2'),
        'AMP_DTYPE': ('auto', 'bf16', 'fp16', 'none'),
    }


@dataclass(frozen=True)
class Numbers:
    """Where a numeric key's value may lie: one number (`count` 0) or a list of `count` numbers,
    each in the interval from `low` to `high` (ends open or closed), integers for counts,
    non-decreasing with `ordered`. `text` replaces the generated description in messages."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    count: int = 0
    ordered: bool = False
    what: str = 'a number'
    text: str = ''

    def admits_one(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        return (math.isfinite(value) and (self.low < value if self.low_open else self.low <= value)
                and (value < self.high if self.high_open else value <= self.high))

    def admits(self, value: Any) -> bool:
        if not self.count:
            return self.admits_one(value)
        return (isinstance(value, (list, tuple)) and len(value) == self.count
                and all(self.admits_one(item) for item in value)
                and (not self.ordered or list(value) == sorted(value)))

    def __str__(self) -> str:
        if self.text:
            return self.text
        if self.high < math.inf:
            bounds = (f" in {'(' if self.low_open else '['}{self.low}, {self.high}"
                      f"{')' if self.high_open else ']'}")
        else:
            bounds = f" {'>' if self.low_open else '>='} {self.low}" if self.low > -math.inf else ''
        if self.count:
            return f"{self.count} numbers{bounds}"
        return f"{'an integer' if self.integer else self.what}{bounds}"


def _count(low: int) -> Numbers:
    return Numbers(low, integer=True)


_FRACTION = Numbers(0, 1, high_open=True)      # [0, 1): smoothing, decay and momentum factors
_PROBABILITY = Numbers(0, 1, what='a probability')
_NON_NEGATIVE = Numbers(0)

# Every numeric key of the training pipeline and where its value may lie (a value outside fails
# deep inside torch, timm or the data loader, or silently does something else). The model's own
# keys (MODEL.FOCAL.*, the drop rates) are checked by the model's constructor, see
# `_validate_model_arguments`.
_NUMBERS = {
    'DATA.BATCH_SIZE': _count(1),
    'DATA.IMG_SIZE': _count(1),
    'DATA.NUM_WORKERS': _count(0),
    'DATA.MEAN': Numbers(count=3, text='3 numbers (R, G, B)'),
    'DATA.STD': Numbers(0, low_open=True, count=3, text='3 positive numbers (R, G, B)'),
    'DATA.DEMO.TRAIN_PER_CLASS': _count(1),
    'DATA.DEMO.VAL_PER_CLASS': _count(1),
    'DATA.DEMO.IMAGE_SIZE': _count(1),
    'MODEL.LABEL_SMOOTHING': _FRACTION,
    'TRAIN.START_EPOCH': _count(0),
    'TRAIN.EPOCHS': _count(1),
    'TRAIN.WARMUP_EPOCHS': _count(0),
    'TRAIN.WEIGHT_DECAY': _NON_NEGATIVE,
    'TRAIN.BASE_LR': _NON_NEGATIVE,
    'TRAIN.WARMUP_LR': _NON_NEGATIVE,
    'TRAIN.MIN_LR': _NON_NEGATIVE,
    'TRAIN.CLIP_GRAD': _NON_NEGATIVE,
    'TRAIN.ACCUMULATION_STEPS': _count(0),
    'TRAIN.MAX_NONFINITE_STEPS': _count(1),
    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': _count(1),
    'TRAIN.LR_SCHEDULER.DECAY_RATE': Numbers(0, 1, low_open=True),
    'TRAIN.OPTIMIZER.EPS': Numbers(0, low_open=True),
    'TRAIN.OPTIMIZER.BETAS': Numbers(0, 1, high_open=True, count=2),
    'TRAIN.OPTIMIZER.MOMENTUM': _FRACTION,
    'TRAIN.EMA.DECAY': _FRACTION,
    'AUG.HFLIP': _PROBABILITY,
    'AUG.SCALE': Numbers(0, 1, low_open=True, count=2, ordered=True,
                         text='[low, high] with 0 < low <= high <= 1'),
    'AUG.RATIO': Numbers(0, low_open=True, count=2, ordered=True, text='[low, high] with 0 < low <= high'),
    'AUG.COLOR_JITTER': _NON_NEGATIVE,
    'AUG.REPROB': _PROBABILITY,
    'AUG.RECOUNT': _count(1),
    'AUG.MIXUP': _NON_NEGATIVE,
    'AUG.CUTMIX': _NON_NEGATIVE,
    'AUG.MIXUP_PROB': _PROBABILITY,
    'AUG.MIXUP_SWITCH_PROB': _PROBABILITY,
    'SAVE_FREQ': _count(1),
    'PRINT_FREQ': _count(1),
    'SEED': Numbers(-2 ** 63, 2 ** 63 - 1, integer=True),
}


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


def _leaves(node: CN, prefix: str = '') -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every value below `node`; a section of free-form keys
    (MODEL.TIMM.KWARGS) counts as one value."""
    for key, value in node.items():
        if isinstance(value, CN) and not value.is_new_allowed():
            yield from _leaves(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', value


def merge_config_file(config: CN, cfg_file: str) -> None:
    """Merge `cfg_file` into `config`, after the files its `BASE:` list names (recursively;
    a file that includes itself, directly or through others, is an error)."""
    _merge_file(config, cfg_file, ())


def _merge_file(config: CN, cfg_file: str, including: Tuple[str, ...]) -> None:
    """`including`: the files whose `BASE:` led here, outermost first."""
    named_in = f" (named in BASE of {including[-1]})" if including else ''
    if os.path.isdir(cfg_file):
        raise ConfigError(f"config file {cfg_file}{named_in} is a folder: name a YAML file")
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: {cfg_file}{named_in}")
    if any(os.path.samefile(cfg_file, outer) for outer in including):
        chain = ' -> '.join(including + (cfg_file,))
        raise ConfigError(f"config files include each other in a cycle through BASE: {chain}; remove one "
                          f"of those BASE entries")
    values = read_config_file(cfg_file)
    for base in base_files(values.pop('BASE', None), cfg_file):
        _merge_file(config, os.path.join(os.path.dirname(cfg_file), base), including + (cfg_file,))
    _merge_values(config, values, cfg_file)


def read_config_file(cfg_file: str) -> dict:
    """The top-level mapping of a YAML config file (empty for an empty file)."""
    try:
        with open(cfg_file, 'rb') as f:  # bytes: PyYAML checks the encoding and names the position
            values = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"cannot read config file {cfg_file}: {error.strerror}") from None
    except yaml.reader.ReaderError as error:
        raise ConfigError(f"{cfg_file} is not a YAML text file (byte {error.position}: {error.reason}): "
                          f"--cfg and BASE take YAML config files") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{yaml_error_place(cfg_file, error)} is not valid YAML: "
                          f"{getattr(error, 'problem', None) or str(error).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{cfg_file} holds a YAML {type(values).__name__}, not a mapping of config keys "
                          f"(lines like 'TRAIN:' and '  EPOCHS: 300')")
    return values


def base_files(base: Any, cfg_file: str) -> List[str]:
    """The files of a `BASE:` entry: a list of names (the official form) or one name."""
    names = [base] if isinstance(base, str) else base if isinstance(base, list) else None
    if base is not None and (names is None or not all(isinstance(name, str) for name in names)):
        raise ConfigError(f"{cfg_file}: BASE must be a list of config file names, got {base!r}")
    return [name for name in names or [] if name]


def _merge_values(config: CN, values: dict, where: str) -> None:
    """Merge a nested dict of config values, checked against the keys and types in `config`;
    `where` (a file, or --opts) starts the messages."""
    _conform(values, config, where, '')
    try:
        config.merge_from_other_cfg(CN(values))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"{where}: {_yacs_message(e)}") from None


def _conform(values: dict, node: CN, where: str, prefix: str) -> None:
    """Check that `values` fit the sections and value types of `node`, in place turning what
    can only mean a float (an int, or '1e-3', which PyYAML reads as a string) into one."""
    for key, value in values.items():
        full_key = f'{prefix}{key}'
        if not isinstance(key, str):
            raise ConfigError(f"{where}: config keys are names, got {full_key!r}")
        if key not in node:
            if node.is_new_allowed():
                continue
            raise ConfigError(f"{where}: unknown config key: {full_key}")
        default = node[key]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {full_key} is a section of keys ({', '.join(list(default)[:3])}, ...), "
                                  f"got {value!r}")
            _conform(value, default, where, full_key + '.')
        elif default is not None:
            if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
                value = values[key] = _as_float(value)
            if not _same_kind(value, default):
                raise ConfigError(f"{where}: {full_key} must be {_KINDS.get(type(default), 'a list')}, got "
                                  f"{'null' if value is None else repr(value)}")


_KINDS = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return type(value) is type(default)


def _as_float(value: Any) -> Any:
    """`value` as a float where it reads as one, else unchanged."""
    try:
        return float(value)
    except ValueError:
        return value


def yaml_error_place(cfg_file: str, error: yaml.YAMLError) -> str:
    """`file:line:column` of a YAML syntax error (1-based), or the file alone."""
    mark = getattr(error, 'problem_mark', None)
    return f"{cfg_file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else cfg_file


def merge_overrides(config: CN, opts: list) -> None:
    """Merge `--opts KEY VALUE ...` pairs (values read as Python literals, else as strings)."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    values: dict = {}
    for key, text in zip(opts[::2], opts[1::2]):
        if key == 'BASE':
            raise ConfigError("--opts cannot set BASE: name base files in the config file")
        *sections, leaf = key.split('.')
        node = values
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--opts: {key} is not a config key ({section} is a value)")
        node[leaf] = _literal(text)
    _merge_values(config, values, '--opts')


def _literal(text: Any) -> Any:
    """yacs' reading of an override: a Python literal (`10`, `[2, 2]`, `True`), else the string."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _yacs_message(error: Exception) -> str:
    message = error.args[0] if error.args else str(error)
    for yacs_wording in ('Non-existent config key', 'Non-existent key'):
        message = str(message).replace(yacs_wording, 'unknown config key')
    return message


def validate_config(config: CN) -> None:
    """Reject values the code would otherwise misread or fail on deep inside a run: the config's
    own rules here, the model's through its constructor."""
    for key, choices in _choices().items():
        value = _lookup(config, key)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
    for key, numbers in _NUMBERS.items():
        value = _lookup(config, key)
        if not numbers.admits(value):
            raise ConfigError(f"{key} must be {numbers}, got {value!r}")
    if config.MODEL.TYPE == 'timm' and not timm.is_model(config.MODEL.TIMM.NAME):
        raise ConfigError(f"MODEL.TIMM.NAME {config.MODEL.TIMM.NAME!r} is not a timm model "
                          f"(MODEL.TYPE is 'timm')")
    if config.MODEL.TYPE != 'timm' and config.MODEL.FOCAL.IN_CHANS != 3:
        raise ConfigError(f"MODEL.FOCAL.IN_CHANS must be 3, the RGB images the data loader gives, got "
                          f"{config.MODEL.FOCAL.IN_CHANS!r}")
    if config.TRAIN.WARMUP_EPOCHS > config.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.WARMUP_EPOCHS must be in [0, TRAIN.EPOCHS], "
                          f"got {config.TRAIN.WARMUP_EPOCHS!r}")
    if config.TRAIN.START_EPOCH >= config.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.START_EPOCH must be below TRAIN.EPOCHS ({config.TRAIN.EPOCHS}), "
                          f"got {config.TRAIN.START_EPOCH!r}")
    minmax = config.AUG.CUTMIX_MINMAX
    if minmax is not None and not (Numbers(0, 1, count=2).admits(minmax) and minmax[0] < minmax[1]):
        raise ConfigError(f"AUG.CUTMIX_MINMAX must be null or [low, high] with 0 <= low < high <= 1, "
                          f"got {minmax!r}")
    if mixup_active(config) and config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f"DATA.BATCH_SIZE must be even with mixup/cutmix, "
                          f"got {config.DATA.BATCH_SIZE}")
    if config.AUG.AUTO_AUGMENT != 'none':
        try:  # timm's own parser of the policy string (a millisecond)
            create_transform(input_size=32, is_training=True, auto_augment=config.AUG.AUTO_AUGMENT)
        except (AssertionError, ValueError, KeyError) as error:
            raise ConfigError(f"AUG.AUTO_AUGMENT {config.AUG.AUTO_AUGMENT!r} is not a policy timm reads ({error}); "
                              f"e.g. 'rand-m9-mstd0.5-inc1', 'augmix-m5-w3', 'original' or 'none'") from None
    _validate_model_arguments(config)


def _validate_model_arguments(config: CN) -> None:
    """The model constructor's own argument checks (run without building weights, see
    `models.build.check_model_arguments`), their ValueError reworded with the config keys."""
    from models.build import check_model_arguments, in_config_terms  # when validating (see the module docstring)
    try:
        check_model_arguments(config)
    except ValueError as error:
        message = in_config_terms(config, str(error))
        if message is None:  # names none of the model's arguments: a bug, which keeps its traceback
            raise
        raise ConfigError(message) from None


def changed_keys(config: CN) -> List[str]:
    """The keys whose values differ from config.py's defaults."""
    defaults = dict(_leaves(_C))
    return [key for key, value in _leaves(config)
            if key != 'BASE' and (key not in defaults or config_to_dict(value) != config_to_dict(defaults[key]))]


def defaults_note(config: CN, cfg_file: str) -> Tuple[int, str]:
    """The log level and line that say which values of a run are not config.py's defaults; a
    warning when the model and training keys all are (an empty config file, say)."""
    changed = changed_keys(config)
    listed = ', '.join(f'{key} {_lookup(config, key)!r}' for key in changed) or 'none'
    line = f"config {cfg_file}: values other than config.py's defaults: {listed}"
    if any(key.startswith(('MODEL.', 'TRAIN.')) for key in changed):
        return logging.INFO, line
    return logging.WARNING, (f"{line}. The model and training recipe are all config.py's defaults: "
                             f"{config.MODEL.NAME} for {config.TRAIN.EPOCHS} epochs; is {cfg_file} the "
                             f"config you meant?")


def accumulation_steps(config: CN) -> int:
    """Micro-batches per optimizer step (the official 0 means 1)."""
    return max(1, config.TRAIN.ACCUMULATION_STEPS)


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


def config_record(config: CN) -> dict:
    """The config as config.yaml and the checkpoints save it (one dict for both): as given, with
    its `BASE:` files merged in (so the list is emptied), loadable again with --cfg."""
    record = config_to_dict(config)
    record['BASE'] = ['']
    return record
