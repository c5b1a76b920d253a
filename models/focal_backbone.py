"""Focal Transformer as a dense-prediction backbone (the paper's detection and segmentation
experiments): the stage feature maps as NCHW tensors, each through its own LayerNorm.

`FocalBackbone` owns a headless `FocalTransformer` (`body`) and adds what the official detection
backbone (Swin-style, for mmdetection) adds: one LayerNorm per output stage, named `norm{i}` and
applied to the stage's tokens before they are reshaped to a map, frozen early stages and gradient
checkpointing. The image is zero-padded bottom/right to a multiple of 32, so stage i has stride
exactly 4 * 2^i: (ceil(H / 32) * 32 / stride) x (ceil(W / 32) * 32 / stride) positions, the maps a
detector gets anyway from a batch padded to 32.

Weights come from an ImageNet classification checkpoint (ours or released) or a detector's
checkpoint (keys `backbone.*`, as mmdetection saves them) through `load_checkpoint`, which hands
the body's part to `checkpoint_filter_fn` and initialises or loads the stage norms. It takes the
checkpoint's dict: files are read by the caller (`checkpoint.read_checkpoint`, as main.py reads them).
"""
import logging
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import adapt_input_conv

from .focal_fast import FAST_ARGS, FocalFastTransformer
from .focal_transformer import BASE, SMALL, STEM_CONV, TINY, FocalTransformer, checkpoint_filter_fn, unwrap_state_dict

_logger = logging.getLogger(__name__)

__all__ = ['FocalBackbone', 'focal_backbone', 'BACKBONE_VARIANTS']

BACKBONE_VARIANTS = {
    'focal_tiny': TINY, 'focal_small': SMALL, 'focal_base': BASE,
    'focalv2_tiny': dict(TINY, **FAST_ARGS, model_class=FocalFastTransformer),
    'focalv2_small': dict(SMALL, **FAST_ARGS, model_class=FocalFastTransformer),
    'focalv2_base': dict(BASE, **FAST_ARGS, model_class=FocalFastTransformer),
}
STAGE_NORM = re.compile(r'^norm(\d+)\.')
Checkpoint = Dict[str, Any]  # a state dict, or a checkpoint dict that holds one


