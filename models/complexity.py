"""Model size and cost as the papers report them: parameters in millions and GFLOPs counted as
multiply-adds, measured on the executed graph (so every op the model really runs is counted).

Attention is counted from the shapes of the attention op that actually ran. PyTorch's own flop
formulas cover only some of `scaled_dot_product_attention`'s kernels (e.g. torch 2.14 counts its
CPU flash kernel as 0 while older versions ran the math path, whose matmuls are counted), so the
figures would change with the PyTorch version and device. Here every SDPA kernel, and any custom
attention op registered with `register_attention_flops`, counts the two matmuls of attention.
"""
import math
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

Shape = Sequence[int]
QKVShapes = Callable[..., Tuple[Shape, Shape, Shape]]

# The forward kernels `scaled_dot_product_attention` dispatches to, over the supported PyTorch
# versions; all take (query, key, value, ...) as (..., L, E), (..., S, E), (..., S, Ev). The math
# path is missing on purpose: it runs as matmuls, which the flop counter counts itself.
SDPA_KERNELS = ('_scaled_dot_product_flash_attention', '_scaled_dot_product_flash_attention_for_cpu',
                '_scaled_dot_product_efficient_attention', '_scaled_dot_product_cudnn_attention',
                '_scaled_dot_product_fused_attention_overrideable')

_attention_ops: Dict[Any, QKVShapes] = {}


def _first_three(query: Shape, key: Shape, value: Shape, *args, **kwargs) -> Tuple[Shape, Shape, Shape]:
    return query, key, value


def attention_flops(query: Shape, key: Shape, value: Shape) -> int:
    """FLOPs (2 per multiply-add) of softmax(query @ key^T) @ value for query (..., L, E),
    key (..., S, E) and value (..., S, Ev); the query's leading dims count the heads, so keys
    shared by several query heads (grouped-query attention) are counted for each."""
    rows, source_length = math.prod(query[:-1]), key[-2]
    return 2 * rows * source_length * (query[-1] + value[-1])


def register_attention_flops(op: Any, qkv_shapes: QKVShapes = _first_three) -> None:
    """Count `op` in `count_gflops` as attention of the shapes `qkv_shapes` returns.

    op: an operator, e.g. `torch.ops.focal_attention.fused` (a `torch.library.custom_op`; one
    overload or the whole packet). qkv_shapes: called with the op's arguments, tensors replaced by
    their shapes (torch.Size), returns the (query, key, value) shapes of the attention it
    computes, laid out as in `attention_flops`; by default its first three arguments. An op
    that, say, gathers its keys itself gives the gathered key and value shapes. Without this, an
    op the flop counter does not know counts 0.
    """
    _attention_ops[getattr(op, 'overloadpacket', op)] = qkv_shapes


for _name in SDPA_KERNELS:
    if hasattr(torch.ops.aten, _name):  # kernels that newer PyTorch versions added
        register_attention_flops(getattr(torch.ops.aten, _name))


def _flop_formula(qkv_shapes: QKVShapes) -> Callable[..., int]:
    def formula(*args, out_shape=None, **kwargs) -> int:
        return attention_flops(*qkv_shapes(*args, **kwargs))
    return formula


def count_params_m(model: nn.Module) -> float:
    """Learnable parameters, in millions."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


@torch.no_grad()
def count_gflops(model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3) -> float:
    """Multiply-adds of one eval-mode forward pass at batch 1, in billions. `FlopCounterMode`
    counts a multiply-add as two FLOPs, hence the halving."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    attention = {op: _flop_formula(qkv_shapes) for op, qkv_shapes in _attention_ops.items()}
    with FlopCounterMode(display=False, custom_mapping=attention) as counter:
        model(torch.zeros(1, in_chans, height, width, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2e9
