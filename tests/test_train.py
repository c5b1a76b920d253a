"""End-to-end runs of main.py on a micro Focal Transformer and tiny generated data (CPU)."""
import glob
import math
import os

import pytest
import torch
import yaml

import main
from config import get_config
from conftest import error_line, interrupted_at_epoch, load_checkpoint, read_metrics, run_main, write_micro_config
from lr_scheduler import scaled_learning_rates


def test_one_epoch_trains_evaluates_and_writes_run_folder(tmp_path, tiny_data, capsys):
    """Also: config.yaml and the checkpoints hold one config, as given (BASE_LR per 512 images,
    MODEL.NUM_CLASSES as written), with the scaled rates and the data's class count recorded
    beside it as derived, so that a run from either file scales once."""
    cfg = write_micro_config(str(tmp_path))
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', str(tmp_path / 'out'),
                     '--opts', 'MODEL.NUM_CLASSES', '1000']) == 0
    run_dir = str(tmp_path / 'out' / 'micro_focal' / 'default')
    out = capsys.readouterr().out
    assert ' * Acc@1 ' in out and 'on the 30 test images' in out

    [metrics] = read_metrics(run_dir)
    assert metrics['epoch'] == 0 and metrics['num_images'] == 30
    assert {'acc1', 'acc5', 'loss', 'max_acc1', 'ema_acc1'} <= set(metrics)
    assert metrics['ema_acc1'] is None and metrics['max_acc1'] == metrics['acc1']

    checkpoint = load_checkpoint(os.path.join(run_dir, 'ckpt_epoch_0.pth'))
    assert checkpoint['epoch'] == 0 and checkpoint['best_epoch'] == 0
    assert set(checkpoint) >= {'model', 'optimizer', 'scaler', 'ema', 'max_accuracy', 'config',
                               'derived', 'classes'}
    assert checkpoint['config']['MODEL']['FOCAL']['EMBED_DIM'] == 16
    assert os.path.exists(os.path.join(run_dir, 'best.pth'))
    saved = get_config(main.parse_args(['--cfg', os.path.join(run_dir, 'config.yaml')]))
    assert saved.MODEL.FOCAL.EMBED_DIM == 16 and saved.DATA.DATA_PATH == tiny_data

    with open(os.path.join(run_dir, 'config.yaml')) as f:
        config_yaml = f.read()
    assert yaml.safe_load(config_yaml) == checkpoint['config'], "one config per run"
    assert checkpoint['config']['TRAIN']['BASE_LR'] == 1e-3
    assert checkpoint['config']['MODEL']['NUM_CLASSES'] == 1000
    derived = checkpoint['derived']
    assert derived['MODEL.NUM_CLASSES'] == 10 and derived['total_batch'] == 8
    assert derived['TRAIN.BASE_LR'] == pytest.approx(1e-3 * 8 / 512)
    assert f"#   TRAIN.BASE_LR: {derived['TRAIN.BASE_LR']}" in config_yaml
    assert checkpoint['optimizer']['param_groups'][0]['initial_lr'] == derived['TRAIN.BASE_LR']
    assert scaled_learning_rates(saved, derived['total_batch']).base == derived['TRAIN.BASE_LR'], \
        "a run from the saved config scales once"
    assert glob.glob(os.path.join(run_dir, 'events.out.tfevents.*'))
    assert not glob.glob(os.path.join(run_dir, '*.tmp.*')), "temporary checkpoint left behind"


def test_demo_dataset_is_generated_without_data_path(tmp_path, capsys):
    cfg = write_micro_config(str(tmp_path), """
DATA:
  DEMO:
    IMAGE_SIZE: 32
    TRAIN_PER_CLASS: 2
    VAL_PER_CLASS: 1
""")
    demo_root = str(tmp_path / 'cache')
    args = ['--cfg', cfg, '--output', str(tmp_path / 'out'), '--opts', 'DATA.DEMO.ROOT', demo_root]
    assert run_main(args) == 0
    assert 'built-in demo dataset' in capsys.readouterr().out
    [dataset] = [name for name in os.listdir(demo_root) if not name.startswith('.')]  # not its lock
    assert sorted(os.listdir(os.path.join(demo_root, dataset, 'val')))[:2] == ['checkerboard', 'circle']


