"""Resuming never rolls a run folder back: best.pth only ever holds the best epoch, lost or
damaged checkpoints are skipped (named) for the newest usable state, the schedule follows the
config in force, and evaluation keeps its config record apart from the training run's.

Most tests copy one two-epoch run whose evaluations are scripted (Acc@1 40 then 50, so that
epoch 1 is the best) and rerun it; a rerun trains at most two short epochs."""
import math
import os
import shutil

import pytest
import torch

import main
from conftest import error_line, interrupted_at_epoch, load_checkpoint, read_metrics, run_main, write_micro_config
from engine import EvalResult

RUN_DIR = os.path.join('out', 'micro_focal', 'default')


class ScriptedEvaluation:
    """Stands in for `main.evaluate`: the next accuracy of `accuracies` (the last one
    repeats), without running the model."""

    def __init__(self, *accuracies: float) -> None:
        self.accuracies = list(accuracies)

    def __call__(self, *args, **kwargs) -> EvalResult:
        acc1 = self.accuracies.pop(0) if len(self.accuracies) > 1 else self.accuracies[0]
        return EvalResult(acc1=acc1, acc5=acc1, loss=1.0, num_images=30)


def read_log(run_dir) -> str:
    with open(os.path.join(run_dir, 'log_rank0.txt')) as f:
        return f.read()


@pytest.fixture(scope='module')
def scripted_run(tmp_path_factory, tiny_data) -> str:
    """A finished two-epoch run (batch 8: five steps per epoch) whose epoch 1 is the best:
    ckpt_epoch_0.pth, ckpt_epoch_1.pth and best.pth (epoch 1). Returns its root folder."""
    root = tmp_path_factory.mktemp('scripted')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main, 'evaluate', ScriptedEvaluation(40.0, 50.0))
        assert run_main(rerun_args(str(root), tiny_data, '--epochs', '2')) == 0
    return str(root)


def rerun_args(root: str, data: str, *extra: str) -> list:
    return ['--cfg', write_micro_config(root), '--data-path', data, '--output',
            os.path.join(root, 'out'), *extra]


def copy_of(scripted_run: str, tmp_path) -> str:
    """A copy of the scripted run's root; returns the copy's run folder."""
    shutil.copytree(os.path.join(scripted_run, 'out'), tmp_path / 'out')
    return str(tmp_path / RUN_DIR)


def test_stale_best_pth_after_a_kill_is_rewritten_from_the_best_epochs_checkpoint(
        scripted_run, tiny_data, tmp_path):
    """Killed while saving best.pth in the last epoch: best.pth still holds epoch 0 (and a
    partial file lies beside it). The rerun, with nothing left to train, rewrites it."""
    run_dir = copy_of(scripted_run, tmp_path)
    shutil.copyfile(os.path.join(run_dir, 'ckpt_epoch_0.pth'), os.path.join(run_dir, 'best.pth'))
    with open(os.path.join(run_dir, 'best.pth.tmp.4242'), 'wb') as f:
        f.write(b'PK\x03\x04 partial')
    assert run_main(rerun_args(str(tmp_path), tiny_data, '--epochs', '2')) == 0
    best = load_checkpoint(os.path.join(run_dir, 'best.pth'))
    assert (best['epoch'], best['max_accuracy']) == (1, 50.0)
    log = read_log(run_dir)
    assert 'best.pth holds epoch 0 (Acc@1 40.00%), not the best so far (epoch 1, Acc@1 50.00%): ' \
           'rewrote it from' in log
    assert 'best Acc@1 so far 50.00%' in log


def test_lost_epoch_checkpoints_resume_from_best_pth_and_never_replace_it_by_a_worse_model(
        scripted_run, tiny_data, tmp_path, monkeypatch, capsys):
    """Every ckpt_epoch_*.pth deleted or truncated: best.pth, a full training state, is the
    newest one left. With best.pth unreadable too, nothing is touched and the run stops."""
    run_dir = copy_of(scripted_run, tmp_path)
    os.remove(os.path.join(run_dir, 'ckpt_epoch_0.pth'))
    for name in ('ckpt_epoch_1.pth', 'best.pth'):
        os.rename(os.path.join(run_dir, name), os.path.join(run_dir, name + '.whole'))
        with open(os.path.join(run_dir, name + '.whole'), 'rb') as whole, \
                open(os.path.join(run_dir, name), 'wb') as truncated:
            truncated.write(whole.read(5000))
    metrics_before = read_metrics(run_dir)
    monkeypatch.setattr(main, 'evaluate', ScriptedEvaluation(45.0))
    args = rerun_args(str(tmp_path), tiny_data, '--epochs', '3')

    assert run_main(args) == 1
    line = error_line(capsys)
    assert f'run folder {run_dir} holds an earlier run (ckpt_epoch_1.pth, best.pth, metrics.jsonl ' \
           f'records up to epoch 1) that this run would start over' in line
    assert read_metrics(run_dir) == metrics_before

    os.replace(os.path.join(run_dir, 'best.pth.whole'), os.path.join(run_dir, 'best.pth'))
    assert run_main(args) == 0
    assert f"resumed from {os.path.join(run_dir, 'best.pth')}: continuing at epoch 2" in read_log(run_dir)
    metrics = read_metrics(run_dir)
    assert metrics[:2] == metrics_before and [m['epoch'] for m in metrics] == [0, 1, 2]
    best = load_checkpoint(os.path.join(run_dir, 'best.pth'))
    assert (best['epoch'], best['max_accuracy']) == (1, 50.0), "epoch 2 (Acc@1 45) is worse"


