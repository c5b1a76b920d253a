"""Test-session set-up shared by every test file."""
import os

import torch

# Without a GPU, Triton kernels (the fused focal attention) run under Triton's CPU interpreter. The
# variable must be set before the kernels are defined, i.e. before `models` is imported.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