def train_args(cfg: str, data: str, output: str, epochs: int, *extra: str) -> list:
    return ['--cfg', cfg, '--data-path', data, '--output', output, '--epochs', str(epochs), *extra]


def test_interrupted_run_resumes_at_next_epoch_with_identical_state(tmp_path, tiny_data,
                                                                   monkeypatch):
    """An interrupted run continues at the epoch after its last checkpoint and ends with the
    same weights, optimizer and scheduler state as an uninterrupted run (the grad scaler's
    round trip is tested in test_checkpoint.py: fp16 on a CPU is too slow here)."""
    cfg = write_micro_config(str(tmp_path), 'TRAIN:\n  WARMUP_EPOCHS: 1\n')
    assert run_main(train_args(cfg, tiny_data, str(tmp_path / 'reference'), 2)) == 0

    with interrupted_at_epoch(1):
        run_main(train_args(cfg, tiny_data, str(tmp_path / 'resumed'), 2))
    resumed_dir = str(tmp_path / 'resumed' / 'micro_focal' / 'default')
    assert sorted(os.listdir(resumed_dir)).count('ckpt_epoch_0.pth') == 1
    assert not os.path.exists(os.path.join(resumed_dir, 'ckpt_epoch_1.pth'))

    assert run_main(train_args(cfg, tiny_data, str(tmp_path / 'resumed'), 2)) == 0
    assert [m['epoch'] for m in read_metrics(resumed_dir)] == [0, 1]
    with open(os.path.join(resumed_dir, 'log_rank0.txt')) as f:
        assert 'continuing at epoch 1' in f.read()

    reference = load_checkpoint(str(tmp_path / 'reference' / 'micro_focal' / 'default' / 'ckpt_epoch_1.pth'))
    resumed = load_checkpoint(os.path.join(resumed_dir, 'ckpt_epoch_1.pth'))
    for name, value in reference['model'].items():
        torch.testing.assert_close(resumed['model'][name], value, msg=name)
    assert resumed['optimizer']['param_groups'] == reference['optimizer']['param_groups']
    assert resumed['optimizer']['state'][0]['step'] == reference['optimizer']['state'][0]['step']
    for index, state in reference['optimizer']['state'].items():
        torch.testing.assert_close(resumed['optimizer']['state'][index]['exp_avg'], state['exp_avg'])


def test_accumulation_steps_take_one_optimizer_step_per_group(tmp_path, tiny_data):
    cfg = write_micro_config(str(tmp_path))
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', output,
                     '--accumulation-steps', '2']) == 0
    checkpoint = load_checkpoint(os.path.join(output, 'micro_focal', 'default', 'ckpt_epoch_0.pth'))
    # 40 images, batch 8 -> 5 batches -> 2 optimizer steps of 2 batches each.
    assert checkpoint['optimizer']['state'][0]['step'] == 2
    # The learning rate is scaled by batch x accumulation / 512.
    assert checkpoint['optimizer']['param_groups'][0]['initial_lr'] == pytest.approx(1e-3 * 16 / 512)


def test_ema_is_evaluated_and_checkpointed(tmp_path, tiny_data):
    """With decay 0 the EMA equals the trained weights: proves it follows every step."""
    cfg = write_micro_config(str(tmp_path), 'MODEL:\n  NAME: ema_run\n')
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', output, '--model-ema',
                     '--opts', 'TRAIN.EMA.DECAY', '0.0']) == 0
    run_dir = os.path.join(output, 'ema_run', 'default')
    [metrics] = read_metrics(run_dir)
    assert metrics['ema_acc1'] == pytest.approx(metrics['acc1'])
    checkpoint = load_checkpoint(os.path.join(run_dir, 'ckpt_epoch_0.pth'))
    for name, value in checkpoint['model'].items():
        torch.testing.assert_close(checkpoint['ema'][name], value, msg=name)


