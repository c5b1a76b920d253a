"""The reproduction kit: configs build the paper's models at the paper's sizes, scripts print the
runs they would launch, and make_tables.py renders tables and plots from real run folders."""
import contextlib
import functools
import glob
import json
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import timm
import timm.layers.weight_init
import torch
from timm.models.swin_transformer import SwinTransformerBlock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))

import make_tables  # noqa: E402
from config import load_config  # noqa: E402
from conftest import read_metrics  # noqa: E402
from models import build_model  # noqa: E402
from models.complexity import count_params_m  # noqa: E402

CONFIGS = sorted(os.path.relpath(path, REPO)
                 for path in glob.glob(f'{REPO}/configs/**/*.yaml', recursive=True)
                 if not os.path.basename(path).startswith('_'))
SCRIPTS = sorted(os.path.basename(path) for path in glob.glob(f'{REPO}/scripts/*.sh'))
RUNNABLE_SCRIPTS = [name for name in SCRIPTS if name not in ('common.sh', 'gpu_checks.sh')]  # the reproduction kit
TRAINING_SCRIPTS = [name for name in RUNNABLE_SCRIPTS if name != 'eval_released.sh']

# Focal rows: the official code's counts. Swin rows: the paper's.
REFERENCE_PARAMS_M = {
    'configs/focal_tiny.yaml': 28.88,
    'configs/focal_small.yaml': 51.14,
    'configs/focal_base.yaml': 89.82,
    'configs/ablations/focal_tiny_depth2222.yaml': 21.46,
    'configs/ablations/focal_tiny_depth2242.yaml': 25.17,
    'configs/baselines/swin_tiny.yaml': 28.3,
    'configs/ablations/swin_tiny_noshift.yaml': 28.3,
    'configs/ablations/swin_tiny_depth2222.yaml': 21.2,
    'configs/ablations/swin_tiny_depth2242.yaml': 24.7,
}

# Each ablation config differs from its base model in its factor only (and its run name).
ABLATION_CHANGES = {
    'configs/ablations/swin_tiny_window14.yaml': {'MODEL.TIMM.KWARGS.window_size': 14},
    'configs/ablations/swin_tiny_noshift.yaml': {
        'MODEL.TIMM.NAME': 'swin_tiny_patch4_window7_224_noshift'},
    'configs/ablations/swin_tiny_depth2222.yaml': {'MODEL.TIMM.KWARGS.depths': [2, 2, 2, 2]},
    'configs/ablations/swin_tiny_depth2242.yaml': {'MODEL.TIMM.KWARGS.depths': [2, 2, 4, 2]},
    'configs/ablations/focal_tiny_window14.yaml': {'MODEL.FOCAL.WINDOW_SIZE': 14},
    'configs/ablations/focal_tiny_shift.yaml': {'MODEL.FOCAL.USE_SHIFT': True},
    'configs/ablations/focal_tiny_depth2222.yaml': {'MODEL.FOCAL.DEPTHS': [2, 2, 2, 2]},
    'configs/ablations/focal_tiny_depth2242.yaml': {'MODEL.FOCAL.DEPTHS': [2, 2, 4, 2]},
    'configs/ablations/focal_tiny_local_only.yaml': {
        'MODEL.FOCAL.FOCAL_LEVELS': [1, 1, 1, 1], 'MODEL.FOCAL.FOCAL_POOL': 'none'},
    'configs/ablations/focal_tiny_global_only.yaml': {'MODEL.FOCAL.EXPAND_SIZES': [0, 0, 0, 0]},
}

PAPER_RECIPE = {
    'TRAIN.EPOCHS': 300, 'TRAIN.WARMUP_EPOCHS': 20, 'TRAIN.BASE_LR': 5e-4,
    'TRAIN.WEIGHT_DECAY': 0.05, 'TRAIN.CLIP_GRAD': 5.0, 'TRAIN.LR_SCHEDULER.NAME': 'cosine',
    'TRAIN.OPTIMIZER.NAME': 'adamw', 'AUG.AUTO_AUGMENT': 'rand-m9-mstd0.5-inc1', 'AUG.MIXUP': 0.8,
    'AUG.CUTMIX': 1.0, 'AUG.REPROB': 0.25, 'MODEL.LABEL_SMOOTHING': 0.1, 'DATA.BATCH_SIZE': 128,
}
DROP_PATH = {'swin_tiny': 0.2, 'swin_small': 0.3, 'swin_base': 0.5, 'focal_tiny': 0.2,
             'focal_small': 0.3, 'focal_base': 0.5}
