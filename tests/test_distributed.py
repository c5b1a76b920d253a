"""Two CPU processes (gloo) under torchrun, torch.distributed.launch and no launcher at all."""
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

import pytest
import torch

import main
from config import get_config
from data.images import folder_samples
from conftest import (REPO_ROOT, error_line, interrupted_at_epoch, launcher_env, read_metrics, run_main,
                      run_main_subprocess, write_micro_config, write_tiny_dataset)
from distributed import Launch, LaunchError, read_launch
from lr_scheduler import build_scheduler, scaled_learning_rates
from optimizer import build_optimizer


def run_by_hand(args_of_rank: List[List[str]], timeout: int = 180) -> Tuple[List[int], List[str]]:
    """main.py on the CPU in one process per entry of `args_of_rank`, started without a launcher's
    agent (as srun or a script of one's own starts them: RANK, WORLD_SIZE, LOCAL_RANK and
    MASTER_ADDR/PORT set by hand); returns their exit statuses and what they wrote on stderr."""
    port = str(free_port())
    with contextlib.ExitStack() as files:
        errors = [files.enter_context(tempfile.TemporaryFile('w+')) for _ in args_of_rank]
        processes = [
            subprocess.Popen(
                [sys.executable, 'main.py', *args, '--device', 'cpu'],
                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err,
                env=dict(launcher_env(), MASTER_ADDR='127.0.0.1', MASTER_PORT=port,
                         WORLD_SIZE=str(len(args_of_rank)), RANK=str(rank), LOCAL_RANK=str(rank)))
            for rank, (args, err) in enumerate(zip(args_of_rank, errors))]
        deadline = time.monotonic() + timeout
        try:
            returncodes = [process.wait(timeout=max(0.0, deadline - time.monotonic())) for process in processes]
        except subprocess.TimeoutExpired:
            returncodes = None
        finally:
            for process in processes:
                process.kill()
        said = []
        for err in errors:
            err.seek(0)
            said.append(err.read())
    if returncodes is None:
        pytest.fail(f'the processes did not all finish within {timeout} s; they wrote on stderr:\n'
                    + '\n'.join(f'[process {rank}] {text[-3000:]}' for rank, text in enumerate(said)))
    return returncodes, said


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """Tiny data (40 training images) twice: `data` with a val/ of one image, so that one of
    two processes has no validation image at all, and `data_17`, whose val/ of 17 images gives
    shards of 9 and 8 images, two batches of 8 in one process and one in the other (and whose
    padding would count one image twice); a micro config of 3 epochs, 1 of warm-up."""
    root = tmp_path_factory.mktemp('dist')
    data = write_tiny_dataset(str(root / 'data'))
    data_17 = root / 'data_17'
    data_17.mkdir()
    os.symlink(os.path.join(data, 'train'), data_17 / 'train')
    val = os.path.join(data, 'val')
    images = sorted((name, image) for name in os.listdir(val) for image in os.listdir(os.path.join(val, name)))
    for index, (name, image) in enumerate(images):
        if index < 17:
            os.makedirs(data_17 / 'val' / name, exist_ok=True)
            shutil.copy(os.path.join(val, name, image), data_17 / 'val' / name)
        if index > 0:
            os.remove(os.path.join(val, name, image))
    for name in os.listdir(val):
        if not os.listdir(os.path.join(val, name)):
            os.rmdir(os.path.join(val, name))
    cfg = write_micro_config(str(root), 'TRAIN:\n  EPOCHS: 3\n  WARMUP_EPOCHS: 1\n')
    return dict(root=root, data=data, data_17=str(data_17), cfg=cfg)


@pytest.fixture(scope='module')
def torchrun_training(workspace):
    """Epoch 0 in one process (stopped before epoch 1), then epochs 1 and 2 resumed under
    torchrun in two processes, each of which validates on its shard of one image."""
    output = str(workspace['root'] / 'out')
    args = ['--cfg', workspace['cfg'], '--data-path', workspace['data'], '--output', output]
    with interrupted_at_epoch(1):
        run_main(args)
    result = run_main_subprocess(['torch.distributed.run', '--standalone', '--nproc_per_node', '2'], args)
    return result, os.path.join(output, 'micro_focal', 'default')


