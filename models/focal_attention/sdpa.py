"""The reference backend: gather every window's keys and values with one `index_select`, add one
materialised bias, call `scaled_dot_product_attention`. Runs everywhere (the CPU path), and is
what the fused kernel is tested against."""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .geometry import WindowLayout
from .regather import regathered_in_backward


def window_bias(position_bias: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """(nh, nW, ws^2, S) additive bias of every window: position terms (nh, nW, ws^2, S) of every
    window as they are (they hold the masks: Focal-fast); position terms (nh, ws^2, S) shared by all
    windows plus the layout's masks, built from its compact per-window data in one broadcast add."""
    if position_bias.dim() == 4:
        return position_bias.contiguous()
    bias = position_bias[:, None] + layout.key_mask[None, :, None, :]
    if layout.regions is not None:
        area = layout.window_area
        bias[..., :area] += layout.region_mask()
    return bias


def sdpa_focal_attention(qkv: torch.Tensor, pooled_kv: Optional[torch.Tensor], position_bias: torch.Tensor,
                         layout: WindowLayout, num_heads: int, scale: float, dropout_p: float = 0.,
                         regather_keys: bool = True) -> torch.Tensor:
    """See `focal_attention`. regather_keys: in eager training, save the ungathered keys and values
    for backward and gather them again there (see `regather`)."""
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    ws = layout.geometry.window_size
    (Hp, Wp), nW, nh, hd = layout.padded_size, layout.num_windows, num_heads, C // num_heads
    q = qkv[..., :C].reshape(B, Hp // ws, ws, Wp // ws, ws, nh, hd)
    q = q.permute(0, 5, 1, 3, 2, 4, 6).reshape(B, nh * nW, ws * ws, hd)

    sources = [qkv[..., C:]]
    if pooled_kv is not None:
        sources.append(pooled_kv)
    sources.append(qkv.new_zeros(B, 1, 2 * C))  # the zero token
    kv = torch.cat(sources, 1).view(B, -1, 2, nh, hd).permute(0, 2, 3, 1, 4)
    key_index = layout.key_index.flatten()
    gathered = kv.index_select(3, key_index)
    keys, values = gathered.view(B, 2, nh * nW, -1, hd).unbind(1)

    bias = window_bias(position_bias, layout).view(1, nh * nW, ws * ws, -1).to(q.dtype)
    regather = regather_keys and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    saving = regathered_in_backward(gathered, kv, 3, key_index) if regather else contextlib.nullcontext()
    with saving:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    out = out.view(B, nh, Hp // ws, Wp // ws, ws, ws, hd).permute(0, 2, 4, 3, 5, 1, 6)
    # Always a copy in token order (reshape would be a view for some SDPA output strides): a graph
    # traced with one SDPA kernel's strides then also holds for another's, as when the ONNX
    # exporter decomposes SDPA.
    return out.clone(memory_format=torch.contiguous_format).view(B, T, C)
