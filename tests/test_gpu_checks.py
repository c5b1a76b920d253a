"""scripts/gpu_checks.sh is run on a GPU machine in one short call, so its dry run on the CPU (tiny
models, the fused kernels under Triton's interpreter) goes through every part and row first: it
exits 0, prints the table last, writes it under $OUT, and each row names the attention that ran."""
import json
import os
import subprocess
import sys

import torch

from conftest import MICRO_FOCAL, REPO_ROOT
from models import FocalTransformer
from models.focal_attention import backends_in_use

ROWS_PER_PART = {'correctness': 6, 'speed': 12, 'compiled': 3, 'backbone': 3}


def fused_backend_here() -> str:
    """What a model asked for the fused backend runs in this environment (it falls back to SDPA
    where the kernels cannot run)."""
    model = FocalTransformer(**MICRO_FOCAL, attn_backend='fused').eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    return '+'.join(sorted(backends_in_use(model)))


def test_gpu_checks_dry_run_runs_every_row_and_says_what_ran(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, TRITON_INTERPRET='1')
    result = subprocess.run(['bash', 'scripts/gpu_checks.sh', 'all', '--dry-run'], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.load(open(tmp_path / 'gpu_checks.json'))
    assert {part: sum(r['part'] == part for r in rows) for part in ROWS_PER_PART} == ROWS_PER_PART
    assert all(r['verdict'] in ('PASS', 'met', 'missed', '-') for r in rows), rows

    fused = fused_backend_here()
    assert {r['asked'] for r in rows} == {'fused', 'sdpa', 'timm unfused', 'timm sdpa'}
    for row in rows:
        assert row['attention'] == (fused if row['asked'] == 'fused' else row['asked']), row

    table = (tmp_path / 'gpu_checks.md').read_text().strip().splitlines()[-len(rows) - 2:]
    assert result.stdout.strip().splitlines()[-len(table):] == table