TABLES = [make_tables.TABLE_2, make_tables.TABLE_8, make_tables.TABLE_9, make_tables.TABLE_10,
          make_tables.FIGURE_5]
TABLE_CONFIGS = sorted({row.config for table in TABLES for row in table.rows if row.config})


def load(path: str):
    return load_config(os.path.join(REPO, path))


@contextlib.contextmanager
def uninitialised_weights():
    """Build modules without drawing their initial weights (sizes are unaffected): random
    initialisation is most of the time it takes to build a 90M-parameter model on a CPU."""
    def keep(tensor, *args, **kwargs):
        return tensor
    with contextlib.ExitStack() as stack:
        for name in ('uniform_', 'normal_', 'trunc_normal_', 'kaiming_uniform_', 'kaiming_normal_',
                     'xavier_uniform_', 'xavier_normal_'):
            stack.enter_context(mock.patch.object(torch.nn.init, name, keep))
        stack.enter_context(mock.patch.object(timm.layers.weight_init, '_trunc_normal_', keep))
        yield


@functools.lru_cache(maxsize=None)
def params_m(path: str) -> float:
    with uninitialised_weights():
        return count_params_m(build_model(load(path)))


def flatten(node, prefix=''):
    """A CfgNode as {'A.B.C': value}."""
    items = {}
    for key, value in node.items():
        if isinstance(value, dict):
            items.update(flatten(value, f'{prefix}{key}.'))
        else:
            items[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
    return items


@pytest.mark.parametrize('path', CONFIGS)
def test_every_config_builds_its_model(path):
    assert params_m(path) > 0


@pytest.mark.parametrize('path', sorted(REFERENCE_PARAMS_M))
def test_parameter_count_matches_reference(path):
    assert params_m(path) == pytest.approx(REFERENCE_PARAMS_M[path], abs=0.05)


@pytest.mark.parametrize('path', sorted(ABLATION_CHANGES))
def test_ablation_config_changes_only_its_factor(path):
    base = 'configs/baselines/swin_tiny.yaml' if 'swin' in path else 'configs/focal_tiny.yaml'
    before, after = flatten(load(base)), flatten(load(path))
    changed = {key: value for key, value in after.items()
               if before.get(key) != value and key not in ('BASE', 'MODEL.NAME')}
    assert changed == ABLATION_CHANGES[path]
    assert after['MODEL.NAME'] != before['MODEL.NAME']


@pytest.mark.parametrize('path', TABLE_CONFIGS)
def test_table_config_trains_with_the_paper_recipe(path):
    config = flatten(load(path))
    for key, value in PAPER_RECIPE.items():
        assert config[key] == pytest.approx(value), key
    expected_size = 384 if 'vit_base_384' in path else 224
    assert config['DATA.IMG_SIZE'] == expected_size
    model = os.path.basename(path)[:-len('.yaml')]
    if model in DROP_PATH:
        assert config['MODEL.DROP_PATH_RATE'] == DROP_PATH[model]


def test_run_names_are_unique_across_table_configs():
    names = [load(path).MODEL.NAME for path in TABLE_CONFIGS]
    assert len(names) == len(set(names))


def test_swin_noshift_variant_never_shifts_windows():
    kwargs = dict(img_size=56, embed_dim=24, depths=(2, 2), num_heads=(1, 2), num_classes=5)
    shifted = timm.create_model('swin_tiny_patch4_window7_224', **kwargs).eval()
    unshifted = timm.create_model('swin_tiny_patch4_window7_224_noshift', **kwargs).eval()
    unshifted.load_state_dict(shifted.state_dict())
    shifted_blocks = [m for m in shifted.modules() if isinstance(m, SwinTransformerBlock)]
    unshifted_blocks = [m for m in unshifted.modules() if isinstance(m, SwinTransformerBlock)]
    assert any(any(block.shift_size) for block in shifted_blocks)
    assert all(not any(block.shift_size) and block.attn_mask is None for block in unshifted_blocks)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert not torch.allclose(shifted(x), unshifted(x))


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_passes_bash_syntax_check(script):
    subprocess.run(['bash', '-n', os.path.join(REPO, 'scripts', script)], check=True)


def dry_run(script: str, *args: str, **env: str) -> list:
    """The commands `script` prints with DRY_RUN=1, one argument list each."""
    environment = dict(os.environ, DRY_RUN='1', **env)
    out = subprocess.run(['bash', os.path.join(REPO, 'scripts', script), *args], env=environment,
                         check=True, capture_output=True, text=True).stdout
    return [line[2:].split() for line in out.splitlines() if line.startswith('+ ')]


def configs_of(commands: list) -> list:
    return [command[command.index('--cfg') + 1] for command in commands if '--cfg' in command]


@pytest.mark.parametrize('script', TRAINING_SCRIPTS)
def test_dry_run_prints_train_eval_and_throughput_per_config(script):
    commands = dry_run(script, NPROC='4', BATCH='32', DATA='/data/in1k', OUTPUT='/runs')
    configs = configs_of(commands)
    assert configs and all(os.path.isfile(os.path.join(REPO, path)) for path in configs)
    for config in dict.fromkeys(configs):
        runs = [c for c in commands if '--cfg' in c and c[c.index('--cfg') + 1] == config]
        train, evaluate, throughput = runs[-3:]
        assert train[:3] == ['torchrun', '--standalone', '--nproc_per_node=4']
        assert '--eval' in evaluate and '--resume' in evaluate
        assert '--throughput' in throughput and 'torchrun' not in throughput
        for command in (train, evaluate, throughput):
            assert command[command.index('--data-path') + 1] == '/data/in1k'
            assert command[command.index('--output') + 1] == '/runs'
        assert train[train.index('--batch-size') + 1] == '32'


def test_dry_run_passes_extra_arguments_to_main():
    commands = dry_run('table2_focal_tiny.sh', '--use-checkpoint')
    assert len(commands) == 3 and all('--use-checkpoint' in command for command in commands)


def test_real_run_refuses_a_missing_dataset():
    result = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'table2_resnet50.sh')],
                            env=dict(os.environ, DATA='/nonexistent/imagenet'),
                            capture_output=True, text=True)
    assert result.returncode == 1 and 'DATA=/nonexistent/imagenet' in result.stderr


