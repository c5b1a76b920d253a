"""Whether the fused attention's Triton kernels run compiled (on a CUDA GPU) or under Triton's CPU
interpreter: the one place that sets TRITON_INTERPRET.

Triton reads the variable when a kernel is defined (`triton.jit`, which runs when `models` is
imported), so a program decides before it imports `models`: the tests and `scripts/gpu_checks.py`
call `use_interpreter_without_cuda` first. `models/focal_attention/fused.py` reads the variable to
know whether CPU inputs can run the kernels (slowly: for tests and dry runs, never for 'auto'), and
the kernel compile tooling (`scripts/kernel_aot.py`) switches it for its own processes with
`interpreter`.
"""
import contextlib
import os
from typing import Iterator

import torch

VARIABLE = 'TRITON_INTERPRET'


def use_interpreter_without_cuda(dry_run: bool = False) -> None:
    """Before `import models`: interpret the kernels where they get CPU inputs, that is without a
    CUDA device or for a dry run (which runs on the CPU by design). A TRITON_INTERPRET already set
    (the user's choice) stays."""
    if dry_run or not torch.cuda.is_available():
        os.environ.setdefault(VARIABLE, '1')


@contextlib.contextmanager
def interpreter(on: bool) -> Iterator[None]:
    """TRITON_INTERPRET=1 (on) or unset (off) inside the block, as it was afterwards: kernels defined
    there, as in processes started there, are interpreted or compilable accordingly."""
    saved = os.environ.pop(VARIABLE, None)
    if on:
        os.environ[VARIABLE] = '1'
    try:
        yield
    finally:
        os.environ.pop(VARIABLE, None)
        if saved is not None:
            os.environ[VARIABLE] = saved