def test_damaged_newest_checkpoint_is_skipped_naming_its_non_finite_tensors(
        scripted_run, tiny_data, tmp_path):
    """NaN in the optimizer state of the newest checkpoint (damaged on disk: training never
    saves one) is named when read, and the file skipped for the newest usable state, here
    best.pth of the same epoch (before, every rerun trained from it and stopped with 'training
    diverged')."""
    run_dir = copy_of(scripted_run, tmp_path)
    path = os.path.join(run_dir, 'ckpt_epoch_1.pth')
    damaged = load_checkpoint(path)
    damaged['optimizer']['state'][0]['exp_avg'][0] = float('nan')
    torch.save(damaged, path)
    assert run_main(rerun_args(str(tmp_path), tiny_data, '--epochs', '2')) == 0
    log = read_log(run_dir)
    assert f'skipping checkpoint {path} is damaged: 1 of its tensors hold NaN or infinite values ' \
           f'(e.g. optimizer.state.0.exp_avg)' in log
    assert f"resumed from {os.path.join(run_dir, 'best.pth')}: continuing at epoch 2" in log


def test_eval_of_a_checkpoint_with_nan_weights_is_an_error(scripted_run, tiny_data, tmp_path,
                                                           capsys):
    weights = load_checkpoint(os.path.join(scripted_run, RUN_DIR, 'ckpt_epoch_1.pth'))['model']
    weights['head.weight'][0, 0] = float('nan')
    path = str(tmp_path / 'nan.pth')
    torch.save({'model': weights}, path)
    assert run_main(rerun_args(str(tmp_path), tiny_data, '--eval', '--resume', path)) == 1
    assert f'checkpoint {path} is damaged: 1 of its tensors hold NaN or infinite values ' \
           f'(e.g. model.head.weight)' in error_line(capsys)


def test_resume_follows_the_schedule_of_the_config_in_force(scripted_run, tiny_data, tmp_path,
                                                            monkeypatch):
    """Resumed after two epochs at batch 8 with --batch-size 4 and TRAIN.EPOCHS 4: the rates are
    scaled to the new total batch and the cosine spans the new 4 epochs of 10 steps, with the
    optimizer's state carried on; the log says what changed."""
    run_dir = copy_of(scripted_run, tmp_path)
    monkeypatch.setattr(main, 'evaluate', ScriptedEvaluation(45.0))
    with interrupted_at_epoch(3):
        run_main(rerun_args(str(tmp_path), tiny_data, '--epochs', '4', '--batch-size', '4'))
    base, minimum = 1e-3 * 4 / 512, 5e-6 * 4 / 512
    after_epoch_2 = minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * 30 / 40))
    epoch_2 = [m for m in read_metrics(run_dir) if m['epoch'] == 2]
    assert len(epoch_2) == 1 and epoch_2[0]['lr'] == pytest.approx(after_epoch_2, rel=1e-6)
    optimizer = load_checkpoint(os.path.join(run_dir, 'ckpt_epoch_2.pth'))['optimizer']
    assert optimizer['state'][0]['step'] == 2 * 5 + 10, "optimizer state resumed"
    log = read_log(run_dir)
    assert 'config changed since' in log and 'DATA.BATCH_SIZE 8 -> 4' in log
    assert 'total batch changed from 8 to 4 images per optimizer step' in log
    assert 'TRAIN.EPOCHS changed from 2 to 4: the schedule now spans 4 epochs' in log


def test_eval_and_a_failed_resume_leave_the_training_runs_config_yaml_alone(
        scripted_run, tiny_data, tmp_path, capsys):
    """--eval on the training run's own tag writes its own record (eval_config.yaml); a resume
    that fails (another architecture) writes none."""
    run_dir = copy_of(scripted_run, tmp_path)
    with open(os.path.join(run_dir, 'config.yaml')) as f:
        training_config = f.read()
    checkpoint = os.path.join(run_dir, 'ckpt_epoch_1.pth')
    assert run_main(rerun_args(str(tmp_path), tiny_data, '--eval', '--resume', checkpoint,
                               '--batch-size', '4')) == 0
    with open(os.path.join(run_dir, 'eval_config.yaml')) as f:
        eval_config = f.read()
    assert 'EVAL_MODE: true' in eval_config and 'BATCH_SIZE: 4' in eval_config
    assert run_main(rerun_args(str(tmp_path), tiny_data, '--epochs', '3',
                               '--opts', 'MODEL.FOCAL.EMBED_DIM', '32')) == 1
    assert 'does not fit' in error_line(capsys)
    with open(os.path.join(run_dir, 'config.yaml')) as f:
        assert f.read() == training_config
