"""The fused backend: the Triton kernels of `triton_kernels` as one `torch.library` custom op with
its own backward op, so that eager autograd, autocast and torch.compile (which keeps the op whole
inside its graph) all run the same kernels.

Runs on CUDA with Triton 3.0 or later (every supported PyTorch: torch 2.4 brings Triton 3.0), or on
the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, for tests) where that interpreter works,
in fp32, fp16 and bf16, for windows of up to MAX_WINDOW_AREA tokens and heads of up to
MAX_HEAD_DIM channels, without attention dropout; `unavailable_reason` says why not otherwise.
"""
import functools
import inspect
import math
import os
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from .geometry import WindowLayout

try:
    import triton
    import triton.language as tl

    from . import triton_kernels
except ImportError:  # PyTorch builds without Triton (e.g. CPU-only wheels)
    triton = triton_kernels = None

MIN_TRITON = (3, 0)  # the kernels use Triton 3's language (tl.dot's input_precision)
MAX_WINDOW_AREA = 256  # queries of a window sit in one block of at most this many rows
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKWARD_PROGRAMS_PER_SM = 2  # backward programs a multiprocessor holds at once (~250 registers x 4 warps each)
SUM_TILE = 2048  # sum_slot_gradients: (tokens, channels) elements per program
SCRATCH_WINDOWS = 8  # backward: the most windows per program (see _windows_per_program)
PROBE_TOLERANCE = 5e-2  # launch_failure: relative error from SDPA beyond any rounding (bf16: ~5e-3)


def triton_unavailable_reason() -> Optional[str]:
    """Why this installation cannot run the kernels compiled, or None. Every Triton from 3.0 (torch
    2.4) to 3.8 compiles them for sm_80 and sm_90 (docs/benchmarks.md)."""
    if triton_kernels is None:
        return 'Triton is not installed'
    version = tuple(int(part) for part in triton.__version__.split('.')[:2])
    if version < MIN_TRITON:
        return f'Triton {triton.__version__} is older than {".".join(map(str, MIN_TRITON))}, whose language it uses'
    return None


if triton_kernels is not None:
    @triton.jit
    def _interpreter_probe_kernel(out_ptr, BLOCK: tl.constexpr):
        """out[:BLOCK] = 1, 2, ..., BLOCK."""
        cols = tl.arange(0, BLOCK)
        tl.store(out_ptr + cols, cols.to(tl.float32) + 1)


@functools.lru_cache(maxsize=None)
def _interpreter_fault() -> Optional[str]:
    """What goes wrong when Triton's interpreter runs a kernel that stores eight numbers, or None."""
    written = torch.zeros(8)
    try:
        _interpreter_probe_kernel[(1,)](written, BLOCK=8)
    except Exception as error:  # noqa: BLE001 (any failure of the interpreter is the answer)
        return f"Triton {triton.__version__}'s interpreter fails a minimal kernel ({type(error).__name__}: {error})"
    if not torch.equal(written, torch.arange(1., 9.)):
        import numpy
        return (f"Triton {triton.__version__}'s interpreter stores nothing with NumPy {numpy.__version__} (the "
                f"load and store helpers of Triton 3.0 and 3.1 copy no bytes under NumPy 2; NumPy 1.x works)")
    return None


def interpreter_unavailable_reason() -> Optional[str]:
    """Why the kernels cannot run on the CPU under Triton's interpreter here, or None: found once by
    running a minimal kernel, not from the version (the compiled path does not depend on it)."""
    missing = triton_unavailable_reason()
    if missing is not None:
        return missing
    if os.environ.get('TRITON_INTERPRET') != '1':
        return 'TRITON_INTERPRET=1 is not set'
    return _interpreter_fault()


