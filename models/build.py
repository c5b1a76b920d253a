"""Build a classification model from a yacs config: a Focal Transformer, a Focal-fast model or any
timm model.

The model constructors check their own arguments and raise ValueError naming the argument;
`check_model_arguments` runs those checks for a config before any weights exist (so that a run
stops at start-up, not after loading its data), and `in_config_terms` words their messages with
the config keys the arguments come from, which the config layer raises as its errors.
"""
import functools
import re
from typing import Any, Dict, Optional

import timm
import torch

from .focal_fast import FocalFastTransformer
from .focal_transformer import FocalTransformer

# MODEL.TYPE -> the class it builds from MODEL.FOCAL.* (the official code's names for them).
FOCAL_MODELS = {'focal': FocalTransformer, 'focalv2': FocalFastTransformer}
# The config key of each FocalTransformer argument that `build_model` sets.
FOCAL_ARGUMENT_KEYS = {
    'img_size': 'DATA.IMG_SIZE',
    'patch_size': 'MODEL.FOCAL.PATCH_SIZE',
    'in_chans': 'MODEL.FOCAL.IN_CHANS',
    'num_classes': 'MODEL.NUM_CLASSES',
    'embed_dim': 'MODEL.FOCAL.EMBED_DIM',
    'depths': 'MODEL.FOCAL.DEPTHS',
    'num_heads': 'MODEL.FOCAL.NUM_HEADS',
    'window_size': 'MODEL.FOCAL.WINDOW_SIZE',
    'mlp_ratio': 'MODEL.FOCAL.MLP_RATIO',
    'qkv_bias': 'MODEL.FOCAL.QKV_BIAS',
    'qk_scale': 'MODEL.FOCAL.QK_SCALE',
    'drop_rate': 'MODEL.DROP_RATE',
    'drop_path_rate': 'MODEL.DROP_PATH_RATE',
    'ape': 'MODEL.FOCAL.APE',
    'patch_norm': 'MODEL.FOCAL.PATCH_NORM',
    'use_checkpoint': 'TRAIN.USE_CHECKPOINT',
    'use_shift': 'MODEL.FOCAL.USE_SHIFT',
    'focal_stages': 'MODEL.FOCAL.FOCAL_STAGES',
    'focal_levels': 'MODEL.FOCAL.FOCAL_LEVELS',
    'focal_windows': 'MODEL.FOCAL.FOCAL_WINDOWS',
    'focal_pool': 'MODEL.FOCAL.FOCAL_POOL',
    'expand_stages': 'MODEL.FOCAL.EXPAND_STAGES',
    'expand_sizes': 'MODEL.FOCAL.EXPAND_SIZES',
    'expand_layer': 'MODEL.FOCAL.EXPAND_LAYER',
    'use_conv_embed': 'MODEL.FOCAL.USE_CONV_EMBED',
    'use_layerscale': 'MODEL.FOCAL.USE_LAYERSCALE',
    'layerscale_value': 'MODEL.FOCAL.LAYERSCALE_VALUE',
    'use_pre_norm': 'MODEL.FOCAL.USE_PRE_NORM',
    'attn_backend': 'MODEL.FOCAL.ATTN_BACKEND',
}
# ... and of the argument only Focal-fast has.
FAST_ARGUMENT_KEYS = dict(FOCAL_ARGUMENT_KEYS, focal_topK='MODEL.FOCAL.FOCAL_TOPK')
# The config key of each `timm.create_model` argument that `build_model` sets besides MODEL.TIMM.KWARGS.
TIMM_ARGUMENT_KEYS = {
    'num_classes': 'MODEL.NUM_CLASSES',
    'drop_rate': 'MODEL.DROP_RATE',
    'drop_path_rate': 'MODEL.DROP_PATH_RATE',
}


def _config_value(config, dotted_key: str) -> Any:
    value = config
    for part in dotted_key.split('.'):
        value = value[part]
    return list(value) if isinstance(value, (list, tuple)) else value


