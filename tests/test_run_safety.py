"""Runs a user can trust: one class list for train and val, no diverged or partial checkpoint,
nothing lost on a full disk, a kill or a second run in the same folder, exact resumption with
data-loading workers, and one clear line for foreign files and sizes that cannot work."""
import errno
import glob
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoint
import main
import run_outputs
from conftest import (REPO_ROOT, error_line, interrupted_at_epoch, load_checkpoint, read_metrics, run_main,
                      write_micro_config)
from config import get_config
from data.build import build_loader, build_transform
from data.images import ImageDataset
from engine import EvalResult
from run_outputs import RunOutputs


def checkpoints(run_dir: str) -> list:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, '*.pth*')))


def linked_copy(tiny_data: str, root, drop_val: tuple = ()) -> str:
    """A dataset whose class folders link to those of `tiny_data` (val without `drop_val`)."""
    for split in ('train', 'val'):
        (root / split).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(tiny_data, split))):
            if not (split == 'val' and name in drop_val):
                os.symlink(os.path.join(tiny_data, split, name), root / split / name)
    return str(root)


def run_args(tmp_path, data: str, *extra: str) -> list:
    return ['--cfg', write_micro_config(str(tmp_path)), '--data-path', data,
            '--output', str(tmp_path / 'out'), *extra]


RUN_DIR = os.path.join('out', 'micro_focal', 'default')


# 1. One class list ---------------------------------------------------------------------------

def test_empty_training_class_folder_is_an_error_before_training(tmp_path, tiny_data, capsys):
    data = linked_copy(tiny_data, tmp_path / 'data')
    os.mkdir(os.path.join(data, 'train', 'b0_empty'))
    assert run_main(run_args(tmp_path, data)) == 1
    assert f"no images found in {os.path.join(data, 'train', 'b0_empty')}" in error_line(capsys)
    assert not os.path.exists(tmp_path / RUN_DIR / 'metrics.jsonl')


def test_validation_class_unknown_to_training_is_an_error_before_training(tmp_path, tiny_data,
                                                                          capsys):
    data = linked_copy(tiny_data, tmp_path / 'data')
    os.symlink(os.path.join(tiny_data, 'val', 'circle'), os.path.join(data, 'val', 'zebra'))
    assert run_main(run_args(tmp_path, data)) == 1
    assert 'has class folders that the training classes lack: zebra' in error_line(capsys)
    assert not os.path.exists(tmp_path / RUN_DIR / 'metrics.jsonl')


def test_validation_folders_map_onto_training_class_indices(tmp_path, tiny_data):
    """val/ without the first class keeps every other class at its training index."""
    data = linked_copy(tiny_data, tmp_path / 'data', drop_val=('checkerboard',))
    config = get_config(main.parse_args(run_args(tmp_path, data)))
    loaders = build_loader(config)
    train_index = {name: i for i, name in enumerate(loaders.dataset_train.classes)}
    assert loaders.classes == loaders.dataset_train.classes and len(loaders.classes) == 10
    for path, target in loaders.dataset_val.samples:
        assert target == train_index[os.path.basename(os.path.dirname(path))], path


def test_eval_of_a_head_for_another_class_count_is_an_error(tmp_path, tiny_data, trained_run,
                                                            capsys):
    """A released-style checkpoint (no class list) with a 10-class head on a 5-class val/."""
    released = str(tmp_path / 'released.pth')
    torch.save({'model': load_checkpoint(trained_run['checkpoint'])['model']}, released)
    data = linked_copy(tiny_data, tmp_path / 'data',
                       drop_val=tuple(sorted(os.listdir(os.path.join(tiny_data, 'val')))[5:]))
    assert run_main(run_args(tmp_path, data, '--eval', '--resume', released)) == 1
    assert 'has a head for 10 classes but the validation data has 5' in error_line(capsys)


