"""Every fused-kernel launch of the shipped models compiles for the GPUs users train on, sm_80 (A100)
and sm_90 (H100/H200), with the installed Triton: ahead of time, without a GPU
(scripts/kernel_aot.py). A kernel that does not compile here does not compile there.

Launches are recorded from one forward and backward at batch 1 of Focal-T/S/B, a window-14 and a
shifted ablation and an 800x1333 backbone input, in fp32, fp16 and bf16, and compiled as the JIT
would compile them on the GPU (its integer and alignment hints), once per configuration (launches
that differ only in those hints share one compile; `scripts/kernel_report.py --model all --dtype
all` compiles every variant and prints what the compiler made of each). Every Triton from 3.0
(torch 2.4) compiles them all; CI checks 3.0 and the pinned version.
"""
import os
import sys
from concurrent.futures.process import BrokenProcessPool

import pytest

from conftest import REPO_ROOT

pytest.importorskip('triton')

sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))

import kernel_aot  # noqa: E402  (scripts/kernel_aot.py)

ARCHS = (80, 90)


@pytest.mark.slow
def test_every_fused_kernel_launch_compiles_for_sm80_and_sm90():
    summary = kernel_aot.compile_cases(list(kernel_aot.CASES), kernel_aot.DTYPES, ARCHS, exact=False,
                                       processes=min(2, os.cpu_count() or 1))
    print(summary.timing())
    assert {use for c in summary.compiled for use in c.uses} == {
        f'{case} {kernel_aot.SHORT_DTYPE[dtype]}' for case in kernel_aot.CASES for dtype in kernel_aot.DTYPES}
    assert {c.arch for c in summary.compiled} == set(ARCHS)

    assert not any(c.error for c in summary.compiled), kernel_aot.failure_report(summary.triton_version,
                                                                                 summary.compiled)


@pytest.mark.slow
def test_a_compile_worker_that_dies_fails_the_run_instead_of_waiting_forever():
    """Triton's compiler can abort its process (an assertion in a pass); the caller must see it."""
    with pytest.raises(BrokenProcessPool):
        with kernel_aot.worker_pool(1) as pool:
            pool.submit(os._exit, 1).result(timeout=300)
