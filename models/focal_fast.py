"""Focal-fast, the official "Faster Focal Transformer" (`classification/focal_transformer_v2.py`):
the Focal Transformer with each window attending to the K tokens nearest to its centre and the K
pooled windows nearest to it, instead of its own tokens, a rolled ring of surroundings and unfolded
pooled neighbourhoods (see `focal_attention.nearest`). The position term of a query and key is a
small MLP per level (`coord2rpb_all`) of their relative coordinates, not a table. The patch
embedding (convolutional with `use_conv_embed`, also between stages), stages, pooling, MLPs and head
are the Focal Transformer's.

Parameter names and shapes equal the official ones. The official model stores each block's key
selection in a per-query form (`topk_cloest_indice_{l}`, `topk_cloest_coords_{l}`, `window_coords`);
this one in a per-window form (`nearest_index_{l}`, `nearest_offset_{l}`), into which
`checkpoint_filter_fn` converts released files. At the input size a model is built for it computes
with the selection it holds (a released file's own: ties between equidistant keys are part of the
trained model); other sizes get their own selection, computed once and cached.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.models import register_model

from .focal_attention import NearestGeometry, NearestLayout, build_eagerly, nearest_layout, nearest_selection
from .focal_transformer import (BASE, SMALL, TINY, FocalBlockBase, FocalTransformer, WindowAttentionBase,
                                create_focal, release_cfg)

__all__ = ['FocalFastAttention', 'FocalFastBlock', 'FocalFastTransformer']


class FocalFastAttention(WindowAttentionBase):
    """Attention of each ws x ws window over the keys of its selection at every level, with the
    official `WindowAttention`'s parameters: `qkv`, `proj` and one position MLP per level,
    Linear(2, head_dim) -> ReLU -> Linear(head_dim, num_heads), in `coord2rpb_all`.

    The module holds the selection of `input_resolution` as buffers (`nearest_index_{l}` (nW, K),
    `nearest_offset_{l}` (nW, K, 2)), computed or loaded (`load_state_dict`; the layout reads the
    buffers as loaded, a CPU copy that tracing for export leaves real).

    Args:
        dim: number of input channels.
        geometry: the block's key plan (`NearestGeometry.of_block`: window size, shift, pooled levels, K).
        input_resolution: (height, width) of the map at the size the model is built for, whose
            selection the module holds.
        num_heads: number of attention heads; must divide `dim`.
        qkv_bias: add a learnable bias to query, key and value. Default True.
        qk_scale: overrides the default query-key scale head_dim ** -0.5 if set. Default None.
        attn_drop: dropout ratio of the attention weights. Default 0.
        proj_drop: dropout ratio of the output. Default 0.
        attn_backend: 'auto', 'sdpa' or 'fused' (see `focal_attention`; Focal-fast runs SDPA, since
            its position terms differ between windows). Default 'auto'.
    """

    def __init__(self, dim: int, geometry: NearestGeometry, input_resolution: Tuple[int, int], num_heads: int,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.,
                 proj_drop: float = 0., attn_backend: str = 'auto'):
        super().__init__(dim, geometry, num_heads, qk_scale, attn_drop, attn_backend)
        self.input_resolution = tuple(input_resolution)
        self.add_projections(qkv_bias, proj_drop)
        head_dim = dim // num_heads
        self.coord2rpb_all = nn.ModuleList(
            nn.Sequential(nn.Linear(2, head_dim), nn.ReLU(inplace=True), nn.Linear(head_dim, num_heads))
            for _ in range(geometry.num_levels))
        self._selection = nearest_selection(geometry, *self.input_resolution)
        for level, (index, offset) in enumerate(self._selection):
            self.register_buffer(f'nearest_index_{level}', index.clone())
            self.register_buffer(f'nearest_offset_{level}', offset.clone())

    def build_layout(self, height: int, width: int, device: torch.device) -> NearestLayout:
        """The layout of the held selection at the built size, else of the computed one (cached)."""
        if (height, width) != self.input_resolution:
            return nearest_layout(height, width, self.geometry, device)
        return build_eagerly(lambda: NearestLayout(height, width, self.geometry, self._selection, device))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._selection = tuple((getattr(self, f'nearest_index_{level}').detach().to('cpu', copy=True),
                                 getattr(self, f'nearest_offset_{level}').detach().to('cpu', torch.float32, copy=True))
                                for level in range(self.geometry.num_levels))
        self._layout = None

    def position_bias(self, layout: NearestLayout) -> torch.Tensor:
        """(nH, nW, ws^2, S) position terms, -inf on the layout's alignment slots: each level's MLP
        of the layout's distinct query-minus-key coordinates (the levels' MLPs run together as
        batched matrix products), gathered to every query and key slot of every window."""
        first = [mlp[0] for mlp in self.coord2rpb_all]
        second = [mlp[2] for mlp in self.coord2rpb_all]
        weight1, bias1 = torch.stack([m.weight for m in first]), torch.stack([m.bias for m in first])  # (L, hd, 2)
        weight2, bias2 = torch.stack([m.weight for m in second]), torch.stack([m.bias for m in second])  # (L, nH, hd)
        hidden = torch.baddbmm(bias1[:, None], layout.bias_coords.to(weight1.dtype), weight1.transpose(1, 2)).relu()
        terms = torch.baddbmm(bias2[:, None], hidden, weight2.transpose(1, 2)).flatten(0, 1)  # (L * U, nH)
        terms = torch.cat([terms, terms.new_full((1, terms.shape[1]), float('-inf'))])
        rows = terms.index_select(0, layout.coord_index.flatten()).view(-1, layout.window_area, terms.shape[1])
        bias = rows.index_select(0, layout.bias_index.flatten())  # (nW * S, ws^2, nH)
        return bias.view(layout.num_windows, layout.num_keys, layout.window_area, -1).permute(3, 0, 2, 1)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'top_k={self.geometry.top_k}, pooled_levels={self.geometry.num_pooled_levels}, '
                f'attn_backend={self.attn_backend!r}')


class FocalFastBlock(FocalBlockBase):
    """The Focal-fast block (`FocalTransformerBlock`'s arguments and `top_k`, the official `topK`):
    nearest-key attention (`FocalFastAttention`), then the MLP. `expand_size` and `focal_window` are
    accepted and unused, as in the official block. `input_resolution` decides whether the map is no
    larger than the window (then the window shrinks to it, without shift) and which selection the
    block holds; the block runs on any map size, padding it to window multiples.

    Args:
        dim: number of input channels.
        input_resolution: (height, width) of the map at the size the model is built for.
        num_heads: number of attention heads; must divide `dim`.
        window_size: side of the query windows. Default 7.
        expand_size: accepted and unused, as in the official block. Default 0.
        shift_size: cyclic shift of the windows, in tokens; 0: none. Default 0.
        mlp_ratio: ratio of the MLP's hidden width to `dim`. Default 4.
        qkv_bias: add a learnable bias to query, key and value. Default True.
        qk_scale: overrides the default query-key scale head_dim ** -0.5 if set. Default None.
        drop: dropout rate (MLP and attention output). Default 0.
        attn_drop: attention dropout rate. Default 0.
        drop_path: stochastic depth rate. Default 0.
        act_layer: activation layer of the MLP. Default nn.GELU.
        norm_layer: normalization layer. Default nn.LayerNorm.
        pool_method: window pooling method: 'none', 'fc', 'conv', 'mean' or 'max'. Default 'none'.
        focal_level: number of levels: the nearest tokens, then focal_level - 1 pooled levels (none
            with pool_method 'none'). Default 1.
        focal_window: accepted and unused, as in the official block. Default 1.
        top_k: the number of nearest tokens, and of nearest pooled windows at each pooled level,
            each window attends to (the official `topK`). Default 64.
        use_layerscale: layer scale, for training stability. Default False.
        layerscale_value: initial value of the layer scale. Default 1e-4.
        attn_backend: 'auto', 'sdpa' or 'fused' (see `FocalFastAttention`). Default 'auto'.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 expand_size: int = 0, shift_size: int = 0, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, pool_method: str = 'none', focal_level: int = 1,
                 focal_window: int = 1, top_k: int = 64, use_layerscale: bool = False, layerscale_value: float = 1e-4,
                 attn_backend: str = 'auto'):
        geometry = NearestGeometry.of_block(input_resolution, window_size, shift_size, focal_level, pool_method, top_k)
        attention = functools.partial(FocalFastAttention, dim, geometry, input_resolution, num_heads=num_heads,
                                      qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
                                      attn_backend=attn_backend)
        super().__init__(dim, geometry, attention, mlp_ratio=mlp_ratio, drop=drop, drop_path=drop_path,
                         act_layer=act_layer, norm_layer=norm_layer, pool_method=pool_method,
                         use_layerscale=use_layerscale, layerscale_value=layerscale_value)


