"""Models: `import models` registers the Focal Transformer and Focal-fast variants (and the Swin
ablation variant) with timm."""
from . import swin_variants  # noqa: F401  (registers swin_tiny_patch4_window7_224_noshift)
from .build import build_model
from .focal_backbone import FocalBackbone, focal_backbone
from .focal_fast import FocalFastTransformer
from .focal_transformer import FocalTransformer, checkpoint_filter_fn, unwrap_state_dict

__all__ = ['FocalBackbone', 'FocalFastTransformer', 'FocalTransformer', 'build_model', 'checkpoint_filter_fn',
           'focal_backbone', 'unwrap_state_dict']