def argument_keys(model_type: str) -> Dict[str, str]:
    """The config key of each constructor argument `build_model` sets for MODEL.TYPE `model_type`."""
    return {'focal': FOCAL_ARGUMENT_KEYS, 'focalv2': FAST_ARGUMENT_KEYS}.get(model_type, TIMM_ARGUMENT_KEYS)


def focal_kwargs_from_config(config) -> dict:
    """Constructor keyword arguments of the focal model class of `config.MODEL.TYPE` for
    `config.MODEL.FOCAL.*`."""
    kwargs = {argument: _config_value(config, key) for argument, key in argument_keys(config.MODEL.TYPE).items()}
    kwargs['qk_scale'] = kwargs['qk_scale'] or None  # the official False means the default 1/sqrt(head dim)
    return kwargs


def check_timm_rates(drop_rate: float, drop_path_rate: float) -> None:
    """timm's models take any drop rate and fail inside torch (or mid-training) on one outside [0, 1)."""
    for name, rate in (('drop_rate', drop_rate), ('drop_path_rate', drop_path_rate)):
        if not 0 <= rate < 1:
            raise ValueError(f'{name} must lie in [0, 1), got {rate!r}')


def build_model(config):
    """`MODEL.TYPE` 'focal' builds our FocalTransformer, 'focalv2' a FocalFastTransformer; 'timm'
    builds `MODEL.TIMM.NAME` with `MODEL.TIMM.KWARGS` (the Table 2 baselines and the Swin ablation
    rows)."""
    model_type = config.MODEL.TYPE
    if model_type in FOCAL_MODELS:
        return FOCAL_MODELS[model_type](**focal_kwargs_from_config(config))
    if model_type == 'timm':
        check_timm_rates(config.MODEL.DROP_RATE, config.MODEL.DROP_PATH_RATE)
        kwargs = dict(config.MODEL.TIMM.KWARGS)
        model = timm.create_model(
            config.MODEL.TIMM.NAME,
            pretrained=False,
            num_classes=config.MODEL.NUM_CLASSES,
            drop_rate=config.MODEL.DROP_RATE,
            drop_path_rate=config.MODEL.DROP_PATH_RATE,
            **kwargs,
        )
        if config.TRAIN.USE_CHECKPOINT:
            model.set_grad_checkpointing(True)
        return model
    raise ValueError(f"MODEL.TYPE must be one of {[*FOCAL_MODELS, 'timm']}, got {model_type!r}")


def check_model_arguments(config) -> None:
    """Run the argument checks of the model `config` describes, raising their ValueError: a
    Focal Transformer is built on the meta device (no memory, no weights). A timm model's
    arguments other than the drop rates are left to timm when the run builds it."""
    if config.MODEL.TYPE in FOCAL_MODELS:
        kwargs = focal_kwargs_from_config(config)
        _check_focal_arguments(config.MODEL.TYPE, tuple((name, tuple(value) if isinstance(value, list) else value)
                                                        for name, value in kwargs.items()))
    elif config.MODEL.TYPE == 'timm':
        check_timm_rates(config.MODEL.DROP_RATE, config.MODEL.DROP_PATH_RATE)


@functools.lru_cache(maxsize=64)
def _check_focal_arguments(model_type: str, arguments: tuple) -> None:
    """Construction on the meta device, once per distinct set of arguments (0.1-0.5 s for
    Focal-T to -B on a CPU, mostly the weight initialisation; scripts and tests load the same
    configs many times)."""
    with torch.device('meta'):
        FOCAL_MODELS[model_type](**dict(arguments))


def in_config_terms(config, message: str) -> Optional[str]:
    """A model's argument error with each argument name replaced by its config key, or None when
    it names none of the arguments the config sets."""
    keys = argument_keys(config.MODEL.TYPE)
    pattern = re.compile(r'\b(' + '|'.join(map(re.escape, keys)) + r')\b')
    worded = pattern.sub(lambda match: keys[match.group(1)], message)
    return worded if worded != message else None