def test_mixup_cutmix_and_randaugment_recipe_runs(tmp_path, tiny_data):
    cfg = write_micro_config(str(tmp_path), """
AUG:
  AUTO_AUGMENT: rand-m9-mstd0.5-inc1
  REPROB: 0.25
  MIXUP: 0.8
  CUTMIX: 1.0
""")
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', str(tmp_path / 'out'),
                     '--use-checkpoint']) == 0


def official_style_copy(checkpoint: str, folder) -> str:
    """The checkpoint as the official code saved its releases: from DDP ('module.' prefixes)
    and with index buffers that our model recomputes."""
    weights = load_checkpoint(checkpoint)['model']
    official = {f'module.{name}': value for name, value in weights.items()}
    official['module.layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(16, 16).long()
    path = str(folder / 'released.pth')
    torch.save({'model': official}, path)
    return path


@pytest.mark.parametrize('source', ['ours', 'official_style'])
def test_eval_of_checkpoint_reproduces_training_accuracy(tmp_path, tiny_data, trained_run,
                                                         source, capsys):
    """Our checkpoints and released ones (only loadable through the model's checkpoint
    filter) evaluate to the accuracy measured at the end of training."""
    checkpoint = trained_run['checkpoint'] if source == 'ours' else \
        official_style_copy(trained_run['checkpoint'], tmp_path)
    capsys.readouterr()
    assert run_main(['--cfg', trained_run['cfg'], '--data-path', tiny_data, '--eval',
                     '--resume', checkpoint, '--output', str(tmp_path / 'out')]) == 0
    trained = trained_run['metrics']
    assert f" * Acc@1 {trained['acc1']:.3f} Acc@5 {trained['acc5']:.3f}" in capsys.readouterr().out


@pytest.fixture
def file_with_ema(tmp_path, trained_run) -> str:
    """The trained checkpoint with its weights as EMA weights, and as model weights a head of
    zeros: uniform outputs, whose loss is ln 10."""
    state = load_checkpoint(trained_run['checkpoint'])
    state['ema'] = dict(state['model'])
    state['model'] = {name: torch.zeros_like(value) if name.startswith('head.') else value
                      for name, value in state['model'].items()}
    path = str(tmp_path / 'with_ema.pth')
    torch.save(state, path)
    return path


def test_eval_of_a_file_with_ema_weights_reports_both_as_training_does(tmp_path, tiny_data,
                                                                       trained_run, file_with_ema,
                                                                       capsys):
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', trained_run['cfg'], '--data-path', tiny_data, '--eval',
                     '--resume', file_with_ema, '--output', output]) == 0
    [record] = read_metrics(os.path.join(output, 'micro_focal', 'default'))
    assert record['loss'] == pytest.approx(math.log(10)) and record['weights'] == 'model'
    assert record['ema_acc1'] == pytest.approx(trained_run['metrics']['acc1'])
    assert 'Accuracy of the EMA network on the 30 test images' in capsys.readouterr().out


def test_eval_with_model_ema_reports_the_ema_weights(tmp_path, tiny_data, trained_run,
                                                      file_with_ema):
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', trained_run['cfg'], '--data-path', tiny_data, '--eval',
                     '--model-ema', '--resume', file_with_ema, '--output', output]) == 0
    [record] = read_metrics(os.path.join(output, 'micro_focal', 'default'))
    trained = trained_run['metrics']
    assert record['weights'] == 'ema' and record['acc1'] == record['ema_acc1']
    assert (record['acc1'], record['loss']) == (pytest.approx(trained['acc1']), pytest.approx(trained['loss']))


def test_eval_with_model_ema_of_a_file_without_ema_weights_is_one_line(tmp_path, tiny_data,
                                                                        trained_run, capsys):
    assert run_main(['--cfg', trained_run['cfg'], '--data-path', tiny_data, '--eval',
                     '--model-ema', '--resume', trained_run['checkpoint'],
                     '--output', str(tmp_path / 'out')]) == 1
    assert f"checkpoint {trained_run['checkpoint']} holds no EMA weights" in error_line(capsys)


