"""How focal attention is computed: window geometry as shared index maps (`geometry`) and one
function, `focal_attention`, with two backends behind it:

  * 'sdpa': gathers keys and values, materialises the bias and calls PyTorch's
    `scaled_dot_product_attention`. The reference, and the path on CPUs.
  * 'fused': Triton kernels that read keys, values and bias terms in place (`fused`).
  * 'auto': 'fused' where it can run (CUDA, fp32/fp16/bf16, windows and heads it supports, no
    attention dropout), else 'sdpa'.

While the model is traced for deployment (`exporting`) every backend runs as 'sdpa'.

The log says once which backend ran for each kind of input, and why 'fused' could not.
"""
import logging
from typing import Dict, Optional

import torch

from .fused import fused_focal_attention, unavailable_reason
from .geometry import (KEY_ALIGNMENT, MASKED, FocalGeometry, WindowLayout, clear_layout_cache, layout_cache_stats,
                       num_surrounding_keys,
                       pooled_key_size, pooled_neighbourhood, relative_position_index, surrounding_offsets,
                       window_layout)
from .sdpa import sdpa_focal_attention

__all__ = ['ATTN_BACKENDS', 'FocalGeometry', 'KEY_ALIGNMENT', 'MASKED', 'WindowLayout', 'check_backend', 'choose_backend',
           'clear_layout_cache', 'layout_cache_stats',
           'exporting', 'focal_attention', 'num_surrounding_keys', 'pooled_key_size', 'pooled_neighbourhood',
           'relative_position_index', 'run_backend', 'surrounding_offsets', 'window_layout']

_logger = logging.getLogger(__name__)

ATTN_BACKENDS = ('auto', 'sdpa', 'fused')
_CHOICES: Dict[tuple, str] = {}
# Absent from PyTorch 2.4, whose Triton is too old for 'fused' anyway (fused.MIN_TRITON).
_is_exporting = getattr(torch.compiler, 'is_exporting', lambda: False)
_LOGGED = set()


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        _logger.log(level, message)


@torch.compiler.disable
def _choose(key: tuple, requested: str, qkv: torch.Tensor, layout: WindowLayout, num_heads: int,
            dropout_p: float) -> str:
    reason = None if requested == 'sdpa' else unavailable_reason(qkv, layout, num_heads, dropout_p,
                                                                  allow_interpreter=requested == 'fused')
    chosen = 'fused' if requested != 'sdpa' and reason is None else 'sdpa'
    where = f'{qkv.device.type} {str(qkv.dtype).replace("torch.", "")}'
    if requested == 'fused' and reason is not None:
        _log_once(logging.WARNING, f'focal attention: the fused kernel cannot run {where} inputs ({reason}): using SDPA')
    elif requested == 'auto' and reason is not None:
        _log_once(logging.INFO, f'focal attention on {where}: SDPA (the fused kernel cannot run: {reason})')
    else:
        _log_once(logging.INFO, f'focal attention on {where}: {"fused Triton kernel" if chosen == "fused" else "SDPA"}')
    _CHOICES[key] = chosen
    return chosen


def exporting() -> bool:
    """Whether the model is being traced into a graph for deployment: by torch.export (and the ONNX
    exporter built on it) or by torch.jit tracing (the TorchScript ONNX exporter). Such graphs
    cannot carry the fused kernel, a Python custom op launching Triton that neither ONNX nor
    AOTInductor or ExecuTorch can take, so focal attention is exported through SDPA."""
    return _is_exporting() or torch.jit.is_tracing()


def choose_backend(requested: str, qkv: torch.Tensor, layout: WindowLayout, num_heads: int,
                   dropout_p: float = 0.) -> str:
    """'sdpa' or 'fused': what `focal_attention` runs for these inputs with `requested`; always
    'sdpa' while `exporting`."""
    if exporting():
        return 'sdpa'
    key = (requested, qkv.device.type, qkv.dtype, layout.window_area, qkv.shape[-1] // num_heads, dropout_p > 0)
    chosen = _CHOICES.get(key)
    return chosen if chosen is not None else _choose(key, requested, qkv, layout, num_heads, dropout_p)


def focal_attention(qkv: torch.Tensor, pooled_kv: Optional[torch.Tensor], position_bias: torch.Tensor,
                    layout: WindowLayout, num_heads: int, scale: float, dropout_p: float = 0.,
                    backend: str = 'auto', regather_keys: bool = True) -> torch.Tensor:
    """Focal attention of every window of a (shifted, padded) map.

    qkv: (B, Hp*Wp, 3C) queries, keys and values of the map's tokens in row-major order.
    pooled_kv: (B, P, 2C) keys and values of the pooled tokens of every level, or None.
    position_bias: (nh, ws^2, S) relative position terms, the same for every window.
    Returns (B, Hp*Wp, C), each token's attention output, heads concatenated.
    regather_keys: for the SDPA backend (see `sdpa_focal_attention`).
    """
    chosen = choose_backend(backend, qkv, layout, num_heads, dropout_p)
    return run_backend(chosen, qkv, pooled_kv, position_bias, layout, num_heads, scale, dropout_p, regather_keys)


def run_backend(chosen: str, qkv: torch.Tensor, pooled_kv: Optional[torch.Tensor], position_bias: torch.Tensor,
                layout: WindowLayout, num_heads: int, scale: float, dropout_p: float = 0.,
                regather_keys: bool = True) -> torch.Tensor:
    """`focal_attention` with a backend `choose_backend` already chose ('sdpa' or 'fused'), for
    callers that remember their choice."""
    if chosen == 'fused':
        return fused_focal_attention(qkv, pooled_kv, position_bias, layout, num_heads, scale)
    return sdpa_focal_attention(qkv, pooled_kv, position_bias, layout, num_heads, scale, dropout_p, regather_keys)


def check_backend(backend: str) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f'attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}')
    return backend
