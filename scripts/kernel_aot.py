"""The fused kernels compiled ahead of time for CUDA GPUs that are absent, and what the compiler made
of them.

Every kernel launch a model's forward and backward makes is recorded on the CPU, with recorders in
place of the kernels of `models/focal_attention/triton_kernels.py` (whatever `triton.jit` kernels it
holds, under whatever arguments), then compiled by the installed Triton for CUDA targets as its JIT
would compile the same arguments on that GPU, with the dot settings fused picks there
(`fused.dot_settings`): the JIT's own specialisation runs (integers divisible by 16 and 16-byte
aligned pointers get the divisibility hint, integers equal to 1 become constants) up to the call
`triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))`, which is then made for the
target. Launches the JIT would compile to the same kernel are compiled once. `sass_stats` reads
registers, spills, shared memory and instruction counts from the binary with the cuobjdump shipped
in Triton's package.

    summary = compile_cases(['focal_tiny'], ['bfloat16'], archs=(80, 90), stats=True)

Nothing here needs a GPU. tests/test_kernel_compile.py and scripts/kernel_report.py use it. Capture
and compilation run in spawned worker processes: their kernels are compiled `JITFunction`s (a test
process under TRITON_INTERPRET=1 holds interpreter ones) and no patching leaks into the caller.
Tooling, not model code: it patches Triton's internals and runs a process pool.
"""
import contextlib
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import timm
import torch

import models
from config import load_config
from models.focal_attention import backends, fused, triton_kernels
from models.focal_backbone import BACKBONE_VARIANTS, focal_backbone
from triton_interpreter import interpreter
from utils import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The models the test compiles: Focal-T/S/B, one window-14 and one shifted ablation, one detection-size
# backbone input. A case is a timm model name, a config file, or `backbone:VARIANT`, with `@HxW` for
# the input size (default: the model's own).
CASES = {
    'focal_tiny': 'focal_tiny_patch4_window7_224',
    'focal_small': 'focal_small_patch4_window7_224',
    'focal_base': 'focal_base_patch4_window7_224',
    'focal_tiny_window14': 'configs/ablations/focal_tiny_window14.yaml',
    'focal_tiny_shift': 'configs/ablations/focal_tiny_shift.yaml',
    'backbone_800x1333': 'backbone:focal_tiny@800x1333',
}
DTYPES = ('float32', 'float16', 'bfloat16')
SHORT_DTYPE = {'float32': 'fp32', 'float16': 'fp16', 'bfloat16': 'bf16'}
# Shared memory one program may use (the opt-in limit per block), by compute capability: Triton
# refuses to load a kernel that asks for more (OutOfResources), so it is a compile failure here.
MAX_SHARED_BYTES = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                    100: 232448, 103: 232448, 120: 101376}


class CaseError(ValueError):
    """A case that names no model this module can build (the user's input)."""


class CaptureError(RuntimeError):
    """A case's run did not make the launches it should (a layer ran SDPA, nothing was launched)."""


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as the JIT sees it: element type and whether it is 16-byte aligned."""
    dtype: str
    aligned: bool

    def fake(self) -> torch.Tensor:
        """A small CPU tensor with that dtype and alignment (the JIT reads nothing else)."""
        buffer = torch.empty(64, dtype=getattr(torch, self.dtype))
        tensor = buffer if self.aligned else buffer[1:]
        if (tensor.data_ptr() % 16 == 0) != self.aligned:
            raise RuntimeError(f'cannot make a {"" if self.aligned else "mis"}aligned {self.dtype} tensor')
        return tensor


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel's name in `triton_kernels`, its positional arguments (tensors as
    `TensorArg`), the kernel arguments passed by keyword (fused passes the constexprs so) and the
    launch options (num_warps, ...), each sorted by name."""
    kernel: str
    args: tuple
    kwargs: Tuple[Tuple[str, object], ...]
    launch_options: Tuple[Tuple[str, object], ...]

    def constexprs(self) -> str:
        """`NAME=value ...` of the keyword arguments, booleans as 0/1."""
        return ' '.join(f'{k}={int(v) if isinstance(v, bool) else v}' for k, v in self.kwargs)

    def options(self) -> Dict[str, object]:
        return dict(self.launch_options)