def test_pretrained_fine_tunes_at_another_resolution_and_class_count(tmp_path, tiny_data,
                                                                     trained_run):
    five_classes = tmp_path / 'five'
    for split in ('train', 'val'):
        (five_classes / split).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(tiny_data, split)))[:5]:
            os.symlink(os.path.join(tiny_data, split, name), five_classes / split / name)
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', trained_run['cfg'], '--data-path', str(five_classes),
                     '--output', output, '--pretrained', trained_run['checkpoint'],
                     '--opts', 'DATA.IMG_SIZE', '64', 'MODEL.FOCAL.WINDOW_SIZE', '8']) == 0
    tuned = load_checkpoint(os.path.join(output, 'micro_focal', 'default', 'ckpt_epoch_0.pth'))
    assert tuned['model']['head.weight'].shape == (5, 128)
    with open(os.path.join(output, 'micro_focal', 'default', 'log_rank0.txt')) as f:
        log = f.read()
    head = log.index('WARNING checkpoint head.weight (10, 128) does not fit the head (5, 128): re-initialised')
    assert 'WARNING checkpoint layers.0.blocks.0.attn.relative_position_bias_table resized from' in log
    assert head < log.index('AMP_OPT_LEVEL: '), "stated before the config's long listing"


def test_throughput_measures_and_records_the_batch_size_asked_for(tmp_path, tiny_data,
                                                                  monkeypatch, capsys):
    """--batch-size 8 on a val/ of 3 images: the batch measured is 8 images (the 3 repeated),
    and that is what the record says; --throughput keeps its own config record."""
    one_class = tmp_path / 'one_class'
    for split in ('train', 'val'):
        (one_class / split).mkdir(parents=True)
        os.symlink(os.path.join(tiny_data, split, 'circle'), one_class / split / 'circle')
    measured = []
    real_measure = main.measure_throughput

    def recording_measure(model, images, *args, **kwargs):
        measured.append(images.shape[0])
        return real_measure(model, images, *args, **kwargs)

    monkeypatch.setattr(main, 'measure_throughput', recording_measure)
    cfg = write_micro_config(str(tmp_path))
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', cfg, '--data-path', str(one_class), '--output', output,
                     '--throughput', '--batch-size', '8']) == 0
    out = capsys.readouterr().out
    assert 'the batch of 8 repeats the 3 validation images there are' in out
    assert 'batch_size 8 throughput ' in out
    run_dir = os.path.join(output, 'micro_focal', 'default')
    [record] = read_metrics(run_dir)
    assert measured == [8] and record['batch_size'] == 8 and record['distinct_images'] == 3
    assert record['throughput'] > 0
    assert os.path.exists(os.path.join(run_dir, 'throughput_config.yaml'))
    assert not os.path.exists(os.path.join(run_dir, 'config.yaml'))


def test_zip_dataset_with_partial_cache_trains_and_counts_every_val_image(tmp_path, tiny_data):
    import zipfile
    zipped = tmp_path / 'zipped'
    zipped.mkdir()
    for split in ('train', 'val'):
        classes = sorted(os.listdir(os.path.join(tiny_data, split)))
        with zipfile.ZipFile(zipped / f'{split}.zip', 'w') as archive, \
                open(zipped / f'{split}_map.txt', 'w') as map_file:
            for index, name in enumerate(classes):
                for image in sorted(os.listdir(os.path.join(tiny_data, split, name))):
                    archive.write(os.path.join(tiny_data, split, name, image), f'{name}/{image}')
                    map_file.write(f'{name}/{image}\t{index}\n')
    output = str(tmp_path / 'out')
    cfg = write_micro_config(str(tmp_path))
    assert run_main(['--cfg', cfg, '--data-path', str(zipped), '--zip', '--cache-mode', 'part',
                     '--output', output]) == 0
    [metrics] = read_metrics(os.path.join(output, 'micro_focal', 'default'))
    assert metrics['num_images'] == 30
