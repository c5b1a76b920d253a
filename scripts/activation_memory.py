"""Activation memory of a training step, Focal-T/S/B and Focal-fast-T/S/B against Swin-T/S/B, on a
CPU: the bytes a bf16-autocast forward pass leaves allocated for backward, which is what a GPU's
training peak grows with the batch.

`scaled_dot_product_attention` runs through a stand-in that saves its query, key and value
inputs, as its fused CUDA kernels do (the CPU math path saves other tensors, including the
attention matrix), so the figures estimate the GPU's activations without a GPU. timm's Swin
computes attention without SDPA unless `TIMM_FUSED_ATTN=2` is set (its fused path is marked
experimental), and is measured as it runs. Bytes are counted by glibc's allocator (Linux), each
model in a fresh process.

    python scripts/activation_memory.py                  # batch 4, all three sizes, both families
    python scripts/activation_memory.py --sizes tiny --batch-size 8
    TIMM_FUSED_ATTN=2 python scripts/activation_memory.py   # against Swin with fused attention
"""
import argparse
import ctypes
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import timm.layers  # noqa: E402

import models  # noqa: E402,F401  (registers the focal_* models with timm)
from benchmark import FAMILIES, SIZES, SWIN, in_fresh_process  # noqa: E402
from models.focal_attention.input_saving import input_saving_sdpa  # noqa: E402


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]


def allocated_bytes() -> int:
    """Bytes glibc's malloc has handed out and not taken back (heap and mmap'ed blocks)."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, 'mallinfo2'):
        raise SystemExit('error: counting allocations needs glibc 2.33+ (Linux)')
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def swin_attention() -> str:
    """How timm's Swin computes attention here and in the spawned processes, which inherit the
    environment: its SDPA path is opt-in, with TIMM_FUSED_ATTN=2."""
    if timm.layers.use_fused_attn(experimental=True):
        return 'SDPA'
    return 'unfused (timm default; TIMM_FUSED_ATTN=2 for SDPA)'


def activation_mib(name: str, batch_size: int, img_size: int) -> float:
    """Runs in a fresh process: MiB left allocated by one training forward pass."""
    F.scaled_dot_product_attention = input_saving_sdpa
    model = timm.create_model(name).train()
    images = torch.randn(batch_size, 3, img_size, img_size)
    gc.collect()
    before = allocated_bytes()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = model(images).float().logsumexp(-1).mean()
    held = allocated_bytes() - before
    loss.backward()
    return held / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--sizes', nargs='+', choices=SIZES, default=list(SIZES))
    parser.add_argument('--families', nargs='+', choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args()
    allocated_bytes()  # fail here, not in a worker process, where glibc cannot count allocations
    print(f'activations kept for backward: batch {args.batch_size}, {args.img_size}px, bf16 autocast, '
          'SDPA replaced by a stand-in that saves its inputs as fused CUDA kernels do; '
          f'Swin attention {swin_attention()}')
    print()
    print('| model | MiB | swin MiB | model/swin |')
    print('| --- | ---: | ---: | ---: |')
    for size in args.sizes:
        swin = in_fresh_process(activation_mib, SWIN.format(size), args.batch_size, args.img_size)
        for family in args.families:
            held = in_fresh_process(activation_mib, FAMILIES[family].format(size), args.batch_size, args.img_size)
            print(f'| {family}-{size} | {held:.0f} | {swin:.0f} | {held / swin:.2f} |', flush=True)


if __name__ == '__main__':
    main()