@dataclass
class Compiled:
    """One distinct kernel compiled for sm_<arch> (or the reason it did not compile)."""
    launch: Launch
    arch: int
    dtype: str  # of the runs that launch it
    uses: List[str]  # the 'case dtype' runs that launch it
    cpu_s: float = 0.  # compiling it, ptxas included
    error: Optional[str] = None
    stats: Dict[str, int] = field(default_factory=dict)
    hints: Dict[str, List[str]] = field(default_factory=dict)  # argument names per specialisation


@dataclass
class Summary:
    compiled: List[Compiled]  # one per distinct kernel and architecture
    triton_version: str
    distinct_launches: int  # distinct argument sets over all runs
    exact: bool  # one compile per JIT cache key (else per configuration)
    wall_s: float
    cpu_s: float  # all processes: start-up, capture and compilation
    capture_cpu_s: float

    def compile_cpu_s(self) -> float:
        return sum(c.cpu_s for c in self.compiled)

    def timing(self) -> str:
        return (f'Triton {self.triton_version}: {self.distinct_launches} distinct launches, {len(self.compiled)} '
                f'{"kernels" if self.exact else "configurations"} x architectures compiled; {self.wall_s:.0f} s wall, '
                f'{self.cpu_s:.0f} s CPU (capture '
                f'{self.capture_cpu_s:.0f} s, compile {self.compile_cpu_s():.0f} s, the rest start-up)')


# ---- capture (in a worker) ----------------------------------------------------------------------

def _kernels() -> Dict[str, object]:
    """Every kernel object `triton_kernels` defines (its `triton.jit` functions), by name."""
    from triton.runtime import KernelInterface
    return {name: obj for name, obj in vars(triton_kernels).items() if isinstance(obj, KernelInterface)}


def _package_modules() -> list:
    """The loaded modules of the package that launches the kernels (models.focal_attention)."""
    package = triton_kernels.__name__.rpartition('.')[0]
    return [m for n, m in list(sys.modules.items()) if n == package or n.startswith(package + '.')]


