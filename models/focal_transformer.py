"""Focal Transformer (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision
Transformers", NeurIPS 2021).

Each query window attends to three kinds of keys at once:
  * its own window tokens (fine, with a Swin-style relative position bias),
  * the ring of `expand_size` tokens around the window (fine surroundings, gathered from four
    corner-shifted windows that wrap around the feature map cyclically),
  * pooled tokens of the neighbouring windows at each coarser focal level (one pooled token per
    sub-window, neighbours outside the map are zero and masked by -100).

The official implementation builds the key sets with `torch.roll`, `nn.Unfold` and in-place bias
slices. Here this file says what each window attends to and which position terms it adds; the
`focal_attention` package says how: every key set is one precomputed index map per feature size,
shared by all blocks of the same geometry, and the attention runs through SDPA or a fused Triton
kernel (`attn_backend`). Parameter names and shapes equal the official ones, so released
checkpoints load through `checkpoint_filter_fn`, and compute the same function on either backend.
"""
import contextlib
import functools
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, SelectAdaptivePool2d, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, register_model, register_notrace_function, register_notrace_module
from timm.models._features import feature_take_indices

from .focal_attention import (BackendRecord, FocalGeometry, WindowLayout, check_backend, focal_attention,
                              selection_state_from_official, stage_block_shift_and_expand, window_layout)
from .focal_attention.geometry import SURROUNDINGS, WINDOW

_logger = logging.getLogger(__name__)

__all__ = ['FocalTransformer', 'checkpoint_filter_fn', 'unwrap_state_dict']

POOL_METHODS = ('fc', 'mean', 'max', 'conv', 'none')
EXPAND_LAYERS = ('all', 'even', 'odd')
GLOBAL_POOLS = ('', 'avg', 'max', 'avgmax', 'catavgmax')  # timm's global poolings of an NHWC map ('': none)


def check_global_pool(global_pool: str) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}')


def stage_indices(num_stages: int, indices: Optional[Union[int, Sequence[int]]],
                  argument: str) -> Tuple[List[int], int]:
    """timm's `feature_take_indices` (None: every stage, an int n: the last n, a sequence: those
    stages, negative ones from the end): the absolute indices and the largest. An index out of range
    is a ValueError naming `argument` (timm asserts)."""
    if isinstance(indices, int):
        valid = 1 <= indices <= num_stages
    else:
        valid = indices is None or (len(indices) > 0 and all(-num_stages <= i < num_stages for i in indices))
    if not valid:
        raise ValueError(f'{argument} must be stage indices in {-num_stages}..{num_stages - 1} or a number '
                         f'1..{num_stages} of last stages, got {indices!r}')
    return feature_take_indices(num_stages, indices)


@register_notrace_function  # for timm's FX feature extraction: whether to resize depends on the map size
def resize_position_embedding(embedding: torch.Tensor, grid: Tuple[int, int], height: int, width: int) -> torch.Tensor:
    """(1, grid_h*grid_w, C) absolute position embedding -> (1, height*width, C), bicubically resized."""
    if (height, width) == grid:
        return embedding
    embedding = embedding.transpose(1, 2).reshape(1, -1, *grid)
    embedding = F.interpolate(embedding, size=(height, width), mode='bicubic', align_corners=False)
    return embedding.flatten(2).transpose(1, 2)