@pytest.mark.slow
def test_two_process_torchrun_training(workspace, torchrun_training):
    """Also: a process without validation images takes part in the evaluation, and going from
    one process to two after epoch 0 continues the schedule of the new total batch (no second
    warm-up), as the log says."""
    result, run_dir = torchrun_training
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'process 0/2' in result.stdout
    assert 'total batch changed from 8 to 16 images per optimizer step (2 processes' in result.stdout
    assert os.path.exists(os.path.join(run_dir, 'log_rank1.txt'))
    assert os.path.exists(os.path.join(run_dir, 'ckpt_epoch_2.pth'))
    metrics = read_metrics(run_dir)
    assert [m['epoch'] for m in metrics] == [0, 1, 2] and metrics[-1]['num_images'] == 1
    config = get_config(main.parse_args(['--cfg', workspace['cfg']]))
    rates = scaled_learning_rates(config, total_batch=16)
    schedule = build_scheduler(config, build_optimizer(config, torch.nn.Linear(1, 1), rates.base),
                               steps_per_epoch=2, rates=rates)  # 20 images per process, batch 8
    schedule.step_update(num_updates=4)
    assert metrics[1]['lr'] == pytest.approx(schedule.optimizer.param_groups[0]['lr'], rel=1e-6)


@pytest.mark.slow
def test_two_process_eval_counts_each_image_once(workspace, torchrun_training, tmp_path):
    """`torch.distributed.launch` (which passes --local-rank) evaluates the checkpoint over two
    processes with exactly the single-process result, although one process has a batch more
    than the other."""
    _, run_dir = torchrun_training
    checkpoint = os.path.join(run_dir, 'ckpt_epoch_2.pth')
    common = ['--cfg', workspace['cfg'], '--data-path', workspace['data_17'], '--eval',
              '--resume', checkpoint]
    assert run_main(common + ['--output', str(tmp_path / 'single')]) == 0
    single = read_metrics(str(tmp_path / 'single' / 'micro_focal' / 'default'))[-1]

    result = run_main_subprocess(
        ['torch.distributed.launch', '--nproc_per_node', '2', '--master_port', str(free_port())],
        common + ['--output', str(tmp_path / 'double')])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    double = read_metrics(str(tmp_path / 'double' / 'micro_focal' / 'default'))[-1]
    assert single['num_images'] == double['num_images'] == 17
    assert double['acc1'] == pytest.approx(single['acc1'])
    assert double['loss'] == pytest.approx(single['loss'], rel=1e-4)


@pytest.mark.slow
def test_two_process_throughput_with_a_single_validation_image(workspace, tmp_path):
    """Each process measures the batch asked for, the one image repeated, although one of the
    two validation shards is empty."""
    result = run_main_subprocess(
        ['torch.distributed.run', '--standalone', '--nproc_per_node', '2'],
        ['--cfg', workspace['cfg'], '--data-path', workspace['data'], '--output', str(tmp_path),
         '--throughput'])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = read_metrics(str(tmp_path / 'micro_focal' / 'default'))[-1]
    assert (record['batch_size'], record['distinct_images'], record['processes']) == (8, 1, 2)


@pytest.mark.slow
def test_a_process_without_a_training_batch_stops_the_others_at_once(workspace, tmp_path):
    """Every image of the first training batch of process 1 is unreadable, so process 1 stops
    with an error while process 0 waits for it in DDP's first forward. Started without a
    launcher's agent (as srun or a script of one's own starts them), process 0 says which
    process failed and why, and exits too, within seconds instead of at the process group's
    30-minute timeout."""
    data = shutil.copytree(workspace['data'], tmp_path / 'data')
    samples, _ = folder_samples(str(data / 'train'))
    sampler = torch.utils.data.DistributedSampler(range(len(samples)), num_replicas=2, rank=1,
                                                  shuffle=True, seed=0)  # SEED 0, epoch 0
    for index in list(sampler)[:8]:  # its first batch
        with open(samples[index][0], 'wb') as f:
            f.write(b'not an image')
    args = ['--cfg', workspace['cfg'], '--data-path', str(data), '--output', str(tmp_path / 'out')]
    returncodes, errors = run_by_hand([args, args])
    assert returncodes == [1, 1], errors
    assert 'Traceback' not in errors[0] + errors[1], errors
    last_lines = [err.strip().splitlines()[-1] for err in errors]
    assert last_lines[1].startswith('error: every image of a training batch is unreadable'), errors
    assert last_lines[0] == f'error: process 1 of 2 stopped, so process 0 stops too. Its error: ' \
                            f'{last_lines[1][len("error: "):]}'
    assert not os.path.exists(tmp_path / 'out' / 'micro_focal' / 'default' / 'ckpt_epoch_0.pth')


