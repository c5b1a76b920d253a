"""`build_model` turns configs into models and honours every model-related key: each config key
that `models.build` maps to a constructor argument (`FOCAL_ARGUMENT_KEYS`, `FAST_ARGUMENT_KEYS`,
`TIMM_ARGUMENT_KEYS`) reaches that argument of the model it builds."""
import functools

import pytest
import timm.models.swin_transformer as swin

from config import get_defaults
from conftest import MICRO_FOCAL, micro_focal_config
from models import FocalFastTransformer, FocalTransformer, build_model
from models.build import FAST_ARGUMENT_KEYS, FOCAL_ARGUMENT_KEYS, FOCAL_MODELS, TIMM_ARGUMENT_KEYS


def micro_config(model_type: str):
    """The micro Focal architecture as MODEL.FOCAL keys at 128 px with 2 px windows (every stage's
    map is larger than its window, so each stage keeps its own window, shift and surroundings),
    with pooled levels and layer scale (so that their settings show), and a Swin of the same widths."""
    config = micro_focal_config()
    config.DATA.IMG_SIZE = 128
    config.MODEL.NUM_CLASSES = 5
    config.MODEL.TYPE = model_type
    config.MODEL.FOCAL.WINDOW_SIZE = 2
    config.MODEL.FOCAL.EXPAND_SIZES = [1, 1, 1, 1]
    config.MODEL.FOCAL.FOCAL_POOL = 'fc'
    config.MODEL.FOCAL.FOCAL_LEVELS = [2, 2, 2, 2]
    config.MODEL.FOCAL.USE_LAYERSCALE = True
    config.MODEL.TIMM.NAME = 'swin_tiny_patch4_window7_224'
    config.MODEL.TIMM.KWARGS.img_size = 64
    for key in ('embed_dim', 'depths', 'num_heads'):
        config.MODEL.TIMM.KWARGS[key] = MICRO_FOCAL[key]
    config.MODEL.TIMM.KWARGS.window_size = 2
    return config


def set_key(config, dotted_key: str, value) -> None:
    *path, name = dotted_key.split('.')
    node = config
    for part in path:
        node = node[part]
    node[name] = value


def first_blocks(model):
    return [stage.blocks[0] for stage in model.layers]


def drop_prob(drop_path) -> float:
    """A block's stochastic depth rate: its DropPath's, 0 for the identity that stands in at rate 0."""
    return getattr(drop_path, 'drop_prob', 0.0)


def expand_layer(model) -> str:
    """'all', 'even' or 'odd', read from which of stage 2's two blocks have surroundings."""
    expanded = tuple(block.geometry.expand_size > 0 for block in model.layers[2].blocks)
    return {(True, True): 'all', (False, True): 'even', (True, False): 'odd'}[expanded]


# For each focal constructor argument: a config value other than micro_config's (and the
# constructor's default), and how the built model shows it.
FOCAL_ARGUMENTS = {
    'img_size': (96, lambda m: m.patches_resolution[0] * m.patch_embed.patch_size[0]),
    'patch_size': (2, lambda m: m.patch_embed.proj.stride[0]),
    'in_chans': (1, lambda m: m.patch_embed.proj.in_channels),
    'num_classes': (7, lambda m: m.head.out_features),
    'embed_dim': (32, lambda m: m.patch_embed.proj.out_channels),
    'depths': ([2, 1, 1, 1], lambda m: [len(stage.blocks) for stage in m.layers]),
    'num_heads': ([2, 2, 2, 2], lambda m: [block.attn.num_heads for block in first_blocks(m)]),
    'window_size': (4, lambda m: m.layers[0].blocks[0].window_size),
    'mlp_ratio': (2.0, lambda m: m.layers[0].blocks[0].mlp.fc1.out_features / m.layers[0].blocks[0].dim),
    'qkv_bias': (False, lambda m: m.layers[0].blocks[0].attn.qkv.bias is not None),
    'qk_scale': (0.125, lambda m: m.layers[0].blocks[0].attn.scale),  # not the default 16 ** -0.5
    'drop_rate': (0.25, lambda m: m.pos_drop.p),
    'drop_path_rate': (0.25, lambda m: drop_prob(m.layers[-1].blocks[-1].drop_path)),  # reached by the last block
    'ape': (True, lambda m: 'absolute_pos_embed' in dict(m.named_parameters())),
    'patch_norm': (False, lambda m: m.patch_embed.norm is not None),
    'use_checkpoint': (True, lambda m: all(stage.use_checkpoint for stage in m.layers)),
    'use_shift': (True, lambda m: any(block.shift_size > 0 for stage in m.layers for block in stage.blocks)),
    'focal_stages': ([0, 2], lambda m: [i for i, block in enumerate(first_blocks(m)) if block.pool_method != 'none']),
    'focal_levels': ([3, 2, 2, 2], lambda m: [block.geometry.num_pooled_levels + 1 for block in first_blocks(m)]),
    'focal_windows': ([3, 3, 1, 1], lambda m: [block.geometry.focal_window for block in first_blocks(m)]),
    'focal_pool': ('mean', lambda m: m.layers[0].blocks[0].pool_method),
    'expand_stages': ([1, 3], lambda m: [i for i, block in enumerate(first_blocks(m)) if block.geometry.expand_size]),
    'expand_sizes': ([1, 0, 1, 0], lambda m: [block.geometry.expand_size for block in first_blocks(m)]),
    'expand_layer': ('odd', expand_layer),
    'use_conv_embed': (True, lambda m: m.patch_embed.proj.kernel_size != m.patch_embed.proj.stride),  # overlapping
    'use_layerscale': (False, lambda m: m.layers[0].blocks[0].gamma_1 is not None),
    'layerscale_value': (0.5, lambda m: m.layers[0].blocks[0].gamma_1[0].item()),
    'use_pre_norm': (True, lambda m: m.layers[0].downsample.pre_norm is not None),
    'attn_backend': ('sdpa', lambda m: m.layers[0].blocks[0].attn.attn_backend),
    'focal_topK': (16, lambda m: m.layers[0].blocks[0].geometry.top_k),
}
# Focal-fast accepts these and, as the official model, does not use them: the model cannot show them.
UNUSED_BY_FOCAL_FAST = ('expand_stages', 'expand_sizes', 'expand_layer', 'focal_windows')
# ... and for each argument of timm.create_model, how the micro Swin shows it.
TIMM_ARGUMENTS = {
    'num_classes': (7, lambda m: m.head.fc.out_features),
    'drop_rate': (0.25, lambda m: m.head.drop.p),
    'drop_path_rate': (0.25, lambda m: drop_prob(m.layers[-1].blocks[-1].drop_path1)),  # reached by the last block
}