def test_scripts_run_exactly_the_rows_of_their_tables():
    table2_scripts = [name for name in TRAINING_SCRIPTS if re.fullmatch(r'table2_.+\.sh', name)]
    scripted = sorted(config for name in table2_scripts
                      for config in set(configs_of(dry_run(name))))
    assert scripted == sorted(row.config for row in make_tables.TABLE_2.rows if row.config)
    assert set(configs_of(dry_run('table2.sh'))) == set(scripted)
    for script, table in (('table8_window_size.sh', make_tables.TABLE_8),
                          ('table9_window_shift.sh', make_tables.TABLE_9),
                          ('table10_depth.sh', make_tables.TABLE_10),
                          ('figure5_local_global.sh', make_tables.FIGURE_5)):
        scripted = list(dict.fromkeys(configs_of(dry_run(script))))
        assert scripted == [row.config for row in table.rows]


def test_eval_released_evaluates_each_checkpoint_it_downloads(tmp_path):
    commands = dry_run('eval_released.sh', CKPT_DIR=str(tmp_path))
    downloads = [command[2] for command in commands if command[0] == 'download']
    evaluated = [command[command.index('--resume') + 1]
                 for command in commands if '--eval' in command]
    released = [timm.get_pretrained_cfg(name).url.rsplit('/', 1)[1]
                for name in timm.list_models(['focal_*', 'focalv2_*'])]
    assert len(released) == 9 and sorted(map(os.path.basename, downloads)) == sorted(released)
    assert evaluated == downloads
    scripted = list(dict.fromkeys(configs_of(commands)))
    assert scripted == [row.config for row in make_tables.RELEASED.rows]  # the table shows every one
    assert all(command[command.index('--tag') + 1] == 'released'
               for command in commands if '--cfg' in command)