class WindowAttentionBase(nn.Module):
    """What the focal attentions share: queries, keys and values of a window's map (`qkv`), keys and
    values of pooled tokens, the attention of each window over the keys its layout lists, plus the
    position terms of the subclass (`position_bias`), and the output projection (added by the
    subclass: `add_projections`).

    Args:
        dim: number of input channels.
        geometry: the block's key plan, from which `build_layout` makes the index maps of a map size.
        num_heads: number of attention heads; must divide `dim`.
        qk_scale: overrides the default query-key scale head_dim ** -0.5 if set. Default None.
        attn_drop: dropout ratio of the attention weights. Default 0.
        attn_backend: 'auto', 'sdpa' or 'fused' (see `focal_attention`). Default 'auto'.
    """

    def __init__(self, dim: int, geometry, num_heads: int, qk_scale: Optional[float] = None, attn_drop: float = 0.,
                 attn_backend: str = 'auto'):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.geometry = geometry
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.attn_backend = check_backend(attn_backend)
        self.backend_record = BackendRecord()
        self._layout = None

    def add_projections(self, qkv_bias: bool, proj_drop: float) -> None:
        """The qkv and output projections. A subclass adds them after its position terms, so that
        parameters keep the order of earlier versions (optimizer states are stored in that order)."""
        self.qkv = nn.Linear(self.dim, self.dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(self.dim, self.dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def window_size(self) -> int:
        return self.geometry.window_size

    def build_layout(self, height: int, width: int, device: torch.device):
        """The index maps of an (height, width) map for this module's geometry."""
        raise NotImplementedError

    def position_bias(self, layout) -> torch.Tensor:
        """The position terms of every query and key slot of `layout`: (nH, ws^2, S), the same for
        every window, or (nH, nW, ws^2, S)."""
        raise NotImplementedError

    def layout(self, height: int, width: int, device: torch.device):
        """`build_layout` of an (height, width) input map; the last one is remembered on the module:
        compiled graphs then read an attribute instead of a cache."""
        layout = self._layout
        if layout is None or layout.size != (height, width) or layout.key_index.device != device:
            layout = self._layout = self.build_layout(height, width, device)
        return layout

    def forward(self, x: torch.Tensor, pooled: List[torch.Tensor], layout,
                regather_keys: bool = True) -> torch.Tensor:
        """x: (B, Hp, Wp, C) padded (and shifted) map; pooled: per level (B, P_k, C) pooled tokens.
        Returns (B, Hp*Wp, C).

        regather_keys: with the SDPA backend in eager training, save the ungathered keys and values
        for backward and gather them again there (see `focal_attention.regather`); callers that
        recompute the whole block pass False.
        """
        B, H, W, C = x.shape
        qkv = self.qkv(x).view(B, H * W, 3 * C)
        pooled_kv = None
        if pooled:
            kv_weight, kv_bias = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
            pooled_kv = F.linear(torch.cat(pooled, 1), kv_weight, kv_bias).to(qkv.dtype)
        out = focal_attention(qkv, pooled_kv, self.position_bias(layout), layout, self.num_heads, self.scale,
                              dropout_p=self.attn_drop if self.training else 0., backend=self.attn_backend,
                              regather_keys=regather_keys, record=self.backend_record)
        return self.proj_drop(self.proj(out))


class FocalWindowAttention(WindowAttentionBase):
    """Focal self-attention of each ws x ws query window over its own tokens, its fine-grained
    surroundings and the pooled tokens of neighbouring windows at each coarser level.

    The module holds one position-bias table per key group, with the names and shapes of the
    official `WindowAttention`, and the geometry's index into them.

    Args:
        dim: number of input channels.
        geometry: the block's key sets (`FocalGeometry.of_block`: window size, expand size, focal
            window, pooled levels and shift, the official `WindowAttention`'s arguments).
        num_heads: number of attention heads; must divide `dim`.
        qkv_bias: add a learnable bias to query, key and value. Default True.
        qk_scale: overrides the default query-key scale head_dim ** -0.5 if set. Default None.
        attn_drop: dropout ratio of the attention weights. Default 0.
        proj_drop: dropout ratio of the output. Default 0.
        attn_backend: 'auto', 'sdpa' or 'fused' (see `focal_attention`). Default 'auto'.
    """

    def __init__(self, dim: int, geometry: FocalGeometry, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 attn_backend: str = 'auto'):
        super().__init__(dim, geometry, num_heads, qk_scale, attn_drop, attn_backend)
        self.key_groups = geometry.key_groups
        area = geometry.window_size ** 2
        for group in self.key_groups:
            if group.kind == WINDOW:  # (table, nH)
                self.relative_position_bias_table = nn.Parameter(torch.zeros(group.table_size, num_heads))
            elif group.kind == SURROUNDINGS:  # a term per query and surrounding key: (1, nH, ws^2, keys)
                self.relative_position_bias_table_to_neighbors = nn.Parameter(
                    torch.zeros(1, num_heads, area, group.num_keys))
                trunc_normal_(self.relative_position_bias_table_to_neighbors, std=.02)
            else:  # one (nH, table) per pooled level
                if group.level == 0:
                    self.relative_position_bias_table_to_windows = nn.ParameterList()
                table = nn.Parameter(torch.zeros(num_heads, group.table_size))
                trunc_normal_(table, std=.02)
                self.relative_position_bias_table_to_windows.append(table)
        self.register_buffer('position_bias_index', geometry.position_bias_index(), persistent=False)
        self.add_projections(qkv_bias, proj_drop)

    @property
    def num_surrounding(self) -> int:
        return self.geometry.num_surrounding_keys

    @property
    def num_pooled_levels(self) -> int:
        return self.geometry.num_pooled_levels

    @property
    def num_attended_keys(self) -> int:
        return self.geometry.num_attended_keys

    @property
    def num_keys(self) -> int:
        return self.geometry.num_keys

    def build_layout(self, height: int, width: int, device: torch.device) -> WindowLayout:
        """The shared index maps of an (height, width) map (see `focal_attention.geometry`)."""
        return window_layout(height, width, self.geometry, device)

    def position_bias(self, layout: Optional[WindowLayout] = None) -> torch.Tensor:
        """All relative position terms as one (nH, ws^2, S) tensor, the same for every window and
        map size (`layout` is not needed): the key groups' tables as (nH, table) in key order,
        gathered once by the geometry's index."""
        tables = []
        for group in self.key_groups:
            if group.kind == WINDOW:
                tables.append(self.relative_position_bias_table.t())
            elif group.kind == SURROUNDINGS:
                tables.append(self.relative_position_bias_table_to_neighbors[0].flatten(1))
            else:
                tables.append(self.relative_position_bias_table_to_windows[group.level])
        return torch.cat(tables, 1)[:, self.position_bias_index]

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'surrounding={self.num_surrounding}, pooled_levels={self.num_pooled_levels}, '
                f'attn_backend={self.attn_backend!r}')


@register_notrace_module  # a leaf (with its subclasses) for timm's FX feature extraction: layouts come from map sizes
class FocalBlockBase(nn.Module):
    """Pre-norm block around a window attention (`attn`, a `WindowAttentionBase`): the map padded to
    window multiples (and shifted), pooled per level, attended, cropped; then the MLP; each with a
    residual and optional layer scale. Subclasses give the geometry of their key plan and
    `attention`, which builds the attention module for it (called where the official block builds
    it, so that a seed initialises the same weights).

    Args:
        dim: number of input channels.
        geometry: the key plan of the block (`FocalGeometry` or `NearestGeometry`): its window size
            and number of pooled levels.
        attention: makes the block's attention module (a `WindowAttentionBase`).
        mlp_ratio: ratio of the MLP's hidden width to `dim`. Default 4.
        drop: dropout rate of the MLP. Default 0.
        drop_path: stochastic depth rate. Default 0.
        act_layer: activation layer of the MLP. Default nn.GELU.
        norm_layer: normalization layer. Default nn.LayerNorm.
        pool_method: how level k pools sub-windows of side ws // 2^k into one token: 'fc' (a learned
            weight per position), 'conv' (depthwise), 'mean', 'max' or 'none' (no pooled levels).
            Default 'none'.
        use_layerscale: layer scale (a learned per-channel factor on both residual branches), for
            training stability. Default False.
        layerscale_value: initial value of the layer scale. Default 1e-4.
    """

    def __init__(self, dim: int, geometry, attention: Callable[[], WindowAttentionBase], mlp_ratio: float = 4.,
                 drop: float = 0., drop_path: float = 0., act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 pool_method: str = 'none', use_layerscale: bool = False, layerscale_value: float = 1e-4):
        super().__init__()
        self.dim = dim
        self.pool_method = pool_method

        self.pool_layers = nn.ModuleList()
        if pool_method in ('fc', 'conv'):
            for level in range(geometry.num_pooled_levels):
                pool_size = geometry.window_size // 2 ** level
                if pool_method == 'fc':
                    self.pool_layers.append(nn.Linear(pool_size * pool_size, 1))
                else:
                    self.pool_layers.append(nn.Conv2d(dim, dim, pool_size, stride=pool_size, groups=dim))

        self.norm1 = norm_layer(dim)
        self.attn = attention()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    @property
    def geometry(self):
        return self.attn.geometry

    @property
    def window_size(self) -> int:
        return self.attn.geometry.window_size

    @property
    def shift_size(self) -> int:
        return self.attn.geometry.shift_size

    def layout(self, height: int, width: int, device: torch.device):
        """The index maps of an (height, width) input map (see `WindowAttentionBase.layout`)."""
        return self.attn.layout(height, width, device)

    def pool(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Pool the (B, Hp, Wp, C) map, whole windows, into (nWh * 2^k) x (nWw * 2^k) sub-windows of
        side ws // 2^k. Where 2^k does not divide ws, the sub-windows leave rows and columns over:
        they are trimmed evenly from both sides, the odd one from the bottom / right, as the
        official model trims. Returns (B, P_k, C)."""
        B, H, W, C = x.shape
        size = self.window_size // 2 ** level
        grid_h, grid_w = H // self.window_size * 2 ** level, W // self.window_size * 2 ** level
        top, left = (H - grid_h * size) // 2, (W - grid_w * size) // 2
        x = x[:, top:top + grid_h * size, left:left + grid_w * size]
        if self.pool_method == 'conv':
            return self.pool_layers[level](x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        windows = x.reshape(B, grid_h, size, grid_w, size, C)
        if self.pool_method == 'mean':
            pooled = windows.mean((2, 4))
        elif self.pool_method == 'max':
            pooled = windows.amax((2, 4))
        else:
            fc = self.pool_layers[level]
            pooled = torch.einsum('bhiwjc,ij->bhwc', windows, fc.weight.view(size, size)) + fc.bias
        return pooled.reshape(B, grid_h * grid_w, C)

    def forward(self, x: torch.Tensor, height: int, width: int, regather_keys: bool = True) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C). regather_keys: see `WindowAttentionBase.forward`."""
        B, L, C = x.shape
        layout = self.layout(height, width, x.device)
        padded_h, padded_w = layout.padded_size
        y = self.norm1(x).view(B, height, width, C)
        if (padded_h, padded_w) != (height, width):
            y = F.pad(y, (0, 0, 0, padded_w - width, 0, padded_h - height))
        if self.shift_size:
            y = y.reshape(B, -1, C).index_select(1, layout.shift_gather).view(B, padded_h, padded_w, C)
        pooled = [self.pool(y, level) for level in range(self.geometry.num_pooled_levels)]
        y = self.attn(y, pooled, layout, regather_keys)
        if self.shift_size:
            y = y.index_select(1, layout.unshift_gather)
        else:
            y = y.view(B, padded_h, padded_w, C)[:, :height, :width].reshape(B, L, C)
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path(y)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path(y)


class FocalTransformerBlock(FocalBlockBase):
    """The Focal Transformer block (official arguments): focal window attention over each window's
    own tokens, its surroundings and pooled neighbours (`FocalWindowAttention`), then the MLP.

    `input_resolution` only decides, as in the official model, whether the map is no larger than
    the window; then the window shrinks to the map and neither expansion nor shift is used. The
    block itself runs on any map size, padding it to window multiples.

    Args:
        dim: number of input channels.
        input_resolution: (height, width) of the map at the size the model is built for.
        num_heads: number of attention heads; must divide `dim`.
        window_size: side of the query windows. Default 7.
        expand_size: width of the ring of fine surroundings each window attends to (the first focal
            level); 0: none. Default 0.
        shift_size: Swin's cyclic shift of the windows, in tokens; 0: none. Default 0.
        mlp_ratio: ratio of the MLP's hidden width to `dim`. Default 4.
        qkv_bias: add a learnable bias to query, key and value. Default True.
        qk_scale: overrides the default query-key scale head_dim ** -0.5 if set. Default None.
        drop: dropout rate (MLP and attention output). Default 0.
        attn_drop: attention dropout rate. Default 0.
        drop_path: stochastic depth rate. Default 0.
        act_layer: activation layer of the MLP. Default nn.GELU.
        norm_layer: normalization layer. Default nn.LayerNorm.
        pool_method: window pooling method: 'none', 'fc', 'conv', 'mean' or 'max'. Default 'none'.
        focal_level: number of focal levels: 1 attends to the fine surroundings, each further level
            adds a pooled level (focal_level - 1 of them, none with pool_method 'none'). Default 1.
        focal_window: region size of focal attention: the side of the neighbourhood of pooled
            sub-windows at the first pooled level (focal_window + 2^k - 1 at level k). Default 1.
        use_layerscale: layer scale, for training stability. Default False.
        layerscale_value: initial value of the layer scale. Default 1e-4.
        attn_backend: 'auto', 'sdpa' or 'fused' (see `focal_attention`). Default 'auto'.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 expand_size: int = 0, shift_size: int = 0, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, pool_method: str = 'none', focal_level: int = 1,
                 focal_window: int = 1, use_layerscale: bool = False, layerscale_value: float = 1e-4,
                 attn_backend: str = 'auto'):
        geometry = FocalGeometry.of_block(input_resolution, window_size, expand_size, shift_size, focal_window,
                                          focal_level, pool_method)
        attention = functools.partial(FocalWindowAttention, dim, geometry, num_heads=num_heads, qkv_bias=qkv_bias,
                                      qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
                                      attn_backend=attn_backend)
        super().__init__(dim, geometry, attention, mlp_ratio=mlp_ratio, drop=drop, drop_path=drop_path,
                         act_layer=act_layer, norm_layer=norm_layer, pool_method=pool_method,
                         use_layerscale=use_layerscale, layerscale_value=layerscale_value)


class PatchEmbed(nn.Module):
    """Image (stem) or feature map (downsample between stages) to tokens: a strided convolution,
    overlapping (7x7/4 stem, 3x3/2 between stages) with `use_conv_embed`, then an optional norm.
    (B, C_in, H, W) -> (B, H'*W', C_out), (H', W')."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, use_conv_embed: bool = False,
                 norm_layer=None, use_pre_norm: bool = False, is_stem: bool = False):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        if use_conv_embed:
            kernel_size, padding, stride = (7, 2, 4) if is_stem else (3, 1, 2)
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pre_norm = nn.GroupNorm(1, in_chans) if use_pre_norm and norm_layer is not None else None
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.proj(x)
        size = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, (size[0], size[1])


class TokensToMap(nn.Module):
    """(B, H*W, C) tokens of an (H, W) map -> the (B, C, H, W) map. A module of its own so that
    timm's hook and FX feature extractors can name each stage's output map (`feature_info`): under FX,
    'layers.{i}' would also take in the downsample that follows, a child of the same stage."""

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], -1, height, width)


