"""Throughput and peak memory of Focal-T/S/B against timm's Swin-T/S/B, in one run, same batch
size and precision, printed as a Markdown table with the focal/swin ratio.

CPU: fp32. CUDA: bf16 autocast, eager and (with --compile) torch.compile'd.

    python scripts/benchmark.py                       # CPU, batch 8, all three sizes
    python scripts/benchmark.py --device cuda --batch-size 128 --compile
    python scripts/benchmark.py --sizes tiny --mode inference --iters 20
    python scripts/benchmark.py --device cuda --sizes tiny --attn-backend fused sdpa   # one row each

--attn-backend sets the Focal models' attention backend (see models/focal_attention): 'auto' runs
SDPA except on GPU architectures where the fused kernel was verified (none yet), 'fused' the Triton
kernel. scripts/benchmark_attention.py times the attention op alone.
"""
import argparse
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, TypeVar

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
from timm.layers import use_fused_attn  # noqa: E402

import models  # noqa: E402,F401  (registers the focal_* models with timm)
from engine import memory_used_mb  # noqa: E402

T = TypeVar('T')

PAIRS = {
    'tiny': ('focal_tiny_patch4_window7_224', 'swin_tiny_patch4_window7_224'),
    'small': ('focal_small_patch4_window7_224', 'swin_small_patch4_window7_224'),
    'base': ('focal_base_patch4_window7_224', 'swin_base_patch4_window7_224'),
}


@dataclass
class Measurement:
    images_per_s: float
    peak_mib: float


def measure(step: Callable[[], None], device: torch.device, batch_size: int, warmup: int, iters: int) -> Measurement:
    """Images per second over `iters` calls of `step` after `warmup` calls, and the peak memory
    (CUDA: allocated by tensors; CPU: the process's resident set, weights and imports included)
    during warm-up and timed calls."""
    for _ in range(warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return Measurement(batch_size * iters / elapsed, memory_used_mb(device))


def benchmark_model(name: str, mode: str, args: argparse.Namespace, device: torch.device,
                    dtype: Optional[torch.dtype], compiled: bool, attn_backend: Optional[str] = None) -> Measurement:
    """Runs in a fresh process (see `in_fresh_process`), so the peak memory is this model's.
    attn_backend: for Focal models."""
    torch.set_num_threads(args.threads)
    kwargs = dict(attn_backend=attn_backend) if attn_backend else {}
    model = timm.create_model(name, num_classes=1000, **kwargs).to(device)
    runner = torch.compile(model) if compiled else model
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    if mode == 'inference':
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                runner(images)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with autocast:
                loss = F.cross_entropy(runner(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    return measure(step, device, args.batch_size, args.warmup, args.iters)


def in_fresh_process(function: Callable[..., T], *args) -> T:
    """`function(*args)` in a spawned process: no memory or compiled state carries over from
    the previous model."""
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pool.apply(function, args)


def swin_attention() -> str:
    """How timm's Swin computes attention in this process (and in the spawned ones, which
    inherit the environment): its SDPA path is opt-in, with TIMM_FUSED_ATTN=2."""
    return 'SDPA' if use_fused_attn(experimental=True) else 'unfused (timm default; TIMM_FUSED_ATTN=2 for SDPA)'


def machine_description(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}'
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch-size', type=int, default=None, help='default 128 on CUDA, 8 on CPU')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--sizes', nargs='+', choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument('--mode', nargs='+', choices=['inference', 'train'], default=['inference', 'train'])
    parser.add_argument('--compile', action='store_true', help='also measure torch.compile (CUDA)')
    parser.add_argument('--warmup', type=int, default=None, help='default 10 on CUDA, 2 on CPU')
    parser.add_argument('--iters', type=int, default=None, help='default 30 on CUDA, 5 on CPU')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='CPU threads')
    parser.add_argument('--attn-backend', nargs='+', choices=['auto', 'sdpa', 'fused'], default=['auto'],
                        help='Focal attention backends to measure (a row each)')
    args = parser.parse_args()
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
          f'{"bf16 autocast" if dtype else f"fp32, {args.threads} threads"}; each measurement in a fresh process; '
          f'Swin attention {swin_attention()}')
    print()
    print('| model | mode | compiled | focal attention | focal img/s | swin img/s | focal/swin | focal peak MiB '
          '| swin peak MiB | peak ratio |')
    print('| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    for size in args.sizes:
        focal, swin = PAIRS[size]
        for mode in args.mode:
            for compiled in variants:
                s = in_fresh_process(benchmark_model, swin, mode, args, device, dtype, compiled)
                for backend in args.attn_backend:
                    f = in_fresh_process(benchmark_model, focal, mode, args, device, dtype, compiled, backend)
                    peak = f'{f.peak_mib:.0f} | {s.peak_mib:.0f} | {f.peak_mib / s.peak_mib:.2f}'
                    print(f'| {size} | {mode} | {"yes" if compiled else "no"} | {backend} | {f.images_per_s:.1f} | '
                          f'{s.images_per_s:.1f} | {f.images_per_s / s.images_per_s:.2f} | {peak} |', flush=True)


if __name__ == '__main__':
    main()