# The paper's numbers, typed in a second time from the paper's text: (params M, GFLOPs, top-1)
# for Table 2; Tables 8-10 add COCO box and mask AP, None where the paper's table prints nothing.
PAPER_TABLE_2 = {
    'ResNet-50': (25.0, 4.1, 76.2), 'ResNet-101': (45.0, 7.9, 77.4),
    'ResNet-152': (60.0, 11.0, 78.3), 'DeiT-Small/16': (22.1, 4.6, 79.9),
    'DeiT-Base/16': (86.6, 17.5, 81.8), 'ViT-Base/16 (384)': (86.6, 17.6, 77.9),
    'PVT-Small': (24.5, 3.8, 79.8), 'PVT-Medium': (44.2, 6.7, 81.2), 'PVT-Large': (61.4, 9.8, 81.7),
    'ViL-Small': (24.6, 5.1, 82.0), 'ViL-Medium': (39.7, 9.1, 83.3), 'ViL-Base': (55.7, 13.4, 83.2),
    'CvT-13': (20.0, 4.5, 81.6), 'CvT-21': (32.0, 7.1, 82.5), 'Swin-Tiny': (28.3, 4.5, 81.2),
    'Swin-Small': (49.6, 8.7, 83.1), 'Swin-Base': (87.8, 15.4, 83.4),
    'Focal-Tiny': (29.1, 4.9, 82.2), 'Focal-Small': (51.1, 9.1, 83.5),
    'Focal-Base': (89.8, 16.0, 83.8),
}
PAPER_ABLATIONS = {
    '8': {
        'Swin-Tiny, window 7': (None, 4.5, 81.2, 43.7, 39.8),
        'Swin-Tiny, window 14': (None, 4.9, 82.1, 44.0, 40.5),
        'Focal-Tiny, window 7': (None, 4.9, 82.2, 44.9, 41.1),
        'Focal-Tiny, window 14': (None, 5.2, 82.3, 45.5, 41.5),
    },
    '9': {
        'Swin-Tiny, shift': (None, None, 81.2, 43.7, 39.8),
        'Swin-Tiny, no shift': (None, None, 80.2, 38.8, 36.4),
        'Focal-Tiny, shift': (None, None, 81.9, 44.9, 41.1),
        'Focal-Tiny, no shift (default)': (None, None, 82.2, 44.8, 41.0),
    },
    '10': {
        'Swin, 2-2-2-2': (21.2, 3.1, 78.7, 38.2, 35.7),
        'Swin, 2-2-4-2': (24.7, 3.8, 80.2, 41.2, 38.1),
        'Swin, 2-2-6-2 (Swin-T)': (28.3, 4.5, 81.2, 43.7, 39.8),
        'Focal, 2-2-2-2': (21.7, 3.4, 79.9, 40.5, 37.6),
        'Focal, 2-2-4-2': (25.4, 4.1, 81.4, 43.3, 39.8),
        'Focal, 2-2-6-2 (Focal-T)': (29.1, 4.9, 82.2, 44.8, 41.0),
    },
}


def paper_numbers(table: make_tables.Table, fields: tuple) -> dict:
    return {row.label: tuple(getattr(row.paper, name) for name in fields) for row in table.rows}


def test_table_2_paper_columns_are_the_papers():
    assert paper_numbers(make_tables.TABLE_2, ('params', 'gflops', 'top1')) == PAPER_TABLE_2


@pytest.mark.parametrize('key', sorted(PAPER_ABLATIONS))
def test_ablation_paper_columns_are_the_papers(key):
    fields = ('params', 'gflops', 'top1', 'box_ap', 'mask_ap')
    assert paper_numbers(make_tables.TABLES[key], fields) == PAPER_ABLATIONS[key]