def build_recording_arguments(config):
    """build_model(config) for a focal MODEL.TYPE, and the keyword arguments it called the model class with."""
    received = {}

    class Recording(FOCAL_MODELS[config.MODEL.TYPE]):
        def __init__(self, **kwargs):
            received.update(kwargs)
            super().__init__(**kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(FOCAL_MODELS, config.MODEL.TYPE, Recording)
        return build_model(config), received


@functools.lru_cache(maxsize=None)
def micro_model(model_type: str):
    """`build_recording_arguments(micro_config(model_type))`, once (tests must not modify the model)."""
    return build_recording_arguments(micro_config(model_type))


def test_every_focal_config_key_is_mapped_to_a_constructor_argument():
    assert {f'MODEL.FOCAL.{key}' for key in get_defaults().MODEL.FOCAL} <= set(FAST_ARGUMENT_KEYS.values())
    assert set(FOCAL_ARGUMENT_KEYS.items()) <= set(FAST_ARGUMENT_KEYS.items())


@pytest.mark.parametrize('model_type, argument', [('focal', argument) for argument in FOCAL_ARGUMENT_KEYS]
                         + [('focalv2', argument) for argument in FAST_ARGUMENT_KEYS])
def test_config_key_reaches_the_focal_models_argument(model_type, argument):
    key = (FOCAL_ARGUMENT_KEYS if model_type == 'focal' else FAST_ARGUMENT_KEYS)[argument]
    value, shown_by = FOCAL_ARGUMENTS[argument]
    before, received_before = micro_model(model_type)
    config = micro_config(model_type)
    set_key(config, key, value)
    model, received = build_recording_arguments(config)
    assert received_before[argument] != value and received[argument] == value
    if not (model_type == 'focalv2' and argument in UNUSED_BY_FOCAL_FAST):
        assert shown_by(before) != value and shown_by(model) == value


@pytest.mark.parametrize('argument', TIMM_ARGUMENT_KEYS)
def test_config_key_reaches_the_timm_models_argument(argument):
    value, shown_by = TIMM_ARGUMENTS[argument]
    config = micro_config('timm')
    before = build_model(config)
    set_key(config, TIMM_ARGUMENT_KEYS[argument], value)
    assert shown_by(before) != value and shown_by(build_model(config)) == value


@pytest.mark.parametrize('model_type, model_class', [('focal', FocalTransformer), ('focalv2', FocalFastTransformer)])
def test_focal_config_builds_its_model_class(model_type, model_class):
    assert type(build_model(micro_config(model_type))) is model_class


def test_timm_config_builds_the_named_model_with_its_kwargs_and_gradient_checkpointing():
    config = micro_config('timm')
    config.TRAIN.USE_CHECKPOINT = True
    model = build_model(config)
    assert isinstance(model, swin.SwinTransformer)
    assert model.patch_embed.proj.out_channels == MICRO_FOCAL['embed_dim']
    assert [len(stage.blocks) for stage in model.layers] == MICRO_FOCAL['depths']
    assert model.head.fc.out_features == 5
    assert all(stage.grad_checkpointing for stage in model.layers)
