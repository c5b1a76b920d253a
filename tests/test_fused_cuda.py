"""The fused kernel compiled on a GPU (skipped without CUDA): the correctness part of
scripts/gpu_checks.py passes. That is the attention op at every stage shape of Focal-T and Focal-B
(fp32 with TF32 off, bf16) against SDPA and a float64 reference, output and every gradient, with
poisoned outputs; the bitwise-repeatable backward; a Focal-T training step, logits and every
gradient. Each of them ran the fused kernels.

    python -m pytest -q tests/test_fused_cuda.py      # scripts/gpu_checks.sh correctness prints the table
"""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from models.focal_attention.fused import triton_unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU'),
              pytest.mark.skipif(triton_unavailable_reason() is not None, reason=str(triton_unavailable_reason()))]


def test_gpu_correctness_checks_pass_on_the_fused_kernels(tmp_path):
    result = subprocess.run([sys.executable, 'scripts/gpu_checks.py', 'correctness', '--out', str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = json.load(open(tmp_path / 'gpu_checks.json'))
    assert len(rows) == 6 and all(r['verdict'] == 'PASS' and r['attention'] == 'fused' for r in rows), rows