@pytest.mark.parametrize('key', ['2', '8', '9', '10'])
def test_rendered_paper_columns_show_the_papers_numbers_without_marks(key):
    table = make_tables.TABLES[key]
    markdown = make_tables.render_table(table, [make_tables.Result(row) for row in table.rows])
    assert '†' not in markdown
    header = next(line for line in markdown.splitlines() if line.startswith('| Model'))
    columns = [cell.strip() for cell in header.split('|')[1:-1]]
    paper = {'Params (M) paper': 'params', 'GFLOPs paper': 'gflops', 'Top-1 paper': 'top1',
             'Box AP paper': 'box_ap', 'Mask AP paper': 'mask_ap'}
    assert ('Box AP paper' in columns) == (key != '2')
    for line in markdown.splitlines()[4:4 + len(table.rows)]:
        cells = dict(zip(columns, (cell.strip() for cell in line.split('|')[1:-1])))
        row = next(row for row in table.rows if row.label == cells['Model'])
        for column, name in paper.items():
            value = getattr(row.paper, name)
            if column in cells:
                assert cells[column] == ('—' if value is None else f'{value:.1f}'), column


# The paper's COCO rows for Focal backbones, typed in a second time from its Tables 3, 4 and 5.
PAPER_DETECTION_FOCAL_ROWS = [
    ['Focal-Tiny', '43.7 (+1.7)', '44.8 (+1.1)', '41.0 (+1.3)'],
    ['Focal-Small', '45.6 (+0.6)', '47.4 (+0.9)', '42.8 (+0.7)'],
    ['Focal-Base', '46.3 (+1.3)', '47.8 (+0.9)', '43.2 (+0.9)'],
    ['Focal-Tiny', '39.4/48.8', '265/291', '45.5', '66.3', '48.8', '31.2', '49.2', '58.7', '47.2',
     '69.4', '51.9', '42.7', '66.5', '45.9'],
    ['Focal-Small', '61.7/71.2', '367/401', '47.3', '67.8', '51.0', '31.6', '50.9', '61.1', '48.8',
     '70.5', '53.6', '43.8', '67.7', '47.2'],
    ['Focal-Base', '100.8/110.0', '514/533', '46.9', '67.8', '50.3', '31.9', '50.3', '61.5', '49.0',
     '70.1', '53.6', '43.7', '67.6', '47.0'],
    ['Cascade Mask R-CNN', 'Focal-T', '86.7', '770', '51.5 (+1.0)', '70.6', '55.9'],
    ['ATSS', 'Focal-T', '36.8', '239', '49.5 (+2.3)', '68.8', '53.9'],
    ['RepPointsV2', 'Focal-T', '45.4', '491', '51.2 (+1.2)', '70.4', '54.9'],
    ['Sparse R-CNN', 'Focal-T', '110.8', '196', '49.0 (+1.1)', '69.1', '53.2'],
]


def test_detection_doc_gives_the_papers_focal_rows():
    with open(os.path.join(REPO, 'docs', 'detection.md')) as f:
        section = f.read().split("## The paper's detection results")[1].split('\n## ')[0]
    rows = [[cell.strip() for cell in line.split('|')[1:-1]]
            for line in section.splitlines() if line.startswith('| ') and 'Focal' in line]
    assert rows == PAPER_DETECTION_FOCAL_ROWS


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """A one-epoch CPU training run of the demo model on a tiny demo dataset, then a throughput
    measurement: OUTPUT/focal_demo/default/{config.yaml,metrics.jsonl}."""
    root = tmp_path_factory.mktemp('runs')
    common = ['--cfg', 'configs/demo.yaml', '--epochs', '1', '--output', str(root),
              '--device', 'cpu', '--opts', 'DATA.DEMO.ROOT', str(root / 'demo'),
              'DATA.DEMO.TRAIN_PER_CLASS', '4', 'DATA.DEMO.VAL_PER_CLASS', '2',
              'DATA.NUM_WORKERS', '0', 'TRAIN.WARMUP_EPOCHS', '0']
    subprocess.run([sys.executable, 'main.py', '--batch-size', '8', *common],
                   cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, 'main.py', '--throughput', '--batch-size', '2', *common],
                   cwd=REPO, check=True, capture_output=True)
    return root