def test_eval_maps_validation_folders_onto_the_checkpoint_classes(tmp_path, tiny_data,
                                                                  trained_run, capsys):
    """Our checkpoints keep their class list: half the val/ folders evaluate with the trained
    head, each image counted with its class's training index."""
    data = linked_copy(tiny_data, tmp_path / 'data',
                       drop_val=tuple(sorted(os.listdir(os.path.join(tiny_data, 'val')))[::2]))
    assert run_main(run_args(tmp_path, data, '--eval', '--resume', trained_run['checkpoint'])) == 0
    [record] = read_metrics(str(tmp_path / RUN_DIR))
    assert record['num_images'] == 15
    # The whole val/ is the disjoint union of the two halves: the halves' correct counts add up.
    other = linked_copy(tiny_data, tmp_path / 'other',
                        drop_val=tuple(sorted(os.listdir(os.path.join(tiny_data, 'val')))[1::2]))
    assert run_main(run_args(tmp_path, other, '--eval', '--resume', trained_run['checkpoint'],
                             '--tag', 'other')) == 0
    [other_record] = read_metrics(str(tmp_path / 'out' / 'micro_focal' / 'other'))
    correct = 15 * record['acc1'] / 100 + 15 * other_record['acc1'] / 100
    assert correct == pytest.approx(30 * trained_run['metrics']['acc1'] / 100)


def test_resuming_on_other_classes_is_an_error(tmp_path, tiny_data, trained_run, capsys):
    """Same class count, one class renamed: the trained head's outputs would mean other
    classes."""
    data = tmp_path / 'renamed'
    for split in ('train', 'val'):
        (data / split).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(tiny_data, split))):
            os.symlink(os.path.join(tiny_data, split, name),
                       data / split / ('disc' if name == 'circle' else name))
    assert run_main(run_args(tmp_path, str(data), '--resume', trained_run['checkpoint'])) == 1
    line = error_line(capsys)
    assert 'was trained on 10 classes, the training data has 10, differing in circle, disc' in line


# 1b. Exact loading: evaluating and resuming take the weights as trained ------------------------

def test_eval_of_a_file_without_the_head_stops_instead_of_scoring_a_random_head(
        tmp_path, tiny_data, trained_run, capsys):
    backbone_only = str(tmp_path / 'backbone.pth')
    weights = load_checkpoint(trained_run['checkpoint'])['model']
    torch.save({'model': {k: v for k, v in weights.items() if not k.startswith('head.')}}, backbone_only)
    assert run_main(run_args(tmp_path, tiny_data, '--eval', '--resume', backbone_only)) == 1
    line = error_line(capsys)
    assert f'checkpoint {backbone_only} does not fit this FocalTransformer exactly: missing head.weight, ' \
           f'head.bias. ' in line and line.endswith(f'(main.py --pretrained {backbone_only})')
    assert not os.path.exists(tmp_path / RUN_DIR / 'metrics.jsonl')


@pytest.mark.parametrize('key, value, problem', [
    ('MODEL.FOCAL.EXPAND_SIZES', '[2, 2, 2, 2]', 'shape differs (file -> model): '
     'layers.0.blocks.0.attn.relative_position_bias_table_to_neighbors (1, 1, 16, 28) -> (1, 1, 16, 48)'),
    ('DATA.IMG_SIZE', '64', 'missing layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors; '
     'shape differs (file -> model): layers.2.blocks.0.pool_layers.0.weight (1, 4) -> (1, 16)'),
])
def test_eval_under_another_geometry_stops_naming_the_tables_that_differ(
        tmp_path, tiny_data, trained_run, capsys, key, value, problem):
    """Position tables of another expand size or image size are neither resized nor left at
    their initialisation in evaluation (fine-tuning does that)."""
    assert run_main(run_args(tmp_path, tiny_data, '--eval', '--resume', trained_run['checkpoint'],
                             '--opts', key, value)) == 1
    assert problem in error_line(capsys)


def test_resume_takes_a_module_prefixed_file_as_eval_does(tmp_path, tiny_data, trained_run):
    """A training state saved from the DDP wrapper (`module.` prefixes) resumes."""
    state = load_checkpoint(trained_run['checkpoint'])
    state['model'] = {f'module.{name}': value for name, value in state['model'].items()}
    prefixed = str(tmp_path / 'from_ddp.pth')
    torch.save(state, prefixed)
    assert run_main(run_args(tmp_path, tiny_data, '--resume', prefixed, '--epochs', '2')) == 0
    assert [record['epoch'] for record in read_metrics(str(tmp_path / RUN_DIR))] == [1]