class FocalStage(nn.Module):
    """The blocks of one stage, then (except in the last stage) the patch embedding that halves the
    map. `forward` runs the blocks only, so that callers can take the stage output before it:
    (B, H*W, C) tokens of an (H, W) map -> the (B, C, H, W) map.
    block_layer: the block class, called with `FocalTransformerBlock`'s arguments."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, num_heads: int, window_size: int,
                 expand_size: int, expand_layer: str = 'all', mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: Union[float, Sequence[float]] = 0., norm_layer=nn.LayerNorm, pool_method: str = 'none',
                 focal_level: int = 1, focal_window: int = 1, use_conv_embed: bool = False, use_shift: bool = False,
                 use_pre_norm: bool = False, downsample: bool = False, use_checkpoint: bool = False,
                 use_layerscale: bool = False, layerscale_value: float = 1e-4, attn_backend: str = 'auto',
                 block_layer: Callable[..., FocalBlockBase] = FocalTransformerBlock):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        drop_path = drop_path if isinstance(drop_path, Sequence) else [drop_path] * depth
        self.blocks = nn.ModuleList()
        for i in range(depth):
            shift_size, block_expand_size = stage_block_shift_and_expand(i, window_size, expand_size, use_shift,
                                                                         expand_layer)
            self.blocks.append(block_layer(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
                shift_size=shift_size, expand_size=block_expand_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                drop_path=drop_path[i], norm_layer=norm_layer, pool_method=pool_method,
                focal_level=focal_level, focal_window=focal_window,
                use_layerscale=use_layerscale, layerscale_value=layerscale_value, attn_backend=attn_backend))
        self.to_map = TokensToMap()
        self.downsample = PatchEmbed(
            patch_size=2, in_chans=dim, embed_dim=2 * dim, use_conv_embed=use_conv_embed,
            norm_layer=norm_layer, use_pre_norm=use_pre_norm) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, height, width, regather_keys=False,
                                                      use_reentrant=False)
            else:
                x = block(x, height, width)
        return self.to_map(x, height, width)


class FocalTransformer(nn.Module):
    """Focal Transformer classifier. Keyword arguments, their meaning and defaults follow the
    official `FocalTransformer`; `expand_stages` is honoured (stages outside it do not expand).

    The model accepts any input size: `img_size` only fixes the parameter shapes (where a stage map
    is no larger than the window); maps are padded to window multiples at run time.

    The methods follow timm's conventions (as its Swin port): `forward_features` gives the normed final
    map, (B, H, W, C); `forward_head` pools it by `global_pool` (one of GLOBAL_POOLS; 'avg', the
    official model's pooling, by default) and classifies, or with `pre_logits=True` gives the pooled
    (B, head_hidden_size) features, what the official `forward_features` returns.

    Args:
        img_size: input image size, int or (height, width); fixes the absolute position embedding
            and which stages are no larger than a window. Default 224.
        patch_size: side of the patches the stem embeds (the stem's stride). Default 4.
        in_chans: number of input image channels. Default 3.
        num_classes: number of classes of the classification head; 0: no head. Default 1000.
        embed_dim: patch embedding dimension, the first stage's width (doubled at every stage). Default 96.
        depths: number of blocks of each stage. Default (2, 2, 6, 2).
        num_heads: number of attention heads of each stage. Default (3, 6, 12, 24).
        window_size: side of the query windows; a stage whose map (at `img_size`) is no larger uses
            the map as its window, without surroundings or shift. Default 7.
        mlp_ratio: ratio of the MLP's hidden width to the embedding width. Default 4.
        qkv_bias: add a learnable bias to query, key and value. Default True.
        qk_scale: overrides the default query-key scale head_dim ** -0.5 if set. Default None.
        drop_rate: dropout rate (after the embedding, in the MLPs, after the attention projection). Default 0.
        attn_drop_rate: attention dropout rate, on the attention weights (the fused kernel has none:
            SDPA runs while it is active). Default 0.
        drop_path_rate: stochastic depth rate, reached by the last block (linear from 0). Default 0.1.
        norm_layer: normalization layer (after the patch embedding, in every block, at the end).
            Default nn.LayerNorm.
        ape: add an absolute position embedding to the patch embedding. Default False.
        patch_norm: add normalization after the patch embedding. Default True.
        use_checkpoint: gradient checkpointing of every block, to save memory. Default False.
        use_shift: Swin Transformer's window shift, by half a window in every other block (the
            paper observes it makes no difference to Focal Transformer). Default False.
        focal_stages: the stages that perform focal attention (have pooled levels). Default (0, 1, 2, 3).
        focal_levels: focal levels of each stage, the finest-grained one (the window's own tokens)
            excluded: level 1 is the window's fine surroundings, each further level one pooled level.
            Default (1, 1, 1, 1).
        focal_windows: focal window size of each stage, the side of the neighbourhood of pooled
            sub-windows a window attends to at the first pooled level. Default (7, 5, 3, 1).
        focal_pool: how sub-windows are pooled: 'fc' (a learned weight per position), 'conv'
            (depthwise), 'mean', 'max' or 'none' (no pooled levels). Default 'fc'.
        expand_stages: the stages whose windows attend to their fine surroundings. Default (0, 1, 2, 3).
        expand_sizes: width of the ring of fine surroundings of each stage's windows. Default (3, 3, 3, 3).
        expand_layer: which blocks of a stage have fine surroundings: 'all', or 'even' / 'odd',
            which leave the even / odd blocks without (less compute and memory). Default 'all'.
        use_conv_embed: overlapping convolutional patch embedding (7x7 stride 4 stem, 3x3 stride 2
            between stages), which usually improves performance. Default False.
        use_layerscale: layer scale, as proposed in CaiT. Default False.
        layerscale_value: initial value of the layer scale. Default 1e-4.
        use_pre_norm: normalize (GroupNorm) the input of the patch embeddings between stages, to
            control the feature magnitude. Default False.
        attn_backend: how focal attention runs: 'auto' (SDPA, except on GPU architectures where the
            fused kernel was verified correct and faster), 'sdpa' or 'fused' (the Triton kernel
            wherever it can run; see `models.focal_attention.backends`); `set_attn_backend` switches
            it later. Default 'auto'.
        global_pool: timm's pooling of the final map before the head, one of GLOBAL_POOLS ('' for
            none). Default 'avg', the official model's.
        block_layer: the block class of every stage, called with `FocalTransformerBlock`'s arguments
            (`FocalFastTransformer` passes Focal-fast's block). Default `FocalTransformerBlock`.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False, use_shift: bool = False,
                 focal_stages: Sequence[int] = (0, 1, 2, 3), focal_levels: Sequence[int] = (1, 1, 1, 1),
                 focal_windows: Sequence[int] = (7, 5, 3, 1), focal_pool: str = 'fc',
                 expand_stages: Sequence[int] = (0, 1, 2, 3), expand_sizes: Sequence[int] = (3, 3, 3, 3),
                 expand_layer: str = 'all', use_conv_embed: bool = False, use_layerscale: bool = False,
                 layerscale_value: float = 1e-4, use_pre_norm: bool = False, attn_backend: str = 'auto',
                 global_pool: str = 'avg', block_layer: Callable[..., FocalBlockBase] = FocalTransformerBlock):
        super().__init__()
        # Argument checks: ValueError naming the argument (models.build rewords it with the config key).
        def integers(values, low):  # ints (NumPy's too, not bools) of at least `low`
            return all(hasattr(v, '__index__') and not isinstance(v, bool) and v >= low for v in values)

        num_stages = len(depths)
        if not num_stages or not integers(depths, 1):
            raise ValueError(f'depths must be one positive integer per stage, got {list(depths)}')
        for name, values in (('num_heads', num_heads), ('focal_levels', focal_levels),
                             ('focal_windows', focal_windows), ('expand_sizes', expand_sizes)):
            if len(values) != num_stages:
                raise ValueError(f'{name} has {len(values)} entries, one per stage of depths ({num_stages})')
        for name, value, low in (('embed_dim', embed_dim, 1), ('patch_size', patch_size, 1), ('in_chans', in_chans, 1),
                                 ('window_size', window_size, 1), ('num_classes', num_classes, 0)):
            if not integers([value], low):
                raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
        for stage, heads in enumerate(num_heads):
            if not integers([heads], 1) or (embed_dim * 2 ** stage) % heads:
                raise ValueError(f"num_heads[{stage}] = {heads!r} does not divide the stage's width "
                                 f"{embed_dim * 2 ** stage} (embed_dim x 2^{stage})")
        if not integers(focal_levels, 1):
            raise ValueError(f'focal_levels must be integers >= 1, got {list(focal_levels)}')
        if not integers(focal_windows, 1) or any(w % 2 == 0 for w in focal_windows):
            raise ValueError(f'focal_windows must be odd positive integers, got {list(focal_windows)}')
        if not integers(expand_sizes, 0):
            raise ValueError(f'expand_sizes must be integers >= 0, got {list(expand_sizes)}')
        if not 0 < mlp_ratio < math.inf:
            raise ValueError(f'mlp_ratio must be a positive number, got {mlp_ratio!r}')
        for name, rate in (('drop_rate', drop_rate), ('attn_drop_rate', attn_drop_rate),
                           ('drop_path_rate', drop_path_rate)):
            if not 0 <= rate < 1:
                raise ValueError(f'{name} must lie in [0, 1), got {rate!r}')
        if focal_pool not in POOL_METHODS:
            raise ValueError(f'focal_pool must be one of {POOL_METHODS}, got {focal_pool!r}')
        if expand_layer not in EXPAND_LAYERS:
            raise ValueError(f'expand_layer must be one of {EXPAND_LAYERS}, got {expand_layer!r}')
        smallest = patch_size * 2 ** (num_stages - 1)  # each stage after the first halves the map
        if min(to_2tuple(img_size)) < smallest:
            raise ValueError(f'img_size {img_size} is too small: with patch_size {patch_size} and {num_stages} '
                             f'stages inputs need {smallest} px or more (the last stage needs one token)')
        check_global_pool(global_pool)

        self.in_chans = in_chans
        self.num_layers = num_stages
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (num_stages - 1))
        self.ape = ape
        self.patch_embed = PatchEmbed(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, use_conv_embed=use_conv_embed,
            norm_layer=norm_layer if patch_norm else None, is_stem=True)  # pre-norm only between stages, as official
        img_size = to_2tuple(img_size)
        self.patches_resolution = (img_size[0] // patch_size, img_size[1] // patch_size)
        if ape:
            num_patches = self.patches_resolution[0] * self.patches_resolution[1]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()  # works under a meta device
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            dim = int(embed_dim * 2 ** i)
            self.layers.append(FocalStage(
                dim=dim,
                input_resolution=(self.patches_resolution[0] // 2 ** i, self.patches_resolution[1] // 2 ** i),
                depth=depths[i], num_heads=num_heads[i], window_size=window_size,
                expand_size=expand_sizes[i] if i in expand_stages else 0, expand_layer=expand_layer,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=drop_path[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                pool_method=focal_pool if i in focal_stages else 'none', focal_level=focal_levels[i],
                focal_window=focal_windows[i], use_conv_embed=use_conv_embed, use_shift=use_shift,
                use_pre_norm=use_pre_norm, downsample=i < num_stages - 1, use_checkpoint=use_checkpoint,
                use_layerscale=use_layerscale, layerscale_value=layerscale_value, attn_backend=attn_backend,
                block_layer=block_layer))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f'layers.{i}.to_map'))
        self.norm = norm_layer(self.num_features)
        self.output_fmt = 'NHWC'  # of forward_features, for timm
        self.reset_classifier(num_classes, global_pool)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table', 'relative_position_bias_table_to_neighbors',
                'relative_position_bias_table_to_windows'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.use_checkpoint = enable

    def set_attn_backend(self, attn_backend: str) -> None:
        """Switch every block's focal attention to 'auto', 'sdpa' or 'fused' (see `focal_attention`);
        the function the model computes stays the same."""
        check_backend(attn_backend)
        for module in self.modules():
            if isinstance(module, WindowAttentionBase):
                module.attn_backend = attn_backend

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for `num_classes` classes (0: none, the model gives the pooled features) after the
        pooling `global_pool` (one of GLOBAL_POOLS; None keeps the current one), made on the device and
        in the dtype of the model's parameters, in the model's training mode."""
        if global_pool is not None:
            check_global_pool(global_pool)
            self.global_pool = global_pool
        self.pool = SelectAdaptivePool2d(pool_type=self.global_pool, flatten=bool(self.global_pool),
                                         input_fmt='NHWC').train(self.training)
        self.head_hidden_size = self.num_features * self.pool.feat_mult()
        self.num_classes = num_classes
        stem = self.patch_embed.proj.weight
        self.head = (nn.Linear(self.head_hidden_size, num_classes, device=stem.device, dtype=stem.dtype)
                     if num_classes > 0 else nn.Identity()).train(self.training)

    def stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """(B, C, H, W) image -> (B, H/4*W/4, embed_dim) tokens and their map size."""
        x, (height, width) = self.patch_embed(x)
        if self.ape:
            x = x + resize_position_embedding(self.absolute_pos_embed, self.patches_resolution, height, width)
        return self.pos_drop(x), height, width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H_n, W_n, num_features) final map, normed (timm's convention; the
        official method also pools it: `forward_head(x, pre_logits=True)`)."""
        x, height, width = self.stem(x)
        for stage in self.layers:
            x = stage(x, height, width)
            if stage.downsample is not None:
                x, (height, width) = stage.downsample(x)
        return self.norm(x.permute(0, 2, 3, 1))

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's multi-scale API: the outputs of the stages in `indices` (last n if int, all if
        None), each taken after the stage's blocks and before its downsample, as (B, C_i, H_i, W_i)
        ('NCHW') or (B, H_i, W_i, C_i) ('NHWC'). `norm` applies the final norm to the last stage's
        map. Also returns the map `forward_features` would give, or with `stop_early` (which skips
        the stages after the last one taken) that stage's (B, H_i, W_i, C_i) map."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = stage_indices(len(self.layers), indices, 'indices')
        last = max_index if stop_early else len(self.layers) - 1
        intermediates = []
        x, height, width = self.stem(x)
        # no ModuleList slice: PyTorch 2.4's torch.export fails on it
        for i, stage in zip(range(last + 1), self.layers):
            x = stage(x, height, width)  # (B, C, H, W), a view of (B, H, W, C) memory
            if i in take_indices:
                y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if norm and i == len(self.layers) - 1 else x
                intermediates.append(y.contiguous() if output_fmt == 'NCHW' else y.permute(0, 2, 3, 1))
            if stage.downsample is not None and i < last:
                x, (height, width) = stage.downsample(x)
        if intermediates_only:
            return intermediates
        x = x.permute(0, 2, 3, 1)
        return (self.norm(x) if last == len(self.layers) - 1 else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what the stages in `indices` do not need: later stages and the last kept stage's
        downsample, the final norm (`prune_norm`, or when stages were dropped) and the head.
        Returns the absolute indices kept, for `forward_intermediates`."""
        take_indices, max_index = stage_indices(len(self.layers), indices, 'indices')
        prune_end = max_index < len(self.layers) - 1
        if prune_end:
            self.layers = self.layers[:max_index + 1]
            self.layers[max_index].downsample = None
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The (B, H, W, C) map of `forward_features` -> (B, num_classes) logits, or with `pre_logits`
        the (B, head_hidden_size) pooled features (the map itself where `global_pool` is '')."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


OFFICIAL_BUFFERS = ('relative_position_index', 'valid_ind_rolled', 'valid_ind_unfold', 'attn_mask')
STEM_CONV = 'patch_embed.proj'  # the first convolution, `first_conv` in the cfg
POSITION_TABLES = ('relative_position_bias_table', 'relative_position_bias_table_to_neighbors',
                   'relative_position_bias_table_to_windows')
# Focal-fast's selection buffers: which keys each window of one map size sees. A model built for
# another size has its own (`focal_attention.nearest`).
SELECTION_BUFFERS = ('.nearest_index_', '.nearest_offset_')


def is_selection_buffer(name: str) -> bool:
    """Whether state-dict entry `name` is a Focal-fast key selection (for one input size)."""
    return any(buffer in name for buffer in SELECTION_BUFFERS)


def _resize_square(grid: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic resize of (N, s, s) maps to (N, side, side)."""
    return F.interpolate(grid[None].float(), size=(side, side), mode='bicubic', align_corners=False)[0].to(grid.dtype)


def _adapt_tensor(name: str, value: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """The checkpoint tensor resized to the model's shape, or None when no resize is meaningful."""
    if name.endswith('relative_position_bias_table'):  # (side^2, nH)
        side = math.isqrt(target.shape[0])
        old = math.isqrt(value.shape[0])
        if value.shape[1] == target.shape[1] and old * old == value.shape[0]:
            return _resize_square(value.t().reshape(-1, old, old), side).reshape(target.shape[1], -1).t()
    elif '.relative_position_bias_table_to_windows.' in name:  # (nH, side^2)
        side = math.isqrt(target.shape[1])
        old = math.isqrt(value.shape[1])
        if value.shape[0] == target.shape[0] and old * old == value.shape[1]:
            return _resize_square(value.reshape(-1, old, old), side).reshape(target.shape[0], -1)
    elif name == 'absolute_pos_embed':  # (1, side^2, C)
        side = math.isqrt(target.shape[1])
        old = math.isqrt(value.shape[1])
        if value.shape[2] == target.shape[2] and old * old == value.shape[1] and side * side == target.shape[1]:
            return _resize_square(value[0].t().reshape(-1, old, old), side).reshape(target.shape[2], -1).t()[None]
    elif '.pool_layers.' in name and name.endswith('.weight'):  # fc (1, s^2) or depthwise conv (C, 1, s, s)
        old_side, side = math.isqrt(value[0].numel()), math.isqrt(target[0].numel())
        if value.shape[0] == target.shape[0] and old_side * old_side == value[0].numel():
            resized = _resize_square(value.reshape(-1, old_side, old_side), side) * (old_side / side) ** 2
            # rescaled by the area ratio: a pooling window keeps about its total weight
            return resized.reshape(target.shape)
    return None


def unwrap_state_dict(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (under 'model' or 'state_dict', or the dict itself),
    with DDP's `module.` prefixes removed."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in checkpoint.items()}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Turn a checkpoint as the official code (or ours) saves it into a state dict that
    `model.load_state_dict(sd, strict=True)` accepts.

    Accepts a dict holding 'model' or 'state_dict', or a bare state dict, with or without
    `module.` prefixes. Drops the official index/mask buffers (recomputed here) and converts
    Focal-fast's official selection buffers to this model's form (keeping, for another input size
    than the file's, the model's own selection). Adapts, warning once each: a head of another
    class count (re-initialised), position tables, absolute
    position embeddings and pooling weights of another window size (bicubic resize), position
    tables the checkpoint lacks or the model lacks (kept at init / dropped). Anything else that
    differs raises ValueError listing the keys.

    The stem convolution of another input channel count (`in_chans`) is passed on as it is: timm's
    loader adapts it after this filter (`timm.models.adapt_input_conv`), and so must other callers.
    """
    source = selection_state_from_official(unwrap_state_dict(state_dict))
    target = model.state_dict()
    result, unexpected, mismatched = {}, [], []

    for name, value in source.items():
        if name not in target:
            if any(buffer in name for buffer in OFFICIAL_BUFFERS):
                continue
            if name.startswith('head.') or name.endswith('relative_position_bias_table_to_neighbors'):
                _logger.warning('checkpoint %s %s is not used by this model: dropped', name, tuple(value.shape))
                continue
            unexpected.append(name)
            continue
        wanted = target[name]
        if value.shape == wanted.shape:
            result[name] = value
        elif is_selection_buffer(name):
            _logger.info('checkpoint %s %s selects keys for another input size than %s: using the selection '
                         'this model computed for its size', name, tuple(value.shape), tuple(wanted.shape))
            result[name] = wanted
        elif name.startswith('head.'):
            _logger.warning('checkpoint %s %s does not fit the head %s: re-initialised',
                            name, tuple(value.shape), tuple(wanted.shape))
            result[name] = wanted
        elif name == f'{STEM_CONV}.weight' and value.shape[:1] + value.shape[2:] == wanted.shape[:1] + wanted.shape[2:]:
            result[name] = value  # another input channel count, for adapt_input_conv
        else:
            adapted = None if name.endswith('_to_neighbors') else _adapt_tensor(name, value, wanted)
            if adapted is not None:
                _logger.warning('checkpoint %s resized from %s to %s (bicubic)',
                                name, tuple(value.shape), tuple(wanted.shape))
                result[name] = adapted.to(wanted.dtype)
            elif name.endswith('_to_neighbors'):
                _logger.warning('checkpoint %s %s does not fit %s (another window or expand size): kept at init',
                                name, tuple(value.shape), tuple(wanted.shape))
                result[name] = wanted
            else:
                mismatched.append(f'{name} {tuple(value.shape)} vs {tuple(wanted.shape)}')

    missing = []
    for name, wanted in target.items():
        if name in result:
            continue
        if is_selection_buffer(name):
            _logger.info('checkpoint lacks %s: using the selection this model computed for its size', name)
            result[name] = wanted
        elif name.startswith('head.') or any(table in name for table in POSITION_TABLES):
            _logger.warning('checkpoint lacks %s: kept at init', name)
            result[name] = wanted
        else:
            missing.append(name)

    if missing or unexpected or mismatched:
        def listing(title, names):
            shown = ', '.join(names[:8]) + (f', ... ({len(names)} in all)' if len(names) > 8 else '')
            return f'{title}: {shown}' if names else ''
        problems = '; '.join(p for p in (listing('missing', missing), listing('unexpected', unexpected),
                                          listing('shape mismatch', mismatched)) if p)
        raise ValueError(f'checkpoint does not match this {type(model).__name__} architecture: {problems}')
    return result


def create_focal(variant: str, pretrained: bool = False, model_class: type = FocalTransformer, device=None,
                 dtype=None, **kwargs) -> FocalTransformer:
    """`variant`, a registered focal model of `model_class`, through timm's builder (pretrained
    weights through `checkpoint_filter_fn`, then timm's adaptation of the stem to another
    `in_chans`). `features_only` gives NCHW stage maps; by default from `forward_intermediates`,
    with feature_cls='hook' or 'fx' from each stage's `to_map`; an `out_indices` out of range is a
    one-line ValueError. device, dtype (which timm's create_model passes): where and in what
    precision the model is made."""
    num_stages = len(kwargs['depths'])
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages)))
    stage_indices(num_stages, out_indices, 'out_indices')
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(
            model_class, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(feature_cls='getter', out_indices=out_indices, output_fmt='NCHW'),
            **kwargs)
    return model.to(device=device, dtype=dtype)


RELEASE_URL = 'https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k/'  # official README


def release_cfg(file_name: str) -> dict:
    """timm's pretrained cfg of a released ImageNet-1K file."""
    return dict(
        url=RELEASE_URL + file_name, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
        min_input_size=(3, 32, 32),  # one token in the last stage; timm's model tests run at it
        crop_pct=0.875, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv=STEM_CONV, classifier='head', license='mit')


default_cfgs = {
    'focal_tiny_patch4_window7_224': release_cfg('focal-tiny-is224-ws7.pth'),
    'focal_small_patch4_window7_224': release_cfg('focal-small-is224-ws7.pth'),
    'focal_base_patch4_window7_224': release_cfg('focal-base-is224-ws7.pth'),
    'focal_tiny_useconv_patch4_window7_224': release_cfg('focal-tiny-useconv-is224-ws7.pth'),
    'focal_small_useconv_patch4_window7_224': release_cfg('focal-small-useconv-is224-ws7.pth'),
    'focal_base_useconv_patch4_window7_224': release_cfg('focal-base-useconv-is224-ws7.pth'),
}

FOCAL_ARGS = dict(window_size=7, focal_pool='fc', focal_stages=(0, 1, 2, 3), focal_levels=(2, 2, 2, 2),
                  focal_windows=(7, 5, 3, 1), expand_sizes=(3, 3, 3, 3))
TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2, **FOCAL_ARGS)
SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **FOCAL_ARGS)
BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **FOCAL_ARGS)


@register_model
def focal_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return create_focal('focal_tiny_patch4_window7_224', pretrained, **dict(TINY, **kwargs))


@register_model
def focal_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return create_focal('focal_small_patch4_window7_224', pretrained, **dict(SMALL, **kwargs))


@register_model
def focal_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return create_focal('focal_base_patch4_window7_224', pretrained, **dict(BASE, **kwargs))


@register_model
def focal_tiny_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return create_focal('focal_tiny_useconv_patch4_window7_224', pretrained,
                        **dict(TINY, use_conv_embed=True, **kwargs))


@register_model
def focal_small_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return create_focal('focal_small_useconv_patch4_window7_224', pretrained,
                        **dict(SMALL, use_conv_embed=True, **kwargs))


@register_model
def focal_base_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return create_focal('focal_base_useconv_patch4_window7_224', pretrained,
                        **dict(BASE, use_conv_embed=True, **kwargs))