@pytest.mark.slow
def test_make_tables_renders_a_table_and_plots_from_a_real_run(demo_run, tmp_path, monkeypatch,
                                                               capsys):
    run_dir = demo_run / 'focal_demo' / 'default'
    records = read_metrics(str(run_dir))
    acc1 = [r for r in records if 'acc1' in r][-1]['acc1']
    throughput = [r for r in records if 'throughput' in r][-1]['throughput']
    missing = tmp_path / 'not_run.yaml'
    missing.write_text(f"BASE: ['{os.path.join(REPO, 'configs', 'demo.yaml')}']\n"
                       "MODEL:\n  NAME: focal_demo_never_trained\n")
    table = make_tables.Table('Demo', (
        make_tables.Row('Demo', 'configs/demo.yaml', make_tables.Paper(1.5, 0.1, 99.9)),
        make_tables.Row('Demo, never trained', str(missing)),
        make_tables.Row('Elsewhere', None, make_tables.Paper(25, 4.1, 76.2)),
    ))
    monkeypatch.setattr(make_tables, 'TABLES', {'2': table})
    monkeypatch.setattr(sys, 'argv', ['make_tables.py', '--output', str(demo_run),
                                      '--plots', str(tmp_path / 'figures')])
    make_tables.main()
    markdown = capsys.readouterr().out
    rows = {line.split('|')[1].strip(): [cell.strip() for cell in line.split('|')[2:-1]]
            for line in markdown.splitlines() if line.startswith('| ') and '---' not in line}
    demo_params = f'{params_m("configs/demo.yaml"):.2f}'
    assert rows['Demo'] == ['1.5', demo_params, '0.1', rows['Demo'][3], '99.9', f'{acc1:.2f}',
                            f'{throughput:.0f}']
    assert float(rows['Demo'][3]) > 0
    assert rows['Demo, never trained'][5] == 'not run' and rows['Demo, never trained'][6] == '—'
    assert rows['Elsewhere'][1] == '—' and rows['Elsewhere'][5] == 'not reproducible here'
    for name in ('top1_vs_gflops.png', 'top1_vs_throughput.png'):
        png = (tmp_path / 'figures' / name).read_bytes()
        assert png.startswith(b'\x89PNG') and len(png) > 10_000


def test_unfinished_run_shows_its_progress(tmp_path):
    run_dir = tmp_path / 'focal_demo' / 'default'
    run_dir.mkdir(parents=True)
    (run_dir / 'metrics.jsonl').write_text(
        json.dumps({'epoch': 3, 'acc1': 40.0, 'acc5': 80.0, 'loss': 1.0, 'max_acc1': 42.5,
                    'ema_acc1': None}) + '\n')
    row = make_tables.Row('Demo', 'configs/demo.yaml')
    result = make_tables.measure(row, str(tmp_path), 'default')
    epochs = make_tables.load_config('configs/demo.yaml').TRAIN.EPOCHS
    assert make_tables.top1_cell(result) == f'40.00 (max 42.50) (epoch 4/{epochs})'


def test_a_metrics_line_cut_short_by_a_kill_leaves_the_others_in_the_table(tmp_path):
    run_dir = tmp_path / 'focal_demo' / 'default'
    run_dir.mkdir(parents=True)
    (run_dir / 'metrics.jsonl').write_text(
        json.dumps({'epoch': 3, 'acc1': 40.0, 'acc5': 80.0, 'loss': 1.0, 'max_acc1': 42.5,
                    'ema_acc1': None}) + '\n' + '{"epoch": 4, "acc1": 41.')
    result = make_tables.measure(make_tables.Row('Demo', 'configs/demo.yaml'), str(tmp_path), 'default')
    assert [record['epoch'] for record in result.evals] == [3]