class FocalBackbone(nn.Module):
    """Multi-scale Focal Transformer: (B, 3, H, W) -> OrderedDict {str(i): (B, C_i, H_i, W_i)} for
    i in `out_indices`, H_i = H_pad / strides[i] with H_pad = H rounded up to `pad_to`.

    Args:
        out_indices: stages to return (0..3; the detectors of the paper take all four, or the last
            three). Default (0, 1, 2, 3).
        frozen_stages: -1 trains everything; 0 freezes the patch embedding (and absolute position
            embedding); k >= 1 also freezes stages 0..k-1 and the downsample that ends each. Frozen
            parts stay in eval mode, as in mmdetection backbones. Default -1.
        use_checkpoint: gradient checkpointing of every block (less memory, one more forward).
            Default False.
        img_size: the typical training size. As in the official model it only decides whether a stage
            map is no larger than the window (then that stage shrinks its window and does not expand);
            at detection sizes no stage does, so stage 3 also attends to its surroundings.
            Default (800, 1333).
        pad_to: the image is zero-padded bottom/right to this multiple, so that every stage has an exact
            stride; 32 as mmdetection's `size_divisor` and torchvision's detection transform use.
            Default 32.
        norm_layer: normalization layer of the body and of the per-stage output norms `norm{i}`.
            Default nn.LayerNorm.
        model_class: `FocalTransformer`, or `FocalFastTransformer` for a Focal-fast backbone.
            Default `FocalTransformer`.
        **model_kwargs: `model_class` arguments (see `BACKBONE_VARIANTS` for Focal-T/S/B and
            Focal-fast-T/S/B); `num_classes` is 0 (no head).
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 use_checkpoint: bool = False, img_size: Union[int, Tuple[int, int]] = (800, 1333),
                 pad_to: int = 32, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 model_class: type = FocalTransformer, **model_kwargs):
        super().__init__()
        self.body = model_class(img_size=img_size, num_classes=0, use_checkpoint=use_checkpoint,
                                norm_layer=norm_layer, **model_kwargs)
        num_stages = len(self.body.layers)
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f'out_indices must be a non-empty subset of 0..{num_stages - 1}, got {list(out_indices)}')
        if pad_to < 1:
            raise ValueError(f'pad_to must be a positive multiple, got {pad_to}')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must lie in [-1, {num_stages}], got {frozen_stages}')
        self.out_indices = tuple(sorted(set(out_indices)))
        self.frozen_stages = frozen_stages
        self.pad_to = pad_to
        self.feature_info = [self.body.feature_info[i] for i in self.out_indices]
        self.out_channels = [info['num_chs'] for info in self.feature_info]
        self.strides = [info['reduction'] for info in self.feature_info]
        self._pruned_prefixes = self._prune_body()
        for i, channels in zip(self.out_indices, self.out_channels):
            self.add_module(f'norm{i}', norm_layer(channels))
        self.freeze_stages()

    def _prune_body(self) -> Tuple[str, ...]:
        """Remove the body's head, final norm and whatever follows the last output stage (unused
        parameters break DDP); return the checkpoint key prefixes left without a home (the
        filter itself drops a classifier head)."""
        num_stages, last = len(self.body.layers), self.out_indices[-1]
        prefixes = ('norm.',)
        if last < num_stages - 1:
            prefixes += (f'layers.{last}.downsample.',) + tuple(f'layers.{i}.' for i in range(last + 1, num_stages))
        self.body.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        return prefixes

    def stage_norm(self, index: int) -> nn.Module:
        return getattr(self, f'norm{index}')

    def freeze_stages(self) -> None:
        """Stop gradients to (and put in eval mode) the parts `frozen_stages` names."""
        if self.frozen_stages < 0:
            return
        frozen = [self.body.patch_embed] + list(self.body.layers[:self.frozen_stages])
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False
        if self.body.ape:
            self.body.absolute_pos_embed.requires_grad = False

    def train(self, mode: bool = True) -> 'FocalBackbone':
        super().train(mode)
        self.freeze_stages()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.body.set_grad_checkpointing(enable)

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The raw (B, H_i, W_i, C_i) stage outputs (before the stage norms) of the padded image."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.pad_to, -width % self.pad_to
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return tuple(self.body.forward_intermediates(
            x, indices=list(self.out_indices), stop_early=True, output_fmt='NHWC', intermediates_only=True))

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        features = OrderedDict()
        for i, stage in zip(self.out_indices, self.forward_stages(x)):
            features[str(i)] = self.stage_norm(i)(stage).permute(0, 3, 1, 2).contiguous()
        return features

    def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Load a classification checkpoint's dict (ours or released; `model`/`state_dict` wrappers and
        `module.` prefixes allowed) or a detector checkpoint whose backbone keys start with
        `backbone.`. The body's weights go through `checkpoint_filter_fn` and, for another `in_chans`,
        timm's stem adaptation, as timm loads them, and load strictly; the stage norms load from
        `norm{i}` keys when present, else are initialised (weight 1, bias 0). Every adaptation is
        logged; a checkpoint of another architecture raises ValueError."""
        state_dict = _backbone_state_dict(checkpoint)
        stage_norms, body = {}, {}
        for name, value in state_dict.items():
            (stage_norms if STAGE_NORM.match(name) else body)[name] = value
        for prefix in self._pruned_prefixes:
            dropped = [name for name in body if name.startswith(prefix)]
            if dropped:
                _logger.warning('checkpoint %s* (%d tensors) is not used by the backbone: dropped',
                                prefix, len(dropped))
                body = {k: v for k, v in body.items() if not k.startswith(prefix)}
        body = checkpoint_filter_fn(body, self.body)
        stem = f'{STEM_CONV}.weight'
        body[stem] = adapt_input_conv(self.body.in_chans, body[stem])
        self.body.load_state_dict(body, strict=True)
        self._load_stage_norms(stage_norms)
        self.freeze_stages()

    def _load_stage_norms(self, state_dict: Dict[str, torch.Tensor]) -> None:
        wanted = {f'norm{i}' for i in self.out_indices}
        for name in sorted({STAGE_NORM.match(k).group(0)[:-1] for k in state_dict} - wanted):
            _logger.warning('checkpoint %s is not an output stage norm of this backbone: dropped', name)
        for i in self.out_indices:
            norm = self.stage_norm(i)
            own = {k[len(f'norm{i}.'):]: v for k, v in state_dict.items() if k.startswith(f'norm{i}.')}
            if own:
                norm.load_state_dict(own, strict=True)
            else:
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
                _logger.warning('checkpoint lacks norm%d (stage %d output norm): initialised to weight 1, bias 0', i, i)

    @classmethod
    def from_pretrained(cls, variant: str, checkpoint: Optional[Checkpoint] = None, **kwargs) -> 'FocalBackbone':
        """`variant` from `BACKBONE_VARIANTS`, weights from `checkpoint` when given."""
        backbone = focal_backbone(variant, **kwargs)
        if checkpoint is not None:
            backbone.load_checkpoint(checkpoint)
        return backbone


def focal_backbone(variant: str = 'focal_tiny', **kwargs) -> FocalBackbone:
    """A FocalBackbone with the architecture of Focal-T/S/B ('focal_tiny', 'focal_small',
    'focal_base') or Focal-fast-T/S/B ('focalv2_tiny', ...); `kwargs` override it (e.g.
    use_conv_embed=True, drop_path_rate=0.3)."""
    if variant not in BACKBONE_VARIANTS:
        raise ValueError(f'unknown backbone variant {variant!r}; choose from {sorted(BACKBONE_VARIANTS)}')
    return FocalBackbone(**dict(BACKBONE_VARIANTS[variant], **kwargs))


def _backbone_state_dict(checkpoint: Checkpoint) -> Dict[str, torch.Tensor]:
    """The flat state dict of a checkpoint dict: unwrapped from 'model' / 'state_dict', `module.`
    prefixes removed, and, for a detector checkpoint, only the `backbone.` keys, unprefixed."""
    state_dict = unwrap_state_dict(checkpoint)
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    if backbone:
        others = len(state_dict) - len(backbone)
        _logger.info('detector checkpoint: using its %d backbone.* tensors, ignoring %d others', len(backbone), others)
        return backbone
    return state_dict
