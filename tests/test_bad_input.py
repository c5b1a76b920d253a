"""Each kind of bad input gives one clear line on stderr and exit status 1 (no traceback)."""
import os
import shutil

import pytest
import timm
import torch

import main
from conftest import error_line, load_checkpoint, run_main, write_micro_config


def test_missing_data_path(tmp_path, capsys):
    cfg = write_micro_config(str(tmp_path))
    assert run_main(['--cfg', cfg, '--data-path', str(tmp_path / 'nowhere'),
                     '--output', str(tmp_path / 'out')]) == 1
    assert f"data path not found: {tmp_path / 'nowhere'}" in error_line(capsys)


def test_empty_data_path(tmp_path, capsys):
    (tmp_path / 'empty' / 'train' / 'some_class').mkdir(parents=True)
    (tmp_path / 'empty' / 'val').mkdir()
    cfg = write_micro_config(str(tmp_path))
    assert run_main(['--cfg', cfg, '--data-path', str(tmp_path / 'empty'),
                     '--output', str(tmp_path / 'out')]) == 1
    assert f"no images found in {tmp_path / 'empty'}" in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_device_without_a_gpu(tmp_path, capsys):
    cfg = write_micro_config(str(tmp_path))
    assert main.main(['--cfg', cfg, '--device', 'cuda', '--output', str(tmp_path / 'out')]) == 1
    assert 'needs CUDA device 0 but no CUDA device is visible' in error_line(capsys)


def test_unknown_config_key(tmp_path, capsys):
    cfg = write_micro_config(str(tmp_path), 'TRAIN:\n  LEARNING_RATE: 0.1\n')
    assert run_main(['--cfg', cfg, '--output', str(tmp_path / 'out')]) == 1
    assert 'unknown config key: TRAIN.LEARNING_RATE' in error_line(capsys)


def test_eval_without_checkpoint(tmp_path, capsys):
    cfg = write_micro_config(str(tmp_path))
    assert run_main(['--cfg', cfg, '--eval', '--output', str(tmp_path / 'out')]) == 1
    assert '--eval needs a checkpoint to evaluate: pass --resume CKPT' in error_line(capsys)


def test_missing_checkpoint(tmp_path, tiny_data, capsys):
    cfg = write_micro_config(str(tmp_path))
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--eval', '--resume',
                     str(tmp_path / 'nope.pth'), '--output', str(tmp_path / 'out')]) == 1
    assert f"checkpoint not found: {tmp_path / 'nope.pth'}" in error_line(capsys)


def test_checkpoint_of_another_architecture(tmp_path, tiny_data, capsys):
    resnet = timm.create_model('resnet10t', num_classes=10)
    path = str(tmp_path / 'resnet.pth')
    torch.save({'model': resnet.state_dict()}, path)
    cfg = write_micro_config(str(tmp_path))
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--eval', '--resume', path,
                     '--output', str(tmp_path / 'out')]) == 1
    line = error_line(capsys)
    assert f"checkpoint {path} does not fit this FocalTransformer" in line


def test_corrupt_image_is_skipped_with_its_name_and_not_counted(tmp_path, tiny_data, capsys):
    """Policy: an unreadable image is reported by path and skipped; training continues and the
    evaluation counts only the images it could read."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    broken = data / 'val' / 'circle' / 'broken.png'
    broken.write_bytes(b'not a png at all')
    cfg = write_micro_config(str(tmp_path))
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', cfg, '--data-path', str(data), '--output', output]) == 0
    captured = capsys.readouterr()
    assert f'warning: skipping unreadable image {broken}' in captured.err
    assert 'on the 30 test images' in captured.out


def test_non_finite_loss_stops_without_overwriting_last_good_checkpoint(tmp_path, tiny_data,
                                                                       monkeypatch, capsys):
    real_train_one_epoch = main.train_one_epoch

    def diverge_in_second_epoch(**kwargs):
        if kwargs['epoch'] == 1:
            kwargs['model'].register_forward_hook(lambda module, inputs, output: output * float('nan'))
        return real_train_one_epoch(**kwargs)

    monkeypatch.setattr(main, 'train_one_epoch', diverge_in_second_epoch)
    cfg = write_micro_config(str(tmp_path), 'TRAIN:\n  MAX_NONFINITE_STEPS: 3\n')
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', output,
                     '--epochs', '2']) == 1
    captured_err = capsys.readouterr()
    assert 'error: training diverged: 3 optimizer steps in a row had a non-finite loss' in \
        captured_err.err.strip().splitlines()[-1]
    assert captured_err.out.count('non-finite loss, optimizer step skipped') == 3
    run_dir = os.path.join(output, 'micro_focal', 'default')
    assert sorted(name for name in os.listdir(run_dir) if name.endswith('.pth')) == \
        ['best.pth', 'ckpt_epoch_0.pth']
    checkpoint = load_checkpoint(os.path.join(run_dir, 'ckpt_epoch_0.pth'))
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(value).all() for value in checkpoint['model'].values()
               if value.is_floating_point())


def test_a_bug_while_building_the_model_keeps_its_traceback(tmp_path, tiny_data, monkeypatch):
    """Only config problems are one-line errors; an exception from inside the model code is a
    bug and must reach the user with its traceback."""
    def broken_build(config):
        raise RuntimeError('a bug in the model code')

    monkeypatch.setattr(main, 'build_model', broken_build)
    cfg = write_micro_config(str(tmp_path))
    with pytest.raises(RuntimeError, match='a bug in the model code'):
        run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', str(tmp_path / 'out')])


def test_focal_architecture_mistake_is_a_config_error(tmp_path, capsys):
    cfg = write_micro_config(str(tmp_path), 'MODEL:\n  FOCAL:\n    NUM_HEADS: [1, 2, 4]\n')
    assert run_main(['--cfg', cfg, '--output', str(tmp_path / 'out')]) == 1
    assert 'MODEL.FOCAL.NUM_HEADS has 3 entries, one per stage' in error_line(capsys)


def test_timm_kwargs_the_model_lacks_are_a_config_error(tmp_path, tiny_data, capsys):
    cfg = write_micro_config(str(tmp_path), 'MODEL:\n  TYPE: timm\n  TIMM:\n    NAME: resnet10t\n'
                                            '    KWARGS:\n      no_such_arg: 3\n')
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', str(tmp_path / 'out')]) == 1
    assert "MODEL.TIMM.KWARGS do not fit timm model 'resnet10t'" in error_line(capsys)
