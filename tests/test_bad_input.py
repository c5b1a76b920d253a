"""Each kind of bad input gives one clear line on stderr and exit status 1 (no traceback)."""
import glob
import os
import shutil
import zipfile

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


def test_zip_map_naming_a_member_the_archive_lacks_stops_before_training(tmp_path, tiny_data, capsys):
    zipped = tmp_path / 'zipped'
    zipped.mkdir()
    for split in ('train', 'val'):
        with zipfile.ZipFile(zipped / f'{split}.zip', 'w') as archive, \
                open(zipped / f'{split}_map.txt', 'w') as map_file:
            for index, name in enumerate(sorted(os.listdir(os.path.join(tiny_data, split)))):
                for image in sorted(os.listdir(os.path.join(tiny_data, split, name))):
                    archive.write(os.path.join(tiny_data, split, name, image), f'{split}/{name}/{image}')
                    map_file.write(f'{name}/{image}\t{index}\n')  # without the archive's folder prefix
    cfg = write_micro_config(str(tmp_path))
    output = tmp_path / 'out'
    assert run_main(['--cfg', cfg, '--data-path', str(zipped), '--zip', '--output', str(output)]) == 1
    first_class = sorted(os.listdir(os.path.join(tiny_data, 'train')))[0]
    first = f"{first_class}/{sorted(os.listdir(os.path.join(tiny_data, 'train', first_class)))[0]}"
    assert error_line(capsys).startswith(
        f"error: {zipped / 'train_map.txt'}:1: {zipped / 'train.zip'} has no member '{first}' (and lacks 39 more "
        f"that the map names); the archive has 'train/{first}': make the map's member names those of the archive")
    assert not glob.glob(str(output / '**' / '*.pth'), recursive=True)


def test_config_that_includes_itself_is_one_error_line(tmp_path, capsys):
    cfg = tmp_path / 'loop.yaml'
    cfg.write_text("BASE: ['loop.yaml']\n")
    assert run_main(['--cfg', str(cfg), '--output', str(tmp_path / 'out')]) == 1
    assert f'config files include each other in a cycle through BASE: {cfg} -> {cfg}' in error_line(capsys)


@pytest.mark.parametrize('key, value', [('DATA.NUM_WORKERS', '-1'), ('MODEL.DROP_PATH_RATE', '1.5'),
                                        ('MODEL.DROP_RATE', '2.0'), ('TRAIN.BASE_LR', '-1.0')])
def test_value_out_of_range_stops_the_run_with_one_line_naming_the_key(tmp_path, tiny_data, capsys, key, value):
    cfg = write_micro_config(str(tmp_path))
    output = tmp_path / 'out'
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', str(output), '--opts', key, value]) == 1
    assert error_line(capsys).startswith(f'error: {key} must ')
    assert not output.exists()


def test_empty_config_logs_that_the_defaults_run(tmp_path, capsys):
    cfg = tmp_path / 'empty.yaml'
    cfg.write_text('')
    output = tmp_path / 'out'
    assert run_main(['--cfg', str(cfg), '--data-path', str(tmp_path / 'nowhere'), '--output', str(output)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].startswith('error: data path not found')
    with open(output / 'focal_tiny_patch4_window7_224' / 'default' / 'log_rank0.txt') as log:
        assert "WARNING config " + str(cfg) + ": values other than config.py's defaults: DATA.DATA_PATH" in log.read()
    assert 'The model and training recipe are all config.py\'s defaults: focal_tiny_patch4_window7_224 for 300 ' \
           'epochs' in captured.out