@pytest.mark.parametrize('format_version', [None, checkpoint.FORMAT_VERSION + 1])
def test_eval_reads_a_file_without_a_format_version_and_stops_at_a_newer_one(
        tmp_path, tiny_data, trained_run, capsys, format_version):
    """A file of before format versions is read as before; a newer one is one error line."""
    state = load_checkpoint(trained_run['checkpoint'])
    state.pop('format_version')
    if format_version is not None:
        state['format_version'] = format_version
    path = str(tmp_path / 'versioned.pth')
    torch.save(state, path)
    returncode = run_main(run_args(tmp_path, tiny_data, '--eval', '--resume', path))
    if format_version is None:
        assert returncode == 0
    else:
        assert returncode == 1
        assert f'has format version {format_version}, of a later version of this code' in error_line(capsys)


# 2. Divergence --------------------------------------------------------------------------------

def test_diverged_run_saves_no_checkpoint_and_keeps_metrics_json(tmp_path, tiny_data, capsys):
    """TRAIN.BASE_LR 1e6 blows the weights up within a few steps, without reaching the
    non-finite step limit: the epoch ends, evaluates to NaN, and must not be saved."""
    args = run_args(tmp_path, tiny_data, '--epochs', '2', '--opts', 'TRAIN.BASE_LR', '1e6',
                    'TRAIN.MAX_NONFINITE_STEPS', '1000')
    assert run_main(args) == 1
    assert 'error: training diverged in epoch 0' in error_line(capsys)
    run_dir = str(tmp_path / RUN_DIR)
    assert checkpoints(run_dir) == [], "no checkpoint of a diverged model, no best.pth"
    [record] = read_metrics(run_dir)
    assert record['epoch'] == 0 and record['loss'] is None


# 3. Full disk ---------------------------------------------------------------------------------

def test_full_disk_during_save_removes_temporary_file_and_keeps_older_checkpoints(
        tmp_path, tiny_data, monkeypatch, capsys):
    real_save = torch.save

    def disk_fills_up_in_epoch_1(state, f, *args, **kwargs):
        if isinstance(state, dict) and state.get('epoch') == 1:
            f.write(b'\0' * 4096)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(state, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, 'save', disk_fills_up_in_epoch_1)
    assert run_main(run_args(tmp_path, tiny_data, '--epochs', '2')) == 1
    run_dir = str(tmp_path / RUN_DIR)
    line = error_line(capsys)
    assert line.startswith(f"error: no space left to save ckpt_epoch_1.pth in {run_dir}: "
                           f"it needs about "), line
    assert checkpoints(run_dir) == ['best.pth', 'ckpt_epoch_0.pth'], "temporary file removed"
    assert load_checkpoint(os.path.join(run_dir, 'ckpt_epoch_0.pth'))['epoch'] == 0


# 4. Crash leftovers ---------------------------------------------------------------------------

def test_stale_temporary_files_are_removed_and_logged_at_start(tmp_path, tiny_data):
    """Even a run that stops at once (here on a missing checkpoint) cleans its folder first."""
    run_dir = tmp_path / RUN_DIR
    run_dir.mkdir(parents=True)
    stale = run_dir / 'ckpt_epoch_3.pth.tmp.4242'
    stale.write_bytes(b'\0' * 1000)
    assert run_main(run_args(tmp_path, tiny_data, '--eval', '--resume', 'missing.pth')) == 1
    assert not stale.exists()
    with open(run_dir / 'log_rank0.txt') as f:
        assert f'removed {stale}' in f.read()


@pytest.mark.parametrize('killed', ['after_checkpoint', 'before_checkpoint'])
def test_a_kill_around_a_checkpoint_loses_no_epoch_and_repeats_none(tmp_path, tiny_data,
                                                                    monkeypatch, killed):
    """Killed in epoch 0 just after (or before) its checkpoint is written, then resumed:
    metrics.jsonl lists each epoch exactly once (before the fix 'after' lost epoch 0; the
    'before' case guards against writing the metrics first twice)."""
    real_save = run_outputs.save_checkpoint

    def killed_at_epoch_0(state, path):
        if state['epoch'] == 0:
            if killed == 'after_checkpoint':
                real_save(state, path)
            raise KeyboardInterrupt
        real_save(state, path)

    args = run_args(tmp_path, tiny_data, '--epochs', '2')
    monkeypatch.setattr(run_outputs, 'save_checkpoint', killed_at_epoch_0)
    with pytest.raises(KeyboardInterrupt):
        run_main(args)
    monkeypatch.setattr(run_outputs, 'save_checkpoint', real_save)
    assert run_main(args) == 0
    assert [record['epoch'] for record in read_metrics(str(tmp_path / RUN_DIR))] == [0, 1]


