"""Throughput and peak memory of Focal-T/S/B and Focal-fast-T/S/B against timm's Swin-T/S/B, in
one run, same batch size and precision, printed as a Markdown table with the model/swin ratio.

CPU: fp32. CUDA: bf16 autocast, eager and (with --compile) torch.compile'd.

    python scripts/benchmark.py                       # CPU, batch 8, all three sizes, both families
    python scripts/benchmark.py --device cuda --batch-size 128 --compile
    python scripts/benchmark.py --sizes tiny --families fast --mode inference --iters 20
    python scripts/benchmark.py --device cuda --sizes tiny --attn-backend fused sdpa --swin-sdpa
    python scripts/benchmark.py --sizes tiny --families fast --official-fast PATH/focal_transformer_v2.py

--official-fast times the official Focal-fast code too (`classification/focal_transformer_v2.py` of
microsoft/Focal-Transformer, from a checkout of your own; nothing of it is part of this repository),
built with the same arguments, in the Focal-fast rows.

--attn-backend sets the Focal models' attention backend (see models/focal_attention: 'auto' runs SDPA
except on GPU architectures where the fused kernel was verified, none yet); the table says
which backend each Focal row actually ran, read from the model. --swin-sdpa gives timm's Swin its
SDPA attention (TIMM_FUSED_ATTN=2 does the same); by default timm's Swin computes attention unfused.
scripts/benchmark_attention.py times the attention op alone; scripts/gpu_checks.sh runs every GPU
check and timing in one call.

Times are the median of --iters steps, each timed with CUDA events (CPU: a clock), after --warmup
steps; the peak memory is read in one more step of its own: what CUDA allocated for tensors on a
GPU, the process's peak resident set (weights, imports and allocator caches included) on a CPU.
"""
import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, TypeVar

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import timm.layers  # noqa: E402

import models  # noqa: E402,F401  (registers the focal_* models with timm)
from models.focal_attention import backends_in_use  # noqa: E402
from models.focal_fast import FAST_ARGS  # noqa: E402
from models.focal_transformer import BASE, SMALL, TINY  # noqa: E402


T = TypeVar('T')

SIZES = ('tiny', 'small', 'base')
FAMILIES = {'focal': 'focal_{}_patch4_window7_224', 'fast': 'focalv2_{}_useconv_patch4_window7_224'}
SWIN = 'swin_{}_patch4_window7_224'
VARIANTS = {'tiny': TINY, 'small': SMALL, 'base': BASE}  # the official constructor's arguments
OFFICIAL_FAST = 'official-fast-'


@dataclass
class Measurement:
    images_per_s: float
    peak_mib: float  # see `peak_mib`
    attention: str  # what the model's attention ran (see `attention_in_use`)


def median_seconds(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median time of one call of `step` over `iters` calls after `warmup` calls: each call between
    two CUDA events on a GPU (launch gaps included, as a training loop has them), a clock on a CPU."""
    for _ in range(warmup):
        step()
    if device.type != 'cuda':
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """CUDA memory allocated at the peak of one call of `step` (weights, gradients and optimizer
    state included); on a CPU the process's peak resident set so far (imports and caches too:
    meaningful in a fresh process)."""
    if device.type != 'cuda':
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def training_step(runner: Callable, images: torch.Tensor, dtype: Optional[torch.dtype],
                  loss_fn: Callable[[object], torch.Tensor], optimize: bool, parameters) -> Callable[[], None]:
    """One AdamW step over `parameters` of `runner` (a model or its compiled version) on `images`
    under autocast to `dtype`; optimize=False: forward and backward only."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=1e-4) if optimize else None

    def step() -> None:
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(runner(images))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        for p in parameters:
            p.grad = None
    return step


def inference_step(model: torch.nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype]) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            model(images)
    return step


