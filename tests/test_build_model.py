"""`build_model` turns configs into models and honours every model-related key."""
import timm.models.swin_transformer as swin

from conftest import MICRO_FOCAL, micro_focal_config
from models import FocalTransformer, build_model


def micro_config(model_type: str):
    """The micro Focal architecture as MODEL.FOCAL keys, and a Swin of the same widths."""
    config = micro_focal_config()
    config.DATA.IMG_SIZE = 64
    config.MODEL.NUM_CLASSES = 5
    config.MODEL.TYPE = model_type
    config.MODEL.TIMM.NAME = 'swin_tiny_patch4_window7_224'
    config.MODEL.TIMM.KWARGS.img_size = 64
    for key in ('embed_dim', 'depths', 'num_heads'):
        config.MODEL.TIMM.KWARGS[key] = MICRO_FOCAL[key]
    config.MODEL.TIMM.KWARGS.window_size = 2
    return config


def test_focal_config_builds_focal_transformer_with_its_keys():
    config = micro_config('focal')
    config.MODEL.FOCAL.FOCAL_POOL = 'fc'
    config.MODEL.FOCAL.FOCAL_LEVELS = [3, 3, 3, 3]
    config.MODEL.FOCAL.ATTN_BACKEND = 'sdpa'
    config.TRAIN.USE_CHECKPOINT = True
    model = build_model(config)
    assert isinstance(model, FocalTransformer)
    assert model.layers[0].blocks[0].attn.attn_backend == 'sdpa'
    assert model.head.out_features == 5
    assert model.layers[0].blocks[0].attn.num_pooled_levels == 2
    assert all(stage.use_checkpoint for stage in model.layers)


def test_timm_config_builds_the_named_model_with_gradient_checkpointing():
    config = micro_config('timm')
    config.TRAIN.USE_CHECKPOINT = True
    model = build_model(config)
    assert isinstance(model, swin.SwinTransformer)
    assert model.head.fc.out_features == 5
    assert all(stage.grad_checkpointing for stage in model.layers)