@pytest.mark.slow
def test_processes_whose_data_name_other_classes_stop_before_training(workspace, tmp_path):
    """Process 1's train/ holds as many classes as process 0's, one under another name, so an
    index would mean another class in each: both stop with one line naming the first
    difference, before training."""
    renamed = tmp_path / 'renamed'
    for split in ('train', 'val'):
        (renamed / split).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(workspace['data'], split))):
            os.symlink(os.path.join(workspace['data'], split, name),
                       renamed / split / ('disc' if name == 'circle' else name))
    output = str(tmp_path / 'out')
    returncodes, errors = run_by_hand(
        [['--cfg', workspace['cfg'], '--data-path', data, '--output', output]
         for data in (workspace['data'], str(renamed))])
    assert returncodes == [1, 1], errors
    assert 'Traceback' not in errors[0] + errors[1], errors
    for err in errors:
        assert "error: " in err and "the 2 processes of this job disagree on the class names: entry 1 is " \
            "'circle' in process 0 but 'cross' in process 1 (process 1 differs from process 0)" in \
            err.strip().splitlines()[-1], errors
    assert not os.path.exists(os.path.join(output, 'micro_focal', 'default', 'metrics.jsonl'))


@pytest.mark.parametrize('environ, local_rank_arg, message', [
    ({'RANK': '1'}, None, 'RANK=1 is set but WORLD_SIZE is not'),
    ({}, 1, '--local-rank 1 is set but WORLD_SIZE is not'),
    ({'WORLD_SIZE': '2'}, None, 'WORLD_SIZE=2 is set but RANK is not'),
    ({'WORLD_SIZE': 'two', 'RANK': '0'}, None, "WORLD_SIZE='two' is not an integer"),
    ({'WORLD_SIZE': '0', 'RANK': '0'}, None, 'WORLD_SIZE=0 is out of range: it must be at least 1'),
    ({'WORLD_SIZE': '2', 'RANK': '5'}, None, 'RANK=5 is out of range for WORLD_SIZE=2: ranks are 0 to 1'),
    ({'WORLD_SIZE': '4', 'RANK': '3', 'LOCAL_RANK': '2', 'LOCAL_WORLD_SIZE': '2'}, None,
     'LOCAL_RANK=2 is out of range for LOCAL_WORLD_SIZE=2: local ranks are 0 to 1'),
    ({'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '1'}, None, 'LOCAL_RANK=1 is out of range for RANK=0'),
    ({'WORLD_SIZE': '2', 'RANK': '1'}, None, "WORLD_SIZE=2 needs MASTER_ADDR, the address of process 0's machine"),
    ({'WORLD_SIZE': '2', 'RANK': '1', 'MASTER_ADDR': 'node0'}, None, 'WORLD_SIZE=2 needs MASTER_PORT'),
    ({'WORLD_SIZE': '2', 'RANK': '1', 'MASTER_ADDR': 'node0', 'MASTER_PORT': '70000'}, None,
     'MASTER_PORT=70000 is out of range: ports are 1 to 65535'),
])
def test_launcher_variables_that_do_not_form_a_job_name_what_is_wrong(environ, local_rank_arg, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        read_launch(environ, local_rank_arg)


def test_launcher_variables_that_form_a_job_place_the_process():
    assert read_launch({}) == read_launch({'WORLD_SIZE': '1'}) == Launch(0, 1, 0, None)
    assert read_launch({'RANK': '0', 'WORLD_SIZE': '1'}, local_rank_arg=0) == Launch(0, 1, 0, None)
    torchrun = {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '2',
                'MASTER_ADDR': 'node0', 'MASTER_PORT': '29500'}
    assert read_launch(torchrun, local_rank_arg=0) == Launch(3, 4, 1, ('node0', 29500)), "LOCAL_RANK wins"


def test_a_rank_without_world_size_stops_eval_with_one_line_before_reading_anything(
        workspace, tmp_path, monkeypatch, capsys):
    """It used to evaluate as a process that is not the main one: no output, no record, and
    one image of two skipped."""
    for name in ('WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('RANK', '1')
    assert run_main(['--cfg', workspace['cfg'], '--data-path', workspace['data'], '--eval',
                     '--resume', 'any.pth', '--output', str(tmp_path)]) == 1
    assert 'RANK=1 is set but WORLD_SIZE is not' in error_line(capsys)


@pytest.mark.slow
def test_a_process_waiting_for_a_job_that_is_not_there_says_so_within_seconds(tmp_path):
    """Process 1 of 2 whose process 0 never starts: within seconds, one line says what it waits
    for and where (instead of the process group's 30-minute timeout in silence)."""
    port = free_port()
    env = dict(launcher_env(), WORLD_SIZE='2', RANK='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    with tempfile.TemporaryFile('w+') as err:
        process = subprocess.Popen(
            [sys.executable, '-c', 'import distributed; distributed.init_distributed(None, "cpu")'],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
                err.seek(0)
                said = err.read()
                if 'waiting' in said:
                    break
        finally:
            process.kill()
            process.wait()
    assert f'warning: process 1 of 2 is waiting for the other processes of its job at 127.0.0.1:{port}' in said, said
    assert 'Traceback' not in said


@pytest.mark.slow
def test_launched_processes_keep_the_given_pythonpath(monkeypatch, tmp_path):
    """Where packages come through PYTHONPATH, launched processes still find them (and the
    repository's modules)."""
    (tmp_path / 'only_on_given_path.py').write_text('')
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    result = subprocess.run([sys.executable, '-c', 'import only_on_given_path, config'], cwd=os.sep,
                            env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def train_with_a_non_finite_loss_in_process_1(rank: int, store: str, results: str) -> None:
    """Process `rank` of 2 (gloo, through the file `store`) trains a DDP-wrapped linear classifier
    for 3 steps, twice: in fp32 with 2 accumulated micro-batches and clipping, then in fp16 with a
    grad scaler. Process 1's loss is NaN in the first micro-batch of step 1 (an inner one, under
    no_sync). Saves to `results`.<rank> each run's weights after every step and its warnings."""
    import logging

    import torch.distributed as dist

    from engine import NonFiniteGuard, StepSettings, train_one_epoch

    class Recorder(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    class WeightsAtEachStep:
        def step_update(self, num_updates):
            weights.append(model.weight.detach().clone())

    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    logger = logging.getLogger(f'nonfinite{rank}')
    logger.addHandler(Recorder())
    runs = {}
    for name, accumulation, amp_dtype in (('fp32', 2, None), ('fp16', 1, torch.float16)):
        torch.manual_seed(0)
        model = torch.nn.Linear(12, 3)
        forward_calls, weights, warnings = [], [], []

        def nan_in_step_1(module, inputs, output):
            forward_calls.append(True)
            return output * float('nan') if rank == 1 and len(forward_calls) == accumulation + 1 else output

        model.register_forward_hook(nan_in_step_1)
        generator = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(4, 12, generator=generator), torch.randint(0, 3, (4,), generator=generator))
                   for _ in range(3 * accumulation)]
        train_one_epoch(
            model=torch.nn.parallel.DistributedDataParallel(model), criterion=torch.nn.CrossEntropyLoss(),
            loader=batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            scheduler=WeightsAtEachStep(), scaler=torch.amp.GradScaler('cpu') if amp_dtype else None,
            epoch=0, num_epochs=1, steps_per_epoch=3,
            settings=StepSettings(accumulation_steps=accumulation, clip_grad=1.0, amp_dtype=amp_dtype),
            guard=NonFiniteGuard(3, logger), device=torch.device('cpu'), logger=logger)
        runs[name] = {'weights': weights, 'warnings': [w for w in warnings if 'non-finite' in w]}
    torch.save(runs, f'{results}.{rank}')
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_non_finite_loss_in_one_process_skips_the_step_in_every_process(tmp_path):
    """The step is skipped in both processes alike and counts in both (in fp32 process 0 sees a
    non-finite gradient norm; with a grad scaler, which skips overflowing steps uncounted, it counts
    process 1's non-finite loss), and the next step is taken with the same weights in both."""
    results = str(tmp_path / 'results')
    context = torch.multiprocessing.spawn(train_with_a_non_finite_loss_in_process_1, nprocs=2, join=False,
                                          args=(str(tmp_path / 'store'), results))
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail('the two processes did not finish within 180 s (a collective call unmatched?)')
    runs = [torch.load(f'{results}.{rank}', weights_only=True) for rank in range(2)]
    for name, seen_by_process_0 in (('fp32', 'gradient norm'), ('fp16', 'loss')):
        weights = [run[name]['weights'] for run in runs]
        for step in range(3):
            torch.testing.assert_close(weights[0][step], weights[1][step], rtol=0, atol=0)
        assert torch.equal(weights[0][1], weights[0][0]), f"{name}: step 1 skipped"
        assert not torch.equal(weights[0][2], weights[0][1]), f"{name}: step 2 taken"
        assert [len(run[name]['warnings']) for run in runs] == [1, 1], runs
        assert f'step 1: non-finite {seen_by_process_0}, optimizer step skipped' in runs[0][name]['warnings'][0]
        assert 'step 1: non-finite loss, optimizer step skipped' in runs[1][name]['warnings'][0]
