"""Which backend runs focal attention: the valid names, what each backend can run, the chooser and
its one cache (as NATTEN arranges it: a small check per backend, a chooser, SDPA the reference).

  * 'sdpa' runs everything: the reference, and the CPU path.
  * 'fused' runs wherever `fused.unavailable_reason` is None (CUDA, or the CPU under
    TRITON_INTERPRET=1) and, on a GPU, a first run of its kernels on one random map of the layout
    matches SDPA (`fused.launch_failure`); elsewhere SDPA runs, with one warning saying why.
  * 'auto' runs the fused kernel only on GPU architectures where a GPU run verified it correct and
    faster than SDPA (`VERIFIED_ARCHITECTURES`, never below sm_80), else SDPA, saying once in the log
    how to opt in and how to verify it.

While the model is traced for deployment (`exporting`) every backend runs as 'sdpa'.

A backend is chosen once per geometry, device and kind of input (requested backend, dtype, head
size, whether attention dropout is active) and logged once. The choices of one geometry and device
are one table, which every layout of that geometry points to (`WindowLayout.backend_choices`), so
that compiled graphs read a plain attribute (torch 2.4's dynamo cannot read a global dict keyed by
geometries).
"""
import logging
from typing import Dict, NamedTuple, Optional, Set, Tuple

import torch
from torch import nn

from . import fused
from .geometry import FocalGeometry, WindowLayout

ATTN_BACKENDS = ('auto', 'sdpa', 'fused')

# Compute capability -> the measurement in docs/benchmarks.md that showed the fused kernel correct
# and faster than SDPA on that GPU architecture, e.g. (9, 0): 'docs/benchmarks.md, "One H100 ...":
# Focal-T training 1.2x SDPA'. 'auto' picks the fused kernel only on these. Empty: no GPU run yet.
VERIFIED_ARCHITECTURES: Dict[Tuple[int, int], str] = {}
# Below sm_80 (V100, T4) the kernels compile without tensor-core instructions and spill registers.
MIN_AUTO_ARCHITECTURE = (8, 0)
OPT_IN = "MODEL.FOCAL.ATTN_BACKEND fused (attn_backend='fused')"
VERIFY = 'bash scripts/gpu_checks.sh all'

_logger = logging.getLogger(__package__)
_CHOICES: Dict[Tuple[FocalGeometry, torch.device], Dict[tuple, str]] = {}  # the one cache
_LOGGED = set()
# What torch.export sets while it traces a model, read as the flag itself: inside a torch.compile
# trace, dynamo answers `torch.compiler.is_exporting()` with True on torch 2.7 to 2.11 (fixed in
# 2.12), so asking it would run SDPA in every compiled graph. Torch 2.4 to 2.6 have no exporting
# flag; there only torch.export sets the compiling flag (torch.compile sets it too from 2.13 on).
_EXPORT_FLAG = '_is_exporting_flag' if hasattr(torch.compiler, '_is_exporting_flag') else '_is_compiling_flag'


def exporting() -> bool:
    """Whether the model is being traced into a graph for deployment: by torch.export (and the ONNX
    exporter built on it) or by torch.jit tracing (the TorchScript ONNX exporter); never under
    torch.compile. Such graphs cannot carry the fused kernel, a Python custom op launching Triton
    that neither ONNX nor AOTInductor or ExecuTorch can take, so focal attention is exported through
    SDPA. Strict torch.export (strict=True) sets the flag around its dynamo pass only from torch
    2.8 on: before, only non-strict export is seen."""
    return getattr(torch.compiler, _EXPORT_FLAG) or torch.jit.is_tracing()


class GpuArchitecture(NamedTuple):
    name: str
    capability: Tuple[int, int]

    @property
    def sm(self) -> str:
        return f'sm_{self.capability[0]}{self.capability[1]}'


def gpu_architecture(device: torch.device) -> Optional[GpuArchitecture]:
    """The GPU behind `device`, None for other devices: all the chooser asks about the hardware
    (tests describe a device through it)."""
    if device.type != 'cuda':
        return None
    return GpuArchitecture(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def auto_declines_fused(gpu: GpuArchitecture) -> Optional[str]:
    """Why 'auto' does not pick the fused kernel on `gpu` and how to opt in, or None where a GPU
    run verified it."""
    if gpu.capability < MIN_AUTO_ARCHITECTURE:
        return (f"not offered by 'auto' below sm_80 (on {gpu.sm} it compiles without tensor-core code and "
                f"likely loses to SDPA); to use it anyway: {OPT_IN}")
    if gpu.capability not in VERIFIED_ARCHITECTURES:
        return (f'not yet verified correct and faster than SDPA on {gpu.sm}; to verify it on this GPU: {VERIFY} '
                f'(then list the measurement in VERIFIED_ARCHITECTURES); to use it meanwhile: {OPT_IN}')
    return None


def check_backend(backend: str) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f'attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}')
    return backend