# 5. Two runs in one folder --------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_in_a_locked_folder_stops_naming_the_running_process(tmp_path, tiny_data,
                                                                       capsys):
    run_dir = str(tmp_path / RUN_DIR)
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys; from run_outputs import RunOutputs; '
         f'outputs = RunOutputs({run_dir!r}, True); print("locked", flush=True); sys.stdin.read()'],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        assert run_main(run_args(tmp_path, tiny_data)) == 1
        line = error_line(capsys)
        assert f"run folder {run_dir} is in use by process {holder.pid}" in line
        assert not os.path.exists(os.path.join(run_dir, 'log_rank0.txt')), "stopped at once"
    finally:
        holder.kill()
        holder.wait()
    RunOutputs(run_dir, True).close()  # the dead process's lock is gone


def test_outputs_are_closed_when_training_stops_on_non_finite_losses(tmp_path, tiny_data,
                                                                     monkeypatch):
    closed = []

    class RecordingWriter(run_outputs.SummaryWriter):
        def close(self):
            closed.append(self)
            super().close()

    def nan_outputs(**kwargs):
        kwargs['model'].register_forward_hook(lambda module, inputs, output: output * float('nan'))
        return real_train_one_epoch(**kwargs)

    real_train_one_epoch = main.train_one_epoch
    monkeypatch.setattr(run_outputs, 'SummaryWriter', RecordingWriter)
    monkeypatch.setattr(main, 'train_one_epoch', nan_outputs)
    assert run_main(run_args(tmp_path, tiny_data)) == 1
    assert len(closed) == 1, "TensorBoard writer closed"
    RunOutputs(str(tmp_path / RUN_DIR), True).close()  # and the folder unlocked


# 6. Exact resumption with workers -------------------------------------------------------------

@pytest.mark.slow
def test_resumed_run_with_two_workers_equals_an_uninterrupted_one(tmp_path, tiny_data,
                                                                  monkeypatch):
    """Random crops, flips and colour jitter run in two loader workers: epoch 1 of a run
    resumed after epoch 0 draws exactly what the uninterrupted run drew."""
    def args(output: str) -> list:
        return ['--cfg', write_micro_config(str(tmp_path)), '--data-path', tiny_data,
                '--output', str(tmp_path / output), '--epochs', '2',
                '--opts', 'DATA.NUM_WORKERS', '2']

    assert run_main(args('reference')) == 0
    with interrupted_at_epoch(1):
        run_main(args('resumed'))
    assert run_main(args('resumed')) == 0

    def weights(output: str) -> dict:
        return load_checkpoint(str(tmp_path / output / 'micro_focal' / 'default' /
                                   'ckpt_epoch_1.pth'))['model']

    reference, resumed = weights('reference'), weights('resumed')
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


# 7. Smaller errors ----------------------------------------------------------------------------

def test_random_bytes_given_to_resume_are_not_a_checkpoint(tmp_path, tiny_data, capsys):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(bytes([0x17]) + random.Random(0).randbytes(5000))
    assert run_main(run_args(tmp_path, tiny_data, '--resume', str(junk))) == 1
    line = error_line(capsys)
    assert f"{junk} is not a checkpoint" in line and 'convert_checkpoint' not in line


