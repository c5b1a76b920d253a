"""How focal attention is computed: which keys each window sees, as index maps shared by the blocks
of one geometry (`geometry` for Focal, `nearest` for Focal-fast's nearest keys), and one function,
`focal_attention`, with two backends behind it:

  * 'sdpa': gathers keys and values, materialises the bias and calls PyTorch's
    `scaled_dot_product_attention` (`sdpa`). The reference, and the path on CPUs.
  * 'fused': Triton kernels that read keys, values and bias terms in place (`fused`).

`backend` asks for 'sdpa', 'fused' or 'auto'; `backends` says which one runs: 'auto' is SDPA except
on GPU architectures where the fused kernel was verified correct and faster (none yet). The log says
once which backend ran for each kind of input, and why not the fused kernel; `backends_in_use`
reads from a model which backends its attention modules ran.
"""
from typing import Optional

import torch

from .backends import (ATTN_BACKENDS, VERIFIED_ARCHITECTURES, BackendRecord, backends_in_use, check_backend,
                       choose_backend, clear_backend_choices, exporting)
from .fused import fused_focal_attention
from .geometry import (KEY_ALIGNMENT, MASKED, FocalGeometry, KeyGroup, WindowLayout, build_eagerly, clear_layout_cache,
                       layout_cache_stats, num_surrounding_keys, pooled_key_size, pooled_neighbourhood,
                       relative_position_index, stage_block_shift_and_expand, surrounding_offsets, window_layout)
from .nearest import (NearestGeometry, NearestLayout, nearest_layout, nearest_selection,
                      selection_state_from_official, window_offsets)
from .sdpa import sdpa_focal_attention

__all__ = ['ATTN_BACKENDS', 'KEY_ALIGNMENT', 'MASKED', 'VERIFIED_ARCHITECTURES', 'BackendRecord', 'FocalGeometry',
           'KeyGroup', 'NearestGeometry', 'NearestLayout', 'WindowLayout', 'backends_in_use', 'build_eagerly',
           'check_backend', 'choose_backend', 'clear_backend_choices', 'clear_layout_cache', 'exporting',
           'focal_attention', 'layout_cache_stats', 'nearest_layout', 'nearest_selection', 'num_surrounding_keys',
           'pooled_key_size', 'pooled_neighbourhood', 'relative_position_index', 'selection_state_from_official',
           'stage_block_shift_and_expand', 'surrounding_offsets', 'window_layout', 'window_offsets']


def focal_attention(qkv: torch.Tensor, pooled_kv: Optional[torch.Tensor], position_bias: torch.Tensor,
                    layout: WindowLayout, num_heads: int, scale: float, dropout_p: float = 0.,
                    backend: str = 'auto', regather_keys: bool = True,
                    record: Optional[BackendRecord] = None) -> torch.Tensor:
    """Focal attention of every window of a (shifted, padded) map.

    qkv: (B, Hp*Wp, 3C) queries, keys and values of the map's tokens in row-major order.
    pooled_kv: (B, P, 2C) keys and values of the pooled tokens of every level, or None.
    position_bias: (nh, ws^2, S) relative position terms, the same for every window (the layout's
        key mask is added to them), or (nh, nW, ws^2, S), one set per window that includes the
        masks (Focal-fast; SDPA only).
    Returns (B, Hp*Wp, C), each token's attention output, heads concatenated.
    backend: 'auto', 'sdpa' or 'fused' (see `backends`); record: set to the backend that ran.
    regather_keys: for the SDPA backend (see `sdpa_focal_attention`).
    """
    chosen = choose_backend(backend, qkv, layout, num_heads, dropout_p)
    if record is not None:
        record.name = chosen
    if chosen == 'fused':
        return fused_focal_attention(qkv, pooled_kv, position_bias, layout, num_heads, scale)
    return sdpa_focal_attention(qkv, pooled_kv, position_bias, layout, num_heads, scale, dropout_p, regather_keys)
