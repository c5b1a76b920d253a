"""Focal Transformer + FPN for torchvision's detection models (RetinaNet, Faster/Mask R-CNN, ...).

torchvision's `BackboneWithFPN` takes the stage outputs of a CNN with `IntermediateLayerGetter`,
which needs a sequence of single-input modules; Focal stages also need the map size, so this is
the same composition over `FocalBackbone`: (B, 3, H, W) -> OrderedDict of `out_channels`-channel
maps, one per output stage plus the extra levels. Its `out_channels` attribute is what the
torchvision detectors read.
"""
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torchvision.ops.feature_pyramid_network import (ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool,
                                                     LastLevelP6P7)

from .focal_backbone import Checkpoint, FocalBackbone

__all__ = ['FocalFPN', 'focal_fpn_backbone']


class FocalFPN(nn.Module):
    """`FocalBackbone` followed by torchvision's `FeaturePyramidNetwork`."""

    def __init__(self, backbone: FocalBackbone, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm_layer: Optional[nn.Module] = None):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=extra_blocks,
                                         norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        return self.fpn(self.body(x))


def focal_fpn_backbone(variant: str = 'focal_tiny', checkpoint: Optional[Checkpoint] = None,
                       out_indices: Sequence[int] = (0, 1, 2, 3), extra: str = 'maxpool', out_channels: int = 256,
                       **backbone_kwargs) -> FocalFPN:
    """Focal-T/S/B + FPN, initialised from `checkpoint` (see `FocalBackbone.load_checkpoint`).

    extra='maxpool': P2-P5 and a max-pooled P6, the Faster/Mask R-CNN layout (out_indices 0-3).
    extra='p6p7': P6 and P7 by strided convolutions on C5, the RetinaNet layout (out_indices 1-3),
        as mmdetection's `add_extra_convs='on_input'` that the paper's RetinaNet uses.
    """
    backbone = FocalBackbone.from_pretrained(variant, checkpoint, out_indices=out_indices, **backbone_kwargs)
    if extra == 'maxpool':
        extra_blocks = LastLevelMaxPool()
    elif extra == 'p6p7':
        extra_blocks = LastLevelP6P7(backbone.out_channels[-1], out_channels)
    else:
        raise ValueError(f"extra must be 'maxpool' or 'p6p7', got {extra!r}")
    return FocalFPN(backbone, out_channels, extra_blocks)
