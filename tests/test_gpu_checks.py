"""scripts/gpu_checks.sh runs on a GPU machine in the device tool's calls of at most 10 minutes each
(`DEVICE_CALLS`), so the dry run of that exact sequence on the CPU (tiny models, the fused kernels
under Triton's interpreter) goes through every part and row first: each call exits 0, prints its
table last and writes it under its own $OUT (the device empties $OUT before every call), each row
names the attention that ran, and the docs give the same calls and wheels. A run stopped part-way
keeps every row it finished."""
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch

from conftest import MICRO_FOCAL, REPO_ROOT
from models import FocalTransformer
from models.focal_attention import backends_in_use

sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))
import gpu_checks  # noqa: E402

ROWS_PER_PART = {'correctness': 6, 'speed': 14, 'compiled': 3, 'backbone': 3}


def fused_backend_here() -> str:
    """What a model asked for the fused backend runs in this environment (it falls back to SDPA
    where the kernels cannot run)."""
    model = FocalTransformer(**MICRO_FOCAL, attn_backend='fused').eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    return '+'.join(sorted(backends_in_use(model)))


def test_the_device_calls_run_every_part_once_and_the_docs_give_them_with_the_pinned_timm():
    assert sorted(part for call in gpu_checks.DEVICE_CALLS for part in call) == sorted(gpu_checks.PARTS)
    timm_pin = re.search(r'^timm==(\S+)$', open(os.path.join(REPO_ROOT, 'constraints.txt')).read(), re.M).group(1)
    for doc in ('docs/benchmarks.md', 'README.md'):
        text = open(os.path.join(REPO_ROOT, doc)).read()
        for parts in gpu_checks.DEVICE_CALLS:
            assert f'scripts/gpu_checks.sh {" ".join(parts)}`' in text, (doc, parts)
    assert f'timm=={timm_pin}' in open(os.path.join(REPO_ROOT, 'docs/benchmarks.md')).read()


@pytest.mark.slow
def test_dry_run_of_the_device_calls_runs_every_row_and_says_what_ran(tmp_path):
    rows = []
    for number, parts in enumerate(gpu_checks.DEVICE_CALLS, 1):
        out = tmp_path / f'call{number}'
        env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TRITON_INTERPRET='1')
        result = subprocess.run(['bash', 'scripts/gpu_checks.sh', *parts, '--dry-run'], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        written = json.load(open(out / 'gpu_checks.json'))
        assert {r['part'] for r in written} == set(parts)
        table = (out / 'gpu_checks.md').read_text().strip().splitlines()[-len(written) - 2:]
        assert result.stdout.strip().splitlines()[-len(table):] == table
        rows += written
    assert {part: sum(r['part'] == part for r in rows) for part in ROWS_PER_PART} == ROWS_PER_PART
    assert all(r['verdict'] in ('PASS', 'met', 'missed', '-') for r in rows), rows
    against_eager = [r for r in rows if r['target'] == '>= 1.0x eager']
    assert len(against_eager) == 2 and all(r['verdict'] in ('met', 'missed') for r in against_eager), \
        'the compiled part measures eager Focal-T itself in a call of its own'

    fused = fused_backend_here()
    assert {r['asked'] for r in rows} == {'fused', 'sdpa', 'timm unfused', 'timm sdpa'}
    for row in rows:
        assert row['attention'] == (fused if row['asked'] == 'fused' else row['asked']), row
        assert (f'(timm {timm.__version__})' in row['what']) == row['what'].startswith('Swin'), row


def test_a_run_stopped_after_a_row_keeps_that_row(tmp_path, monkeypatch):
    """A time-out kills the process between rows: the files hold every row finished before it."""
    measure = gpu_checks.benchmark.measure
    calls = []

    def measure_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # not an Exception: no row turns it into an ERROR row, as a kill
        return measure(*args, **kwargs)

    monkeypatch.setattr(gpu_checks.benchmark, 'measure', measure_then_stop)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # main() allows TF32 for its timings
    try:
        with pytest.raises(KeyboardInterrupt):
            gpu_checks.main(['backbone', '--dry-run', '--out', str(tmp_path)])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    rows = json.load(open(tmp_path / 'gpu_checks.json'))
    assert [r['what'].split()[0] for r in rows] == ['Swin-T']
    assert (tmp_path / 'gpu_checks.md').read_text().strip().splitlines()[-1].startswith('| backbone | Swin-T')
    assert '== backbone' in (tmp_path / 'gpu_checks.log').read_text()