def unavailable_reason(qkv: torch.Tensor, layout: WindowLayout, num_heads: int, dropout_p: float,
                       allow_interpreter: bool = True) -> Optional[str]:
    """Why the fused kernel cannot run these inputs, or None when it can. allow_interpreter: CPU
    inputs count as runnable under TRITON_INTERPRET=1 (slow: for tests, not for 'auto')."""
    missing = triton_unavailable_reason()
    if missing is not None:
        return missing
    interpreting = allow_interpreter and os.environ.get('TRITON_INTERPRET') == '1'
    if qkv.device.type != 'cuda' and not (interpreting and qkv.device.type == 'cpu'):
        or_interpreter = ', or TRITON_INTERPRET=1 on the CPU' if allow_interpreter else ''
        return f'inputs on {qkv.device.type} (it needs CUDA{or_interpreter})'
    if qkv.dtype not in DTYPES:
        return f'dtype {qkv.dtype}'
    if layout.position_bias_per_window:
        return 'position terms that differ between windows (Focal-fast; the kernel reads one set for all windows)'
    if layout.window_area > MAX_WINDOW_AREA:
        return f'windows of {layout.window_area} tokens (at most {MAX_WINDOW_AREA})'
    if qkv.shape[-1] // 3 // num_heads > MAX_HEAD_DIM:
        return f'heads of {qkv.shape[-1] // 3 // num_heads} channels (at most {MAX_HEAD_DIM})'
    if dropout_p > 0:
        return 'attention dropout'
    if qkv.device.type == 'cpu':
        return interpreter_unavailable_reason()
    return None


