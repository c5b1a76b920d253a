"""Build a classification model from a yacs config: a Focal Transformer or any timm model."""
import timm

from .focal_transformer import FocalTransformer


def focal_kwargs_from_config(config) -> dict:
    """Constructor keyword arguments of `FocalTransformer` for `config.MODEL.FOCAL.*`."""
    focal = config.MODEL.FOCAL
    return dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=focal.PATCH_SIZE,
        in_chans=focal.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=focal.EMBED_DIM,
        depths=list(focal.DEPTHS),
        num_heads=list(focal.NUM_HEADS),
        window_size=focal.WINDOW_SIZE,
        mlp_ratio=focal.MLP_RATIO,
        qkv_bias=focal.QKV_BIAS,
        qk_scale=focal.QK_SCALE or None,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=focal.APE,
        patch_norm=focal.PATCH_NORM,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        use_shift=focal.USE_SHIFT,
        focal_stages=list(focal.FOCAL_STAGES),
        focal_levels=list(focal.FOCAL_LEVELS),
        focal_windows=list(focal.FOCAL_WINDOWS),
        focal_pool=focal.FOCAL_POOL,
        expand_stages=list(focal.EXPAND_STAGES),
        expand_sizes=list(focal.EXPAND_SIZES),
        expand_layer=focal.EXPAND_LAYER,
        use_conv_embed=focal.USE_CONV_EMBED,
        use_layerscale=focal.USE_LAYERSCALE,
        layerscale_value=focal.LAYERSCALE_VALUE,
        use_pre_norm=focal.USE_PRE_NORM,
        attn_backend=focal.ATTN_BACKEND,
    )


def build_model(config):
    """`MODEL.TYPE` 'focal' builds our FocalTransformer; 'timm' builds `MODEL.TIMM.NAME` with
    `MODEL.TIMM.KWARGS` (the Table 2 baselines and the Swin ablation rows)."""
    model_type = config.MODEL.TYPE
    if model_type == 'focal':
        return FocalTransformer(**focal_kwargs_from_config(config))
    if model_type == 'timm':
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
    raise ValueError(f"MODEL.TYPE must be 'focal' or 'timm', got {model_type!r}")
