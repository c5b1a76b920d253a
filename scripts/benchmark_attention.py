"""The focal attention op alone, fused Triton kernel against SDPA, at the shapes of a model's stages:
time of forward and of forward+backward, peak memory of forward+backward, and how far the fused
results lie from SDPA's (relative error of the output and of each gradient). Printed as a
Markdown table.

    python scripts/benchmark_attention.py --device cuda                # Focal-T, batch 128, bf16
    python scripts/benchmark_attention.py --device cuda --model focal_base_patch4_window7_224 --dtype fp32
    python scripts/benchmark_attention.py                              # CPU: SDPA only, batch 8

Inputs are random (never zeros) and drawn anew for each stage; times are medians over repeated
runs after a warm-up (triton.testing.do_bench on CUDA).
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import models  # noqa: E402,F401  (registers the focal_* models with timm)
from models.focal_attention import choose_backend, focal_attention  # noqa: E402
from models.focal_transformer import FocalTransformerBlock  # noqa: E402

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def median_ms(function: Callable[[], object], device: torch.device, iters: int) -> float:
    if device.type == 'cuda':
        import triton.testing
        return triton.testing.do_bench(function, warmup=25, rep=100, return_mode='median')
    function()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def stage_inputs(block: FocalTransformerBlock, batch: int, height: int, width: int, dtype: torch.dtype,
                 device: torch.device) -> Dict[str, object]:
    """Random qkv, pooled keys/values, the block's position bias and layout at one stage's size."""
    attn = block.attn
    layout = block.layout(height, width, device)
    channels = attn.dim
    num_pooled = layout.zero_token - layout.num_fine
    qkv = torch.randn(batch, layout.num_fine, 3 * channels, device=device, dtype=dtype, requires_grad=True)
    pooled_kv = (torch.randn(batch, num_pooled, 2 * channels, device=device, dtype=dtype, requires_grad=True)
                 if num_pooled else None)
    bias = (attn.position_bias().detach().float() + 0.02 * torch.randn_like(attn.position_bias().float()))
    return dict(qkv=qkv, pooled_kv=pooled_kv, position_bias=bias.requires_grad_(), layout=layout,
                num_heads=attn.num_heads, scale=attn.scale)


def run(inputs: Dict[str, object], backend: str, grad_out: torch.Tensor, backward: bool) -> List[torch.Tensor]:
    out = focal_attention(**inputs, backend=backend)
    if not backward:
        return [out]
    tensors = [t for t in (inputs['qkv'], inputs['pooled_kv'], inputs['position_bias']) if t is not None]
    return [out] + list(torch.autograd.grad(out, tensors, grad_out))


def peak_mib(function: Callable[[], object], device: torch.device) -> float:
    if device.type != 'cuda':
        return float('nan')
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--model', default='focal_tiny_patch4_window7_224')
    parser.add_argument('--batch-size', type=int, default=None, help='default 128 on CUDA, 8 on CPU')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--dtype', choices=list(DTYPES), default=None, help='default bf16 on CUDA, fp32 on CPU')
    parser.add_argument('--iters', type=int, default=5, help='CPU repetitions (CUDA: do_bench decides)')
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == 'cuda'
    batch = args.batch_size or (128 if on_cuda else 8)
    dtype = DTYPES[args.dtype or ('bf16' if on_cuda else 'fp32')]
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=0).to(device)
    print(f'{args.model} attention op, batch {batch}, {args.img_size}px, {dtype}, '
          f'{torch.cuda.get_device_name(device) if on_cuda else "CPU"}, torch {torch.__version__}')
    print()
    print('| stage | windows x keys | backend | fwd ms | fwd+bwd ms | fwd+bwd peak MiB '
          '| rel. err out / dqkv / dpooled / dbias |')
    print('| --- | --- | --- | ---: | ---: | ---: | --- |')
    size = args.img_size // 4
    for stage_index, stage in enumerate(model.layers):
        block = stage.blocks[0]
        inputs = stage_inputs(block, batch, size, size, dtype, device)
        layout = inputs['layout']
        grad_out = torch.randn(batch, layout.num_fine, block.attn.dim, device=device, dtype=dtype)
        reference = None
        for backend in ('sdpa', 'fused'):
            shape = f'{layout.num_windows} x {layout.num_attended}'
            if choose_backend(backend, inputs['qkv'], layout, block.attn.num_heads) != backend:
                print(f'| {stage_index} | {shape} | {backend} | n/a | n/a | n/a | cannot run here |')
                continue
            with torch.no_grad():
                forward = median_ms(lambda: run(inputs, backend, grad_out, False), device, args.iters)
            both = median_ms(lambda: run(inputs, backend, grad_out, True), device, args.iters)
            peak = peak_mib(lambda: run(inputs, backend, grad_out, True), device)
            results = run(inputs, backend, grad_out, True)
            if reference is None:
                reference, errors = results, '(reference)'
            else:
                errors = ' / '.join(f'{relative_error(v, r):.1e}' for v, r in zip(results, reference))
            print(f'| {stage_index} | {shape} | {backend} | {forward:.2f} | {both:.2f} | {peak:.0f} | {errors} |',
                  flush=True)
        size = size // 2


if __name__ == '__main__':
    main()