def launch_failure(qkv: torch.Tensor, layout: WindowLayout, num_heads: int) -> Optional[str]:
    """Why the kernels fail on this GPU for inputs like `qkv` (B, T, 3C) of this layout, or None.
    Found by running them, forward and backward, once on one random map of the layout and comparing
    with SDPA: a launch can need more shared memory than the GPU gives a block (the fp32 backward of
    14x14 windows takes 100 KB; sm_86 and sm_89 allow 99 KB), and a GPU where no run has been
    recorded may miscompile. The interpreter (CPU inputs) has no such limits: None."""
    if qkv.device.type != 'cuda':
        return None
    return probe_failure(qkv.device, qkv.dtype, layout, num_heads, qkv.shape[-1] // 3)


def probe_failure(device: torch.device, dtype: torch.dtype, layout: WindowLayout, num_heads: int,
                  channels: int) -> Optional[str]:
    """`launch_failure` on `device`: the fused forward and backward of one random map of `channels`
    (all heads), against SDPA, both without autocast."""
    from .sdpa import sdpa_focal_attention  # the reference; imported here, where it is used
    generator = torch.Generator().manual_seed(0)
    num_pooled = layout.zero_token - layout.num_fine

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    qkv = draw(1, layout.num_fine, 3 * channels)
    pooled_kv = draw(1, num_pooled, 2 * channels) if num_pooled else None
    bias = torch.randn(num_heads, layout.window_area, layout.num_keys, generator=generator).to(device)
    grad_out = draw(1, layout.num_fine, channels)
    results = []
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for attention in (fused_focal_attention, sdpa_focal_attention):
            inputs = [t.detach().requires_grad_() for t in (qkv, pooled_kv, bias) if t is not None]
            try:
                out = attention(inputs[0], inputs[1] if pooled_kv is not None else None, inputs[-1], layout,
                                num_heads, (channels // num_heads) ** -0.5)
                grads = torch.autograd.grad(out, inputs, grad_out)
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
            except Exception as error:  # noqa: BLE001 (any failure to compile or launch is the answer)
                return f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
            results.append([out, *grads])
    names = ['output', 'qkv gradient'] + (['pooled gradient'] if pooled_kv is not None else []) + ['bias gradient']
    for name, fused_value, reference in zip(names, *results):
        error = ((fused_value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30)).item()
        if not error < PROBE_TOLERANCE:  # NaN fails too
            return f'its {name} differs from SDPA by {error:.1e} (relative) on a random input'
    return None


class FusedInputs(NamedTuple):
    """The fused op's inputs, in the order of its schema, which torch.library infers from these
    annotations (`_custom_op`): qkv (B, T, 3C), pooled_kv (B, P, 2C), position_bias (nh, ws^2, S)
    fp32, the layout's key_index and key_mask (nW, S) and regions (nW, ws^2), and its key users (the
    inverse maps, `KeyUsers`), which are inputs only so that backward finds them. The backward op
    takes grad_out, these tensors, out and lse, then these scalars (`BackwardInputs`)."""
    qkv: torch.Tensor
    pooled_kv: Optional[torch.Tensor]
    position_bias: torch.Tensor
    key_index: torch.Tensor
    key_mask: torch.Tensor
    regions: Optional[torch.Tensor]
    fine_offsets: torch.Tensor
    fine_slots: torch.Tensor
    pooled_offsets: torch.Tensor
    pooled_slots: torch.Tensor
    num_heads: int
    zero_token: int
    scale: float


NUM_SCALARS = 3  # FusedInputs ends with num_heads, zero_token, scale
_TENSOR_FIELDS = list(FusedInputs.__annotations__.items())[:-NUM_SCALARS]
_SCALAR_FIELDS = list(FusedInputs.__annotations__.items())[-NUM_SCALARS:]
BackwardInputs = NamedTuple('BackwardInputs', [('grad_out', torch.Tensor), *_TENSOR_FIELDS, ('out', torch.Tensor),
                                               ('lse', torch.Tensor), *_SCALAR_FIELDS])


def _custom_op(name: str, inputs: type, returns: object) -> Callable:
    """Decorator: `fn(*values)` as the custom op `name` whose schema torch.library infers from the
    fields of the NamedTuple class `inputs` (names and annotations, in order) and `returns`. The
    dispatcher passes the values positionally."""
    parameters = [inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
                  for field, annotation in inputs.__annotations__.items()]

    def define(fn: Callable) -> Callable:
        fn.__signature__ = inspect.Signature(parameters, return_annotation=returns)
        return torch.library.custom_op(name, fn, mutates_args=())
    return define


def fused_focal_attention(qkv: torch.Tensor, pooled_kv: Optional[torch.Tensor], position_bias: torch.Tensor,
                          layout: WindowLayout, num_heads: int, scale: float) -> torch.Tensor:
    """See `focal_attention`."""
    fine_users, pooled_users = layout.fine_users, layout.pooled_users
    if pooled_kv is not None:
        pooled_kv = pooled_kv.to(qkv.dtype).contiguous()
    out, _ = torch.ops.focal_attention.fused_forward(*FusedInputs(
        qkv=qkv.contiguous(), pooled_kv=pooled_kv, position_bias=position_bias.float().contiguous(),
        key_index=layout.key_index, key_mask=layout.key_mask, regions=layout.regions,
        fine_offsets=fine_users.offsets, fine_slots=fine_users.slots, pooled_offsets=pooled_users.offsets,
        pooled_slots=pooled_users.slots, num_heads=num_heads, zero_token=layout.zero_token, scale=scale))
    return out


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def dot_settings(dtype: torch.dtype, cuda: bool, tf32_allowed: bool) -> dict:
    """The kernels' dot constexprs, the part of the launch configuration that depends on the device:
    on CUDA TF32 products for 16-bit inputs and for fp32 where PyTorch allows TF32 matmuls
    (`tf32_allowed`; its default is not); on the CPU exact fp32 products, of upcast 16-bit inputs
    (the interpreter's 16-bit dot is wrong). The kernel compile tooling reads the CUDA settings here."""
    return dict(PRECISION='tf32' if cuda and (dtype != torch.float32 or tf32_allowed) else 'ieee',
                UPCAST=not cuda and dtype != torch.float32)


def _launch_config(qkv: torch.Tensor, area: int, num_keys: int, num_heads: int) -> dict:
    """Block sizes, warps and dot settings for one call (queries of a window form one block)."""
    head_dim = qkv.shape[-1] // 3 // num_heads
    block_m = max(16, _next_power_of_2(area))
    if qkv.element_size() == 4:
        # fp32 with 32 or 64 keys per block spills registers (up to 17 KB per thread where ptxas falls
        # back to 32 registers), with 16 nowhere, TF32 or not; the window-14 backward's shared memory
        # fits an sm_80 block only at 16 (docs/benchmarks.md)
        block_n = 16
    elif block_m <= 64:
        block_n = 64
    else:
        block_n = 32
    block_n = min(block_n, max(16, _next_power_of_2(num_keys)))
    return dict(CHANNELS=qkv.shape[-1] // 3, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=max(16, _next_power_of_2(head_dim)),
                **dot_settings(qkv.dtype, qkv.is_cuda, torch.backends.cuda.matmul.allow_tf32),
                num_warps=4 if block_m <= 64 else 8)


def _rows_aligned(qkv: torch.Tensor, pooled: torch.Tensor, head_dim: int) -> bool:
    """Whether every key/value row a head reads starts on 16 bytes (for vector loads)."""
    size = qkv.element_size()
    return all(n % 16 == 0 for n in (qkv.data_ptr(), pooled.data_ptr(), qkv.shape[-1] // 3 * size, head_dim * size))


def _shape_args(qkv: torch.Tensor, key_index: torch.Tensor, num_heads: int) -> Tuple[int, int, int, int, int, int]:
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    num_windows, num_keys = key_index.shape
    return B, T, C, C // num_heads, num_windows, num_keys


def _forward_outputs(inputs: FusedInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Empty out (B, T, C) and lse (B, T, nh) fp32."""
    B, T, C = inputs.qkv.shape[0], inputs.qkv.shape[1], inputs.qkv.shape[2] // 3
    return inputs.qkv.new_empty(B, T, C), inputs.qkv.new_empty(B, T, inputs.num_heads, dtype=torch.float32)


@_custom_op('focal_attention::fused_forward', FusedInputs, Tuple[torch.Tensor, torch.Tensor])
def fused_forward(*values) -> Tuple[torch.Tensor, torch.Tensor]:
    """`FusedInputs` -> out (B, T, C) and the base-2 log-sum-exp of each query's scores (B, T, nh)
    fp32, for backward."""
    inputs = FusedInputs(*values)
    qkv, pooled_kv, regions = inputs.qkv, inputs.pooled_kv, inputs.regions
    B, T, C, head_dim, num_windows, num_keys = _shape_args(qkv, inputs.key_index, inputs.num_heads)
    area = inputs.position_bias.shape[1]
    out, lse = _forward_outputs(inputs)
    pooled = pooled_kv if pooled_kv is not None else qkv
    triton_kernels.focal_attention_forward_kernel[(B * num_windows, inputs.num_heads)](
        qkv, pooled, inputs.position_bias * triton_kernels.LOG2E, inputs.key_index, inputs.key_mask,
        regions if regions is not None else inputs.key_index, out, lse, num_windows, T, inputs.zero_token,
        inputs.scale, AREA=area, NUM_KEYS=num_keys, HAS_POOLED=pooled_kv is not None,
        HAS_REGIONS=regions is not None, ALIGNED=_rows_aligned(qkv, pooled, head_dim),
        **_launch_config(qkv, area, num_keys, inputs.num_heads))
    return out, lse


fused_forward.register_fake(lambda *values: _forward_outputs(FusedInputs(*values)))


def _windows_per_program(qkv: torch.Tensor, total_windows: int, num_heads: int) -> int:
    """Windows a backward program visits. Each program writes one position-bias partial per key block
    (fewer, longer programs write fewer), and, with several blocks, keeps its windows' query gradients
    in a scratch between blocks (at most SCRATCH_WINDOWS windows keep that within L2). On CUDA a
    power of two (a compile-time constant: few variants) small enough for four waves of programs,
    so that the last wave's idle share stays small; the interpreter runs programs one by one."""
    if not qkv.is_cuda:
        return SCRATCH_WINDOWS
    resident = BACKWARD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(qkv.device).multi_processor_count
    windows = 1
    while windows < SCRATCH_WINDOWS and total_windows * num_heads >= 2 * windows * 4 * resident:
        windows *= 2
    return windows


@_custom_op('focal_attention::fused_backward', BackwardInputs, Tuple[torch.Tensor, torch.Tensor, torch.Tensor])
def fused_backward(*values) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`BackwardInputs` -> gradients of qkv (B, T, 3C), pooled_kv (B, P, 2C; empty without pooled
    tokens) and position_bias (nh, ws^2, S) fp32."""
    inputs = BackwardInputs(*values)
    qkv, pooled_kv, regions, key_index, num_heads = (inputs.qkv, inputs.pooled_kv, inputs.regions, inputs.key_index,
                                                     inputs.num_heads)
    B, T, C, head_dim, num_windows, num_keys = _shape_args(qkv, key_index, num_heads)
    area = inputs.position_bias.shape[1]
    # Not software-pipelined: two stages spill registers on sm_80, and Triton 3.0 and 3.2 fail to
    # pipeline this loop (docs/benchmarks.md); two programs per multiprocessor overlap their loads.
    config = dict(_launch_config(qkv, area, num_keys, num_heads), num_stages=1)
    total_windows = B * num_windows
    multi_block = num_keys > config['BLOCK_N']
    windows_per_program = _windows_per_program(qkv, total_windows, num_heads)
    programs = math.ceil(total_windows / windows_per_program)
    grad_qkv = torch.empty_like(qkv)
    grad_q_scratch = qkv.new_empty(B, T, C if multi_block else 0, dtype=torch.float32)
    delta = qkv.new_empty(B, T, num_heads if multi_block else 0, dtype=torch.float32)
    grad_slots = qkv.new_empty(total_windows * num_keys, 2 * C)
    grad_bias = qkv.new_empty(programs, num_heads, area, num_keys, dtype=torch.float32)
    pooled = pooled_kv if pooled_kv is not None else qkv
    triton_kernels.focal_attention_backward_kernel[(programs, num_heads)](
        qkv, pooled, inputs.position_bias * triton_kernels.LOG2E, key_index, inputs.key_mask,
        regions if regions is not None else key_index, inputs.out, inputs.grad_out, inputs.lse, delta, grad_qkv,
        grad_q_scratch, grad_slots, grad_bias, num_windows, total_windows, T, inputs.zero_token, inputs.scale,
        AREA=area, NUM_KEYS=num_keys, HAS_POOLED=pooled_kv is not None,
        HAS_REGIONS=regions is not None, ALIGNED=_rows_aligned(qkv, pooled, head_dim),
        WINDOWS_PER_PROGRAM=windows_per_program, **config)

    def sum_slots(offsets: torch.Tensor, slots: torch.Tensor, target: torch.Tensor) -> None:
        block_c = _next_power_of_2(2 * C)
        block_t = max(1, SUM_TILE // block_c)
        triton_kernels.sum_slot_gradients_kernel[(math.ceil(target.shape[1] / block_t), B)](
            grad_slots, offsets, slots, target, target.stride(0), target.stride(1), target.shape[1],
            num_windows * num_keys, 2 * C, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)

    sum_slots(inputs.fine_offsets, inputs.fine_slots, grad_qkv[:, :, C:])
    grad_pooled = torch.empty_like(pooled_kv) if pooled_kv is not None else qkv.new_empty(0)
    if pooled_kv is not None and grad_pooled.shape[1]:
        sum_slots(inputs.pooled_offsets, inputs.pooled_slots, grad_pooled)
    return grad_qkv, grad_pooled, grad_bias.sum(0)


@fused_backward.register_fake
def _(*values):
    inputs = BackwardInputs(*values)
    grad_pooled = torch.empty_like(inputs.pooled_kv) if inputs.pooled_kv is not None else inputs.qkv.new_empty(0)
    return torch.empty_like(inputs.qkv), grad_pooled, torch.empty_like(inputs.position_bias, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    forward = FusedInputs(*inputs)
    ctx.save_for_backward(*forward[:-NUM_SCALARS], *output)  # the backward op's tensors after grad_out, in order
    ctx.scalars = forward[-NUM_SCALARS:]
    ctx.qkv_dtype, ctx.has_pooled = forward.qkv.dtype, forward.pooled_kv is not None


def _backward(ctx, grad_out, grad_lse):
    grad_qkv, grad_pooled, grad_bias = torch.ops.focal_attention.fused_backward(
        grad_out.to(ctx.qkv_dtype).contiguous(), *ctx.saved_tensors, *ctx.scalars)
    no_gradients = (None,) * (len(FusedInputs._fields) - 3)  # the key maps and the scalars
    return (grad_qkv, grad_pooled if ctx.has_pooled else None, grad_bias) + no_gradients


fused_forward.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.focal_attention.fused_forward)
def _forward_flops(qkv_shape, pooled_shape, bias_shape, key_index_shape, *args, **kwargs) -> int:
    """Two products per query and key slot over C channels (scores, then values), as SDPA counts
    the same attention."""
    B, T, C3 = qkv_shape
    return 2 * 2 * B * T * key_index_shape[1] * (C3 // 3)


@register_flop_formula(torch.ops.focal_attention.fused_backward)
def _backward_flops(grad_out_shape, qkv_shape, pooled_shape, bias_shape, key_index_shape, *args, **kwargs) -> int:
    """The four gradient products (values, scores, keys, queries), as SDPA's backward counts them."""
    B, T, C3 = qkv_shape
    return 4 * 2 * B * T * key_index_shape[1] * (C3 // 3)