class FocalFastTransformer(FocalTransformer):
    """Focal-fast classifier: `FocalTransformer`'s keyword arguments (official names and defaults)
    and `focal_topK`, the number of nearest keys per window and level (official default 64; the
    released models use 128). As in the official model, `expand_sizes`, `expand_stages`,
    `expand_layer` and `focal_windows` are accepted (official configs set them) and unused.

    Args:
        focal_topK: the number of nearest tokens (level 0), and of nearest pooled windows at each
            pooled level, that each window attends to. Keyword only. Default 64.
        **kwargs: every `FocalTransformer` argument but `block_layer` (img_size, patch_size,
            in_chans, num_classes, embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias,
            qk_scale, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, ape, patch_norm,
            use_checkpoint, use_shift, focal_stages, focal_levels, focal_windows, focal_pool,
            expand_stages, expand_sizes, expand_layer, use_conv_embed, use_layerscale,
            layerscale_value, use_pre_norm, attn_backend, global_pool), with its meaning and
            default; see `FocalTransformer`.
    """

    def __init__(self, *, focal_topK: int = 64, **kwargs):
        if not hasattr(focal_topK, '__index__') or isinstance(focal_topK, bool) or focal_topK < 1:
            raise ValueError(f'focal_topK must be a positive integer, got {focal_topK!r}')
        super().__init__(block_layer=functools.partial(FocalFastBlock, top_k=focal_topK), **kwargs)
        self.focal_topK = focal_topK

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return set()  # the official Focal-fast decays its position MLPs' weights


default_cfgs = {
    'focalv2_tiny_useconv_patch4_window7_224': release_cfg('focalv2-tiny-useconv-is224-ws7.pth'),
    'focalv2_small_useconv_patch4_window7_224': release_cfg('focalv2-small-useconv-is224-ws7.pth'),
    'focalv2_base_useconv_patch4_window7_224': release_cfg('focalv2-base-useconv-is224-ws7.pth'),
}

FAST_ARGS = dict(focal_topK=128, use_conv_embed=True)  # the official focalv2_*_useconv configs


@register_model
def focalv2_tiny_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalFastTransformer:
    return create_focal('focalv2_tiny_useconv_patch4_window7_224', pretrained, FocalFastTransformer,
                        **{**TINY, **FAST_ARGS, **kwargs})


@register_model
def focalv2_small_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalFastTransformer:
    return create_focal('focalv2_small_useconv_patch4_window7_224', pretrained, FocalFastTransformer,
                        **{**SMALL, **FAST_ARGS, **kwargs})


@register_model
def focalv2_base_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalFastTransformer:
    return create_focal('focalv2_base_useconv_patch4_window7_224', pretrained, FocalFastTransformer,
                        **{**BASE, **FAST_ARGS, **kwargs})
