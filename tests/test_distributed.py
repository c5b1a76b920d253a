"""Two CPU processes (gloo) under torchrun and torch.distributed.launch."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import launcher_env, run_main, run_main_subprocess, write_micro_config, write_tiny_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """Tiny data with 29 validation images (shards of 15 and 14: padding would count one
    image twice) and a micro config."""
    root = tmp_path_factory.mktemp('dist')
    data = write_tiny_dataset(str(root / 'data'))
    os.remove(os.path.join(data, 'val', 'circle', 'circle_00000.png'))
    return dict(root=root, data=data, cfg=write_micro_config(str(root)))


def last_metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return json.loads(f.readlines()[-1])


@pytest.fixture(scope='module')
def torchrun_training(workspace):
    output = str(workspace['root'] / 'out')
    result = run_main_subprocess(
        ['torch.distributed.run', '--standalone', '--nproc_per_node', '2'],
        ['--cfg', workspace['cfg'], '--data-path', workspace['data'], '--output', output])
    return result, os.path.join(output, 'micro_focal', 'default')


def test_two_process_torchrun_training(torchrun_training):
    result, run_dir = torchrun_training
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'process 0/2' in result.stdout
    assert os.path.exists(os.path.join(run_dir, 'log_rank1.txt'))
    assert os.path.exists(os.path.join(run_dir, 'ckpt_epoch_0.pth'))
    metrics = last_metrics(run_dir)
    assert metrics['num_images'] == 29


def test_two_process_eval_counts_each_image_once(workspace, torchrun_training, tmp_path):
    """`torch.distributed.launch` (which passes --local-rank) evaluates the checkpoint over two
    processes with exactly the single-process result."""
    _, run_dir = torchrun_training
    checkpoint = os.path.join(run_dir, 'ckpt_epoch_0.pth')
    common = ['--cfg', workspace['cfg'], '--data-path', workspace['data'], '--eval',
              '--resume', checkpoint]
    assert run_main(common + ['--output', str(tmp_path / 'single')]) == 0
    single = last_metrics(str(tmp_path / 'single' / 'micro_focal' / 'default'))

    result = run_main_subprocess(
        ['torch.distributed.launch', '--nproc_per_node', '2', '--master_port', str(free_port())],
        common + ['--output', str(tmp_path / 'double')])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    double = last_metrics(str(tmp_path / 'double' / 'micro_focal' / 'default'))
    assert single['num_images'] == double['num_images'] == 29
    assert double['acc1'] == pytest.approx(single['acc1'])
    assert double['loss'] == pytest.approx(single['loss'], rel=1e-4)


def test_launched_processes_keep_the_given_pythonpath(monkeypatch, tmp_path):
    """Where packages come through PYTHONPATH, launched processes still find them (and the
    repository's modules)."""
    (tmp_path / 'only_on_given_path.py').write_text('')
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    result = subprocess.run([sys.executable, '-c', 'import only_on_given_path, config'], cwd=os.sep,
                            env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