def attention_in_use(model: torch.nn.Module) -> str:
    """What the model's attention ran: the focal backends its layers last ran, or for timm models
    whether their attention modules use SDPA (timm's `fused_attn`, decided at construction)."""
    focal = backends_in_use(model)
    if focal:
        return '+'.join(sorted(focal))
    flags = {m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    return {frozenset([True]): 'timm sdpa', frozenset([False]): 'timm unfused'}.get(frozenset(flags), 'timm mixed')


def create(name: str, attn_backend: Optional[str] = None, swin_sdpa: bool = False, **kwargs) -> torch.nn.Module:
    """A timm model; attn_backend for Focal models; swin_sdpa: timm attention through SDPA (timm
    decides it when a model is built, from TIMM_FUSED_ATTN or `set_fused_attn`)."""
    if attn_backend:
        kwargs['attn_backend'] = attn_backend
    if not swin_sdpa or timm.layers.use_fused_attn(experimental=True):
        return timm.create_model(name, **kwargs)
    was_on = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(True, experimental=True)
    try:
        return timm.create_model(name, **kwargs)
    finally:
        timm.layers.set_fused_attn(was_on)


def measure(model: torch.nn.Module, mode: str, images: torch.Tensor, dtype: Optional[torch.dtype],
            compiled: bool, warmup: int, iters: int, loss_fn: Optional[Callable] = None,
            optimize: bool = True, runner: Optional[Callable] = None) -> Measurement:
    """Images per second and peak memory of training steps ('train'; loss_fn of the output, default
    cross-entropy against random labels; optimize=False: no optimizer step) or inference
    ('inference') of `model` on `images`. runner: what to call instead of the model (a compiled
    version of it; `compiled` makes one)."""
    device = images.device
    if runner is None:
        runner = torch.compile(model) if compiled else model
    if mode == 'inference':
        model.eval()
        step = inference_step(runner, images, dtype)
    else:
        model.train()
        if loss_fn is None:
            labels = torch.randint(0, model.num_classes, (images.shape[0],), device=device)
            loss_fn = lambda logits: F.cross_entropy(logits, labels)  # noqa: E731
        step = training_step(runner, images, dtype, loss_fn, optimize, model.parameters())
    seconds = median_seconds(step, device, warmup, iters)
    return Measurement(images.shape[0] / seconds, peak_mib(step, device), attention_in_use(model))


def official_fast_model(path: str, size: str) -> torch.nn.Module:
    """The official Focal-fast model of `size`, built by the official file at `path` with the
    arguments of our variant (their names are the official ones)."""
    import importlib.util
    import timm.data.transforms
    if not hasattr(timm.data.transforms, '_pil_interp'):  # imported by the official file, gone from timm
        timm.data.transforms._pil_interp = timm.data.transforms.str_to_pil_interp
    spec = importlib.util.spec_from_file_location('official_focal_transformer_v2', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FocalTransformer(**VARIANTS[size], **FAST_ARGS, num_classes=1000)


def benchmark_model(name: str, mode: str, args: argparse.Namespace, device: torch.device,
                    dtype: Optional[torch.dtype], compiled: bool, attn_backend: Optional[str] = None) -> Measurement:
    """Runs in a fresh process (see `in_fresh_process`), so no memory or compiled state of the
    previous model is left. name: a timm name, or 'official-fast-SIZE' for the official code's
    Focal-fast (--official-fast). attn_backend: for Focal models."""
    torch.set_num_threads(args.threads)
    if name.startswith(OFFICIAL_FAST):
        model = official_fast_model(args.official_fast, name[len(OFFICIAL_FAST):]).to(device)
    else:
        model = create(name, attn_backend, swin_sdpa=args.swin_sdpa, num_classes=1000).to(device)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    measurement = measure(model, mode, images, dtype, compiled, args.warmup, args.iters)
    if name.startswith(OFFICIAL_FAST):
        measurement.attention = 'official code'
    return measurement


def in_fresh_process(function: Callable[..., T], *args) -> T:
    """`function(*args)` in a spawned process: no memory or compiled state carries over from
    the previous model."""
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pool.apply(function, args)


def machine_description(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}'
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch-size', type=int, default=None, help='default 128 on CUDA, 8 on CPU')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--sizes', nargs='+', choices=SIZES, default=list(SIZES))
    parser.add_argument('--families', nargs='+', choices=list(FAMILIES), default=list(FAMILIES),
                        help='focal: Focal-T/S/B; fast: Focal-fast-T/S/B')
    parser.add_argument('--mode', nargs='+', choices=['inference', 'train'], default=['inference', 'train'])
    parser.add_argument('--compile', action='store_true', help='also measure torch.compile (CUDA)')
    parser.add_argument('--warmup', type=int, default=None, help='default 10 on CUDA, 2 on CPU')
    parser.add_argument('--iters', type=int, default=None, help='default 30 on CUDA, 5 on CPU')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='CPU threads')
    parser.add_argument('--attn-backend', nargs='+', choices=['auto', 'sdpa', 'fused'], default=['auto'],
                        help='Focal attention backends to measure (a row each)')
    parser.add_argument('--swin-sdpa', action='store_true', help="timm's Swin with SDPA attention")
    parser.add_argument('--official-fast', metavar='PATH',
                        help="the official focal_transformer_v2.py: Focal-fast rows also time its model")
    args = parser.parse_args()
    if args.official_fast and not os.path.isfile(args.official_fast):
        parser.error(f'--official-fast {args.official_fast}: no such file')
    device = torch.device(args.device)
    on_cuda = device.type == 'cuda'
    args.batch_size = args.batch_size or (128 if on_cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    args.iters = args.iters or (30 if on_cuda else 5)
    dtype = torch.bfloat16 if on_cuda else None
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    variants: List[bool] = [False, True] if args.compile else [False]

    print(f'machine: {machine_description(device)}; batch {args.batch_size}, {args.img_size}px, '
          f'{"bf16 autocast" if dtype else f"fp32, {args.threads} threads"}; each measurement in a fresh process')
    print()
    print('| model | mode | compiled | attention (ran) | swin attention | img/s | swin img/s | model/swin '
          '| peak MiB | swin peak MiB | peak ratio |')
    print('| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    for size in args.sizes:
        for mode in args.mode:
            for compiled in variants:
                s = in_fresh_process(benchmark_model, SWIN.format(size), mode, args, device, dtype, compiled)
                rows = [(family, FAMILIES[family].format(size), backend)
                        for family in args.families for backend in args.attn_backend]
                if args.official_fast and 'fast' in args.families:
                    rows.append(('fast', OFFICIAL_FAST + size, None))
                for family, name, backend in rows:
                    m = in_fresh_process(benchmark_model, name, mode, args, device, dtype, compiled, backend)
                    label = f'{family}-{size}' + (' (official code)' if name.startswith(OFFICIAL_FAST) else '')
                    peak = f'{m.peak_mib:.0f} | {s.peak_mib:.0f} | {m.peak_mib / s.peak_mib:.2f}'
                    print(f'| {label} | {mode} | {"yes" if compiled else "no"} | {backend or "-"} ({m.attention}) | '
                          f'{s.attention} | {m.images_per_s:.1f} | {s.images_per_s:.1f} | '
                          f'{m.images_per_s / s.images_per_s:.2f} | {peak} |', flush=True)


if __name__ == '__main__':
    main()