def choose_backend(requested: str, qkv: torch.Tensor, layout: WindowLayout, num_heads: int,
                   dropout_p: float = 0.) -> str:
    """'sdpa' or 'fused': what `focal_attention` runs for these inputs with `requested`; always
    'sdpa' while `exporting`."""
    if exporting():
        return 'sdpa'
    kind = (requested, qkv.dtype, qkv.shape[-1] // 3 // num_heads, dropout_p > 0)
    chosen = layout.backend_choices.get(kind)
    return chosen if chosen is not None else _choose(kind, qkv, layout, num_heads, dropout_p)


@torch.compiler.disable
def _choose(kind: tuple, qkv: torch.Tensor, layout: WindowLayout, num_heads: int, dropout_p: float) -> str:
    choices = _CHOICES.setdefault((layout.geometry, qkv.device), {})
    layout.backend_choices = choices  # every layout of this geometry and device shares the table
    if kind not in choices:
        choices[kind] = _decide(check_backend(kind[0]), qkv, layout, num_heads, dropout_p)
    return choices[kind]


def _decide(requested: str, qkv: torch.Tensor, layout: WindowLayout, num_heads: int, dropout_p: float) -> str:
    where = f'{qkv.device} {str(qkv.dtype).replace("torch.", "")}'
    if requested == 'sdpa':
        _log_once(logging.INFO, f'focal attention on {where}: SDPA')
        return 'sdpa'
    if requested == 'fused':
        reason = fused.unavailable_reason(qkv, layout, num_heads, dropout_p, allow_interpreter=True)
        if reason is not None:
            _log_once(logging.WARNING,
                      f'focal attention: the fused kernel cannot run {where} inputs ({reason}): using SDPA')
            return 'sdpa'
        failure = fused.launch_failure(qkv, layout, num_heads)
        if failure is not None:
            _log_once(logging.WARNING, f'focal attention: the fused kernel fails on {where} inputs of windows of '
                                       f'{layout.window_area} tokens ({failure}): using SDPA')
            return 'sdpa'
        _log_once(logging.INFO, f'focal attention on {where}: fused Triton kernel')
        return 'fused'
    gpu = gpu_architecture(qkv.device)
    # A GPU never needs the interpreter; CPU tensors on a device described as a GPU are a test's.
    reason = fused.unavailable_reason(qkv, layout, num_heads, dropout_p, allow_interpreter=gpu is not None)
    if gpu is None or reason is not None:
        _log_once(logging.INFO, f'focal attention on {where}: SDPA (the fused kernel cannot run: {reason or "no GPU"})')
        return 'sdpa'
    declined = auto_declines_fused(gpu)
    if declined is not None:
        _log_once(logging.INFO, f'focal attention on {qkv.device} ({gpu.name}, {gpu.sm}): SDPA. The fused Triton '
                                f'kernel is {declined}')
        return 'sdpa'
    failure = fused.launch_failure(qkv, layout, num_heads)
    if failure is not None:
        _log_once(logging.WARNING, f'focal attention on {where}: SDPA. The fused kernel, verified on {gpu.sm}, fails '
                                   f'on inputs of windows of {layout.window_area} tokens here ({failure})')
        return 'sdpa'
    _log_once(logging.INFO, f'focal attention on {where}: fused Triton kernel (verified on {gpu.sm}: '
                            f'{VERIFIED_ARCHITECTURES[gpu.capability]})')
    return 'fused'


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        _logger.log(level, message)


def clear_backend_choices() -> None:
    """Forget every choice and which messages were logged: each kind of input is chosen (and
    logged) again on its next call, e.g. after a change to VERIFIED_ARCHITECTURES."""
    for choices in _CHOICES.values():
        choices.clear()  # layouts still point at these tables
    _CHOICES.clear()
    _LOGGED.clear()


class BackendRecord:
    """Which backend ('sdpa' or 'fused') one attention module ran in its last call, None before
    the first. `focal_attention` writes it: a plain object, which compiled graphs may update (a
    module attribute they may not, on torch 2.4)."""

    def __init__(self):
        self.name: Optional[str] = None


def backends_in_use(model: nn.Module) -> Set[str]:
    """The backends ('sdpa', 'fused') that the focal attention modules of `model` ran in their last
    call: read from the model (their `backend_record`), not from the flag it was given."""
    names = set()
    for module in model.modules():
        record = getattr(module, 'backend_record', None)
        if isinstance(record, BackendRecord) and record.name is not None:
            names.add(record.name)
    return names
