"""Models: `import models` registers the Focal Transformer variants with timm."""
from .build import build_model
from .focal_transformer import FocalTransformer, checkpoint_filter_fn

__all__ = ['FocalTransformer', 'build_model', 'checkpoint_filter_fn']
