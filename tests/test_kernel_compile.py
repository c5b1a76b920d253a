"""Every fused-kernel launch of the shipped models compiles for the GPUs users train on, sm_80 (A100)
and sm_90 (H100/H200), with the installed Triton: ahead of time, without a GPU
(models/focal_attention/aot.py). A kernel that does not compile here does not compile there.

Launches are recorded from one forward and backward at batch 1 of Focal-T/S/B, a window-14 and a
shifted ablation and an 800x1333 backbone input, in fp32, fp16 and bf16, and compiled as the JIT
would compile them on the GPU (its integer and alignment hints), once per configuration (launches
that differ only in those hints share one compile; `scripts/kernel_report.py --model all --dtype
all` compiles every variant and prints what the compiler made of each). Where this Triton cannot
compile for an architecture and dtype (aot.COMPILES_FROM), the test says so and checks that it
still cannot, so that the table stays true.
"""
import os

import pytest

pytest.importorskip('triton')

from models.focal_attention import aot  # noqa: E402

ARCHS = (80, 90)


def test_every_fused_kernel_launch_compiles_for_sm80_and_sm90():
    summary = aot.compile_cases(list(aot.CASES), aot.DTYPES, ARCHS, exact=False, processes=min(2, os.cpu_count() or 1))
    print(summary.timing())
    assert {use for c in summary.compiled for use in c.uses} == {
        f'{case} {aot.SHORT_DTYPE[dtype]}' for case in aot.CASES for dtype in aot.DTYPES}
    assert {c.arch for c in summary.compiled} == set(ARCHS)

    expected = [c for c in summary.compiled if aot.triton_compiles(c.arch, c.dtype)]
    assert not any(c.error for c in expected), aot.failure_report(summary.triton_version, expected)

    unsupported = {(c.arch, c.dtype) for c in summary.compiled if c not in expected}
    for arch, dtype in sorted(unsupported):
        group = [c for c in summary.compiled if (c.arch, c.dtype) == (arch, dtype)]
        print(f'Triton {summary.triton_version} cannot compile {sum(bool(c.error) for c in group)} of {len(group)} '
              f'{dtype} kernels for sm_{arch} (aot.COMPILES_FROM)')
        assert any(c.error for c in group), (f'Triton {summary.triton_version} now compiles every {dtype} kernel for '
                                             f'sm_{arch}: update aot.COMPILES_FROM')