def _plain(value):
    if isinstance(value, torch.Tensor):  # allocations start 16-byte aligned on any device: views may not
        aligned = value.storage_offset() * value.element_size() % 16 == 0
        return TensorArg(str(value.dtype).replace('torch.', ''), aligned)
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` (or `kernel.run`) records a Launch."""

    def __init__(self, name: str, arg_names: Sequence[str], records: List[Launch]):
        self.name, self.arg_names, self.records = name, set(arg_names), records

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)

    def run(self, *args, grid=None, warmup=False, **kwargs):
        def sorted_plain(items) -> tuple:
            return tuple(sorted((k, _plain(v)) for k, v in items))
        self.records.append(Launch(self.name, _plain(args),
                                   sorted_plain((k, v) for k, v in kwargs.items() if k in self.arg_names),
                                   sorted_plain((k, v) for k, v in kwargs.items() if k not in self.arg_names)))


@contextlib.contextmanager
def _recording() -> Iterator[List[Launch]]:
    """Recorders in place of every kernel, in `triton_kernels` and wherever the package's modules
    hold a reference to one; the kernels are back afterwards."""
    records: List[Launch] = []
    kernels = _kernels()
    swapped = []
    for module in _package_modules():
        for attr, value in list(vars(module).items()):
            for name, kernel in kernels.items():
                if value is kernel:
                    swapped.append((module, attr, value))
                    setattr(module, attr, _Recorder(name, kernel.arg_names, records))
    try:
        yield records
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


@contextlib.contextmanager
def _fused_backend_on_cpu() -> Iterator[None]:
    """Let 'fused' run on the CPU whatever this Triton is (its kernels are recorders here): the
    interpreter counts as a device and the installed Triton as fine. Input checks (window and head
    sizes, dtypes) still apply, as on a GPU."""
    saved = fused.triton_unavailable_reason, fused.interpreter_unavailable_reason
    fused.triton_unavailable_reason = fused.interpreter_unavailable_reason = lambda: None
    try:
        with interpreter(on=True):
            yield
    finally:
        fused.triton_unavailable_reason, fused.interpreter_unavailable_reason = saved


def resolve_case(case: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    """(model spec, (H, W) or None) of a case name from CASES or a spec `NAME[@HxW]`."""
    spec = CASES.get(case, case)
    spec, _, size = spec.partition('@')
    if not size:
        return spec, None
    match = re.fullmatch(r'(\d+)x(\d+)', size)
    if not match:
        raise CaseError(f'case {case!r}: the input size after @ must read HxW, e.g. 800x1333')
    return spec, (int(match.group(1)), int(match.group(2)))


def build_case(case: str, batch: int = 1) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The Focal model of a case with attn_backend 'fused', in train mode, and a random input batch.
    Specs: a timm model name, a YAML config (MODEL.TYPE focal), `backbone:VARIANT` (models.focal_backbone)."""
    spec, size = resolve_case(case)
    if spec.startswith('backbone:'):
        variant = spec.split(':', 1)[1]
        if variant not in BACKBONE_VARIANTS:
            raise CaseError(f'case {case!r}: backbone variants are {", ".join(BACKBONE_VARIANTS)}')
        model = focal_backbone(variant, attn_backend='fused')
        size = size or (800, 1333)
    elif spec.endswith(('.yaml', '.yml')):
        path = spec if os.path.exists(spec) else os.path.join(REPO_ROOT, spec)
        try:
            config = load_config(path, ['MODEL.FOCAL.ATTN_BACKEND', 'fused'])
        except UserError as error:
            raise CaseError(f'case {case!r}: {error}') from None
        if config.MODEL.TYPE != 'focal':
            raise CaseError(f'{spec}: MODEL.TYPE is {config.MODEL.TYPE!r}; only Focal models launch the fused kernels')
        model = models.build_model(config)
        size = size or (config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    elif not timm.is_model(spec) or not spec.startswith('focal'):
        raise CaseError(f'case {case!r} is none of {", ".join(CASES)}, a focal_* timm model, a YAML config or '
                        'backbone:VARIANT')
    else:
        model = timm.create_model(spec, attn_backend='fused')
        size = size or tuple(model.pretrained_cfg.get('input_size', (3, 224, 224))[1:])
    return model.train(), torch.randn(batch, 3, *size)


def _cuda_settings(dtype: str, tf32: bool) -> Dict[str, object]:
    """The constexprs fused's launch configuration picks differently on CUDA than on the CPU, where the
    launches are recorded (tf32: PyTorch allows TF32 matmuls)."""
    return fused.dot_settings(getattr(torch, dtype), cuda=True, tf32_allowed=tf32)


def _as_on_cuda(launch: Launch, dtype: str, tf32: bool) -> Launch:
    """The launch fused makes on CUDA where it made `launch` on the CPU (see `_cuda_settings`)."""
    kwargs = dict(launch.kwargs)
    kwargs.update({name: value for name, value in _cuda_settings(dtype, tf32).items() if name in kwargs})
    return Launch(launch.kernel, launch.args, tuple(sorted(kwargs.items())), launch.launch_options)


@contextlib.contextmanager
def _shapes_only() -> Iterator[Optional[object]]:
    """A FakeTensorMode in which the package's custom ops run their real implementation (with
    recorders for kernels), so that a model run computes shapes, dtypes and launches but no
    numbers; None where this PyTorch lacks what that needs (the run then computes)."""
    try:
        from torch._library.custom_ops import CustomOpDef
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError:
        yield None
        return
    ops = [op for module in _package_modules() for op in vars(module).values() if isinstance(op, CustomOpDef)]
    if not all(hasattr(op, '_init_fn') and hasattr(op, '_abstract_fn') for op in ops):
        yield None
        return
    saved = [op._abstract_fn for op in ops]
    for op in ops:
        op._abstract_fn = op._init_fn
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        for op, fake in zip(ops, saved):
            op._abstract_fn = fake


def capture(case: str, dtypes: Sequence[str] = DTYPES, batch: int = 1, tf32: bool = False) -> Dict[str, List[Launch]]:
    """The distinct launches of one forward and backward of a case in each dtype (fp16/bf16 through
    autocast, as training runs), as fused would make them on CUDA (tf32: with TF32 matmuls allowed).
    One real forward of one image builds the index maps (their values matter, and they do not depend
    on the batch); the recorded runs then compute shapes only (see `_shapes_only`), so that the batch
    costs nothing."""
    torch.manual_seed(0)
    model, images = build_case(case, batch)
    launches = {}
    with _recording() as records, _fused_backend_on_cpu():
        with torch.no_grad():
            model(images[:1])
        for dtype in dtypes:
            records.clear()
            with _shapes_only() as mode:
                inputs = mode.from_tensor(images) if mode is not None else images
                with torch.autocast('cpu', dtype=getattr(torch, dtype), enabled=dtype != 'float32'):
                    out = model(inputs)
                outputs = list(out.values()) if isinstance(out, dict) else [out]
                sum(o.float().sum() for o in outputs).backward()
                model.zero_grad(set_to_none=True)
            ran = backends.backends_in_use(model)
            if ran != {'fused'}:
                raise CaptureError(f'{case} {dtype}: its focal attention ran {sorted(ran) or "nothing"}, not only the '
                                   'fused kernels, so launches would be missing (the log of models.focal_attention '
                                   'says why)')
            if not records:
                raise CaptureError(f'{case} {dtype}: no kernel of models/focal_attention/triton_kernels.py ran')
            unknown = sorted(set(_cuda_settings(dtype, tf32)) - {k for launch in records for k, _ in launch.kwargs})
            if unknown:
                raise CaptureError(f'fused.dot_settings names {unknown}, which no kernel launch passes: the launches '
                                   'of models/focal_attention/fused.py no longer take them')
            launches[dtype] = list(dict.fromkeys(_as_on_cuda(launch, dtype, tf32) for launch in records))
    return launches


# ---- compilation (in a worker) ------------------------------------------------------------------

class _TargetDriver:
    """The active driver as the JIT asks it, for a GPU that is absent: a device (and so a kernel
    cache) per architecture, a null stream, the target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class _WouldCompile(Exception):
    """Raised where the JIT calls `triton.compile`, carrying what it passes."""


def _stop_at_compile(src, target=None, options=None, **_):
    raise _WouldCompile(src, target, options)


def jit_source(launch: Launch, arch: int):
    """(ASTSource, target, options) that the installed Triton's JIT passes to `triton.compile` for this
    launch on sm_<arch>: its run-time specialisation of these arguments, stopped before compiling."""
    import triton.compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime import JITFunction, driver
    kernel = _kernels()[launch.kernel]
    if not isinstance(kernel, JITFunction):
        raise TypeError(f'{launch.kernel} is a {type(kernel).__name__}: kernel_aot compiles plain triton.jit kernels; '
                        'add its configurations here')
    args = [a.fake() if isinstance(a, TensorArg) else a for a in launch.args]
    real_compile, had_own, own = triton.compiler.compile, 'compile' in vars(kernel), vars(kernel).get('compile')
    driver.set_active(_TargetDriver(GPUTarget('cuda', arch, 32)))
    triton.compiler.compile = kernel.compile = _stop_at_compile  # the binder, made now or before, calls one
    try:
        kernel.run(*args, grid=(1,), warmup=True, **dict(launch.kwargs), **launch.options())
    except _WouldCompile as stop:
        return stop.args
    finally:
        triton.compiler.compile = real_compile
        kernel.compile = own if had_own else real_compile  # the target driver stays: a worker has no other
    raise RuntimeError(f'the JIT did not compile {launch.kernel}: it found it compiled already')


def _hints(src, kernel) -> Dict[str, List[str]]:
    """Argument names with the divisibility-by-16 hint and those specialised to 1, from an ASTSource
    of any Triton 3.x (attrs: a dict by argument path, or an AttrsDescriptor)."""
    names = kernel.arg_names
    attrs = src.attrs
    if isinstance(attrs, dict):
        divisible = [names[path[0]] for path, props in attrs.items() if ['tt.divisibility', 16] in props]
        constants = getattr(src, 'constants', {})
        ones = [names[path[0]] for path, value in constants.items()
                if value == 1 and not isinstance(value, bool) and not kernel.params[path[0]].is_constexpr]
    elif hasattr(attrs, 'divisible_by_16'):  # Triton 3.0
        divisible = [names[i] for i in attrs.divisible_by_16]
        ones = [names[i] for i in attrs.equal_to_1]
    else:  # Triton 3.1/3.2: AttrsDescriptor.arg_properties
        properties = attrs.arg_properties
        divisible = [names[i] for i in properties.get('tt.divisibility', [])]
        ones = [names[i] for i in properties.get('tt.equal_to', properties.get('tt.equal_to_1', []))]
    non_constexpr = {p.name for p in kernel.params if not p.is_constexpr}
    return {'divisible_by_16': [n for n in divisible if n in non_constexpr], 'equal_to_1': ones}


def _jit_key(launch: Launch, arch: int) -> str:
    """What the JIT's kernel cache tells apart: source hash and options (or why it cannot say)."""
    try:
        src, target, options = jit_source(launch, arch)
    except Exception as error:  # reported by the compile job, which meets it again
        return f'unspecialisable {launch} {arch}: {error}'
    return f'{arch} {src.hash()} {sorted((k, repr(v)) for k, v in options.items())}'


def _bin(tool: str) -> str:
    import triton.backends.nvidia as nvidia
    path = os.path.join(os.path.dirname(nvidia.__file__), 'bin', tool)
    return path if os.path.exists(path) else tool


STORE_BYTES = {'': 4, '.64': 8, '.128': 16, '.U8': 1, '.S8': 1, '.U16': 2, '.S16': 2}
INSTRUCTION = re.compile(r'/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)')


def sass_stats(kernel) -> Dict[str, int]:
    """Registers, stack, spill bytes (local stores and loads in the SASS), shared memory, tensor-core
    and total instructions (NOPs excluded) of a compiled kernel, from its cubin."""
    with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:
        cubin.write(kernel.asm['cubin'])
        cubin.flush()
        usage = subprocess.run([_bin('cuobjdump'), '--dump-resource-usage', cubin.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_bin('cuobjdump'), '-sass', cubin.name], capture_output=True, text=True,
                              check=True).stdout
    opcodes = INSTRUCTION.findall(sass)

    def local_bytes(opcode: str) -> int:
        return sum(STORE_BYTES.get(suffix, 4) for op, suffix in opcodes if op == opcode)
    metadata = kernel.metadata
    return dict(registers=int(re.search(r'REG:(\d+)', usage).group(1)),
                stack_bytes=int(re.search(r'STACK:(\d+)', usage).group(1)),
                spill_store_bytes=local_bytes('STL'), spill_load_bytes=local_bytes('LDL'),
                shared_bytes=metadata.shared, num_warps=metadata.num_warps, num_stages=metadata.num_stages,
                hmma=sum(op == 'HMMA' for op, _ in opcodes), hgmma=sum(op == 'HGMMA' for op, _ in opcodes),
                instructions=sum(op != 'NOP' for op, _ in opcodes))


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (ptxas, cuobjdump)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_launch(launch: Launch, arch: int, stats: bool = False) -> Tuple[float, Optional[str], dict, dict]:
    """Compile one launch for sm_<arch>: (CPU seconds, error or None, stats, hints). A kernel that asks
    for more shared memory than the architecture gives one program fails (Triton would not load it)."""
    import triton
    start = _cpu_seconds()
    with tempfile.TemporaryFile(mode='w+') as diagnostics:
        try:
            src, target, options = jit_source(launch, arch)
            hints = _hints(src, _kernels()[launch.kernel])
            with _stderr_to(diagnostics):  # MLIR prints the reason of a failed pass there
                kernel = triton.compile(src, target=target, options=options)
            shared, limit = kernel.metadata.shared, MAX_SHARED_BYTES.get(arch)
            if limit is not None and shared > limit:
                raise RuntimeError(f'OutOfResources: {shared} bytes of shared memory per program; sm_{arch}: {limit}')
            return _cpu_seconds() - start, None, sass_stats(kernel) if stats else {}, hints
        except Exception as error:
            diagnostics.seek(0)
            reasons = list(dict.fromkeys(line.strip() for line in diagnostics if 'error' in line))
            lines = ''.join(traceback.format_exception_only(type(error), error)).strip().splitlines() + reasons[:3]
            return _cpu_seconds() - start, '\n'.join(lines[:12] + (['...'] if len(lines) > 12 else [])), {}, {}


@contextlib.contextmanager
def _stderr_to(file) -> Iterator[None]:
    """The process's standard error (file descriptor 2, where compiled libraries write) into `file`."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _configuration_key(launch: Launch, arch: int) -> str:
    """What a launch compiles to up to the JIT's integer and alignment hints: kernel, constexprs,
    launch options and pointer element types."""
    pointers = [a.dtype for a in launch.args if isinstance(a, TensorArg)]
    return f'{arch} {launch.kernel} {launch.kwargs} {launch.launch_options} {pointers}'


def _capture_run(run: tuple):
    """In a worker: (CPU seconds, [(dtype, 'case dtype', launch, arch, key)]) of one case (case, dtypes,
    batch, tf32, archs, exact), keyed by the JIT's cache key (exact) or by configuration."""
    case, dtypes, batch, tf32, archs, exact = run
    start = _cpu_seconds()
    launches = capture(case, dtypes, batch, tf32)
    key = _jit_key if exact else _configuration_key
    keyed = [(dtype, f'{case} {SHORT_DTYPE[dtype]}', launch, arch, key(launch, arch))
             for dtype in dtypes for launch in launches[dtype] for arch in archs]
    return _cpu_seconds() - start, keyed


# ---- driver (in the caller) ---------------------------------------------------------------------

def _init_worker() -> None:
    torch.set_num_threads(1)


@contextlib.contextmanager
def worker_pool(processes: int) -> Iterator[ProcessPoolExecutor]:
    """Spawned workers without TRITON_INTERPRET, so that their kernels are compilable JITFunctions
    (the variable stays unset while workers may start). A worker that dies, as when the compiler
    aborts the process, fails every pending task (BrokenProcessPool) instead of a wait forever."""
    with interpreter(on=False):
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker)
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        else:
            pool.shutdown()


def compile_cases(cases: Sequence[str], dtypes: Iterable[str] = DTYPES, archs: Iterable[int] = (80, 90),
                  stats: bool = False, batch: int = 1, tf32: bool = False, exact: bool = True,
                  processes: int = 2) -> Summary:
    """Capture every case in every dtype and compile each distinct kernel once per architecture, in
    `processes` workers; kernels compile while later runs are captured.

    exact: every kernel the JIT would compile for these launches (its cache key: constexprs, options,
    types, and which integers are divisible by 16 or equal to 1 and which pointers aligned). Else one
    per configuration (kernel, constexprs, options, pointer types): launches that differ only in
    those hints share one compile, made with the hints of the first run (in `cases` order) that makes
    it, and are listed under it."""
    import triton
    runs = [(case, list(dtypes), batch, tf32, list(archs), exact) for case in cases]
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    distinct: Dict[str, Compiled] = {}
    launches, pending, capture_cpu_s = set(), [], 0.
    with worker_pool(processes) as pool:
        for cpu_s, keyed in pool.map(_capture_run, runs):
            capture_cpu_s += cpu_s
            for dtype, run, launch, arch, key in keyed:
                launches.add(launch)
                if key not in distinct:
                    distinct[key] = Compiled(launch, arch, dtype, [])
                    pending.append((distinct[key], pool.submit(compile_launch, launch, arch, stats)))
                if run not in distinct[key].uses:
                    distinct[key].uses.append(run)
        for entry, outcome in pending:
            try:
                entry.cpu_s, entry.error, entry.stats, entry.hints = outcome.result()
            except BrokenProcessPool as error:
                raise RuntimeError(f'a compile worker died (Triton {triton.__version__} aborted the process?) with '
                                   f'{entry.launch.kernel} ({entry.launch.constexprs()}) for sm_{entry.arch} among '
                                   f'the kernels still compiling; kernel_report.py --processes 1 finds it') from error
    return Summary(list(distinct.values()), triton.__version__, len(launches), exact, time.perf_counter() - start,
                   _cpu_seconds() - cpu_start, capture_cpu_s)


def failure_report(triton_version: str, compiled: Iterable[Compiled]) -> str:
    """One paragraph per kernel that did not compile: Triton version, architecture, kernel and
    constexprs, the runs that launch it, the compiler's message."""
    return '\n\n'.join(f'Triton {triton_version} cannot compile {c.launch.kernel} ({c.launch.constexprs()}, '
                       f'{c.launch.options()}) for sm_{c.arch}, launched by {", ".join(c.uses)}:\n{c.error}'
                       for c in compiled if c.error)