def test_a_loader_worker_killed_by_a_signal_ends_the_run_with_one_line(tmp_path, tiny_data,
                                                                      monkeypatch, capsys):
    """As the system's out-of-memory killer ends a worker."""
    real_getitem = ImageDataset.__getitem__

    def killed_in_a_worker(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_getitem(self, index)

    monkeypatch.setattr(ImageDataset, '__getitem__', killed_in_a_worker)
    assert run_main(run_args(tmp_path, tiny_data, '--opts', 'DATA.NUM_WORKERS', '1')) == 1
    line = error_line(capsys)
    assert line.startswith('error: a data-loading worker died: DataLoader worker (pid '), line
    assert 'killed by signal: Killed' in line and 'lower DATA.NUM_WORKERS or --batch-size' in line


def test_zero_byte_image_warning_names_its_path(tmp_path, capsys):
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    garbage = tmp_path / 'garbage.png'
    garbage.write_bytes(b'not an image')
    dataset = ImageDataset([(str(empty), 0), (str(garbage), 0)], ['a'])
    assert dataset[0] is None and dataset[1] is None and dataset.num_unreadable == 2
    err = capsys.readouterr().err
    assert f'warning: skipping unreadable image {empty}: empty file (0 bytes)' in err
    assert f'warning: skipping unreadable image {garbage}: ' in err
    assert 'BytesIO' not in err


def test_images_smaller_than_a_small_input_size_are_padded(tmp_path):
    config = get_config(main.parse_args(['--cfg', write_micro_config(str(tmp_path))]))
    image = Image.new('RGB', (20, 12))
    for is_train in (True, False):
        assert build_transform(is_train, config)(image).shape == (3, 32, 32)


def test_input_size_too_small_for_the_model_says_which_sizes_work(tmp_path, capsys):
    cfg = write_micro_config(str(tmp_path), 'DATA:\n  IMG_SIZE: 16\n')
    assert run_main(['--cfg', cfg, '--output', str(tmp_path / 'out')]) == 1
    line = error_line(capsys)
    assert 'DATA.IMG_SIZE 16 is too small' in line and 'inputs need 32 px or more' in line


# 8. Run folders that cannot be written ------------------------------------------------------

def test_output_paths_that_cannot_hold_a_run_folder_are_one_error_line(tmp_path, capsys):
    """A file given as --output, a --tag too long for a file name, and a folder nobody may
    create folders in (sysfs refuses root too, as a read-only folder refuses a user)."""
    cfg = write_micro_config(str(tmp_path))
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('not a folder')
    cases = [(['--output', str(a_file)], f'{a_file} is a file, not a folder'),
             (['--output', str(tmp_path), '--tag', 'x' * 300],
              'a name in it is 300 bytes long, more than the file system allows')]
    if os.path.isdir('/sys/kernel'):
        cases.append((['--output', '/sys/focal_output'], 'permission denied'))
    for extra, reason in cases:
        assert run_main(['--cfg', cfg, *extra]) == 1
        line = error_line(capsys)
        assert line.startswith('error: cannot create the run folder ') and reason in line, line
        assert line.endswith('choose another --output or --tag'), line


def test_run_folder_that_becomes_unwritable_mid_run_stops_with_one_line(tmp_path, tiny_data,
                                                                       trained_run, monkeypatch,
                                                                       capsys):
    """Resumed for epoch 1, the folder refuses writes once the epoch has started (as a chmod
    would for a user, or a file system remounted read-only): the epoch's metrics cannot be
    written, and epoch 0's checkpoint stays intact."""
    shutil.copytree(os.path.dirname(os.path.dirname(os.path.dirname(trained_run['checkpoint']))),
                    tmp_path / 'out')
    real_open = open
    real_train_one_epoch = main.train_one_epoch
    run_dir = str(tmp_path / RUN_DIR)

    def refusing_open(path, mode='r', *args, **kwargs):
        if str(path).startswith(run_dir) and any(flag in mode for flag in 'wax+'):
            raise PermissionError(errno.EACCES, 'Permission denied', str(path))
        return real_open(path, mode, *args, **kwargs)

    def unwritable_from_epoch_1(**kwargs):
        if kwargs['epoch'] == 1:
            monkeypatch.setattr(run_outputs, 'open', refusing_open, raising=False)
            monkeypatch.setattr(checkpoint, 'open', refusing_open, raising=False)
        return real_train_one_epoch(**kwargs)

    monkeypatch.setattr(main, 'train_one_epoch', unwritable_from_epoch_1)
    monkeypatch.setattr(main, 'evaluate', lambda *args, **kwargs: EvalResult(50.0, 50.0, 1.0, 30))
    assert run_main(run_args(tmp_path, tiny_data, '--epochs', '2')) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: cannot write {os.path.join(run_dir, 'metrics.jsonl')}: "
                           f"permission denied; the files written before are intact"), line
    assert load_checkpoint(os.path.join(run_dir, 'ckpt_epoch_0.pth'))['epoch'] == 0
