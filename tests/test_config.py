"""Config loading: official YAML files, BASE inheritance, overrides and clear errors."""
import argparse
import os

import pytest

import main
from config import ConfigError, get_config, load_config, run_folder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The model sections of the official repository's configs/focal_*_patch4_window7_224.yaml
# (its *_useconv_* files add USE_CONV_EMBED: True), with their odd spacing and quoting.
OFFICIAL_FOCAL_YAML = """MODEL:
  TYPE: focal
  NAME: focal_{size}_patch4_window7_224
  DROP_PATH_RATE: {drop_path}
  FOCAL:
{conv}    EMBED_DIM: {embed_dim}
    DEPTHS: {depths}
    NUM_HEADS: {heads}
    WINDOW_SIZE: 7 
    FOCAL_POOL: "fc"
    FOCAL_STAGES: [0, 1, 2, 3]
    FOCAL_LEVELS: [2, 2, 2, 2]
    FOCAL_WINDOWS: [7, 5, 3, 1]
    EXPAND_SIZES: [3, 3, 3, 3]        """

OFFICIAL_VARIANTS = {
    'tiny': dict(drop_path=0.2, embed_dim=96, depths=[2, 2, 6, 2], heads=[3, 6, 12, 24]),
    'small': dict(drop_path=0.3, embed_dim=96, depths=[2, 2, 18, 2], heads=[3, 6, 12, 24]),
    'base': dict(drop_path=0.5, embed_dim=128, depths=[2, 2, 18, 2], heads=[4, 8, 16, 32]),
}


def args_for(cfg: str, *argv: str) -> argparse.Namespace:
    return main.parse_args(['--cfg', cfg, *argv])


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize('use_conv', [False, True])
@pytest.mark.parametrize('size', sorted(OFFICIAL_VARIANTS))
def test_official_yaml_loads_unchanged(tmp_path, size, use_conv):
    variant = OFFICIAL_VARIANTS[size]
    text = OFFICIAL_FOCAL_YAML.format(size=size, conv='    USE_CONV_EMBED: True\n' if use_conv else '',
                                      **variant)
    config = get_config(args_for(write(tmp_path / 'official.yaml', text)))
    focal = config.MODEL.FOCAL
    assert config.MODEL.DROP_PATH_RATE == variant['drop_path']
    assert (focal.EMBED_DIM, list(focal.DEPTHS), list(focal.NUM_HEADS)) == \
        (variant['embed_dim'], variant['depths'], variant['heads'])
    assert (focal.FOCAL_POOL, list(focal.FOCAL_LEVELS), list(focal.FOCAL_WINDOWS)) == \
        ('fc', [2, 2, 2, 2], [7, 5, 3, 1])
    assert focal.USE_CONV_EMBED is use_conv


@pytest.mark.parametrize('size', sorted(OFFICIAL_VARIANTS))
@pytest.mark.parametrize('suffix', ['', '_useconv'])
def test_our_configs_match_official_model_and_paper_recipe(size, suffix):
    config = get_config(args_for(os.path.join(REPO_ROOT, 'configs', f'focal_{size}{suffix}.yaml')))
    variant = OFFICIAL_VARIANTS[size]
    assert config.MODEL.TYPE == 'focal'
    assert config.MODEL.FOCAL.EMBED_DIM == variant['embed_dim']
    assert list(config.MODEL.FOCAL.DEPTHS) == variant['depths']
    assert list(config.MODEL.FOCAL.NUM_HEADS) == variant['heads']
    assert config.MODEL.FOCAL.USE_CONV_EMBED is (suffix == '_useconv')
    assert config.MODEL.DROP_PATH_RATE == variant['drop_path']
    train, aug = config.TRAIN, config.AUG
    assert (train.EPOCHS, train.WARMUP_EPOCHS, train.BASE_LR, train.WEIGHT_DECAY, train.CLIP_GRAD) == \
        (300, 20, 5e-4, 0.05, 5.0)
    assert (train.OPTIMIZER.NAME, train.LR_SCHEDULER.NAME) == ('adamw', 'cosine')
    assert (aug.AUTO_AUGMENT, aug.MIXUP, aug.CUTMIX, aug.REPROB) == \
        ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.25)
    assert config.MODEL.LABEL_SMOOTHING == 0.1


def test_base_inheritance_and_override_order(tmp_path):
    write(tmp_path / 'base.yaml', 'TRAIN:\n  EPOCHS: 7\n  WARMUP_EPOCHS: 1\n  BASE_LR: 0.1\n'
                                     'TAG: from_base\n')
    cfg = write(tmp_path / 'child.yaml', "BASE: ['base.yaml']\nTRAIN:\n  EPOCHS: 9\n")
    config = get_config(args_for(cfg, '--batch-size', '6', '--tag', 'cli',
                                 '--opts', 'TRAIN.BASE_LR', '0.2', 'TAG', 'opts'))
    assert config.TRAIN.EPOCHS == 9          # child over base
    assert config.TRAIN.BASE_LR == 0.2       # --opts over files
    assert config.TAG == 'cli'               # dedicated flags over --opts
    assert config.DATA.BATCH_SIZE == 6
    assert run_folder(config) == os.path.join('output', config.MODEL.NAME, 'cli')


def test_launcher_flags_and_amp_alias_are_accepted(tmp_path):
    cfg = write(tmp_path / 'c.yaml', '')
    assert main.parse_args(['--cfg', cfg, '--local_rank', '3']).local_rank == 3
    assert main.parse_args(['--cfg', cfg, '--local-rank=2']).local_rank == 2
    config = get_config(args_for(cfg, '--amp-opt-level', 'O0', '--amp-dtype', 'fp16'))
    assert main.resolve_amp_dtype(config, main.torch.device('cpu')) is None
    config = get_config(args_for(cfg, '--amp-opt-level', 'O1', '--amp-dtype', 'bf16'))
    assert main.resolve_amp_dtype(config, main.torch.device('cpu')) == main.torch.bfloat16


def test_timm_kwargs_accept_new_keys(tmp_path):
    cfg = write(tmp_path / 't.yaml', 'MODEL:\n  TYPE: timm\n  TIMM:\n    NAME: resnet10t\n'
                                     '    KWARGS:\n      stem_width: 16\n')
    assert dict(get_config(args_for(cfg)).MODEL.TIMM.KWARGS) == {'stem_width': 16}


@pytest.mark.parametrize('text, opts, message', [
    ('MODEL:\n  FOCAL:\n    FOCAL_TOPK: 128\n', [], 'unknown config key: MODEL.FOCAL.FOCAL_TOPK'),
    ('', ['TRAIN.LR', '0.1'], 'unknown config key: TRAIN.LR'),
    ('DATA:\n  CACHE_MODE: sometimes\n', [], "DATA.CACHE_MODE must be one of"),
    ('TRAIN:\n  EPOCHS: ten\n', [], 'TRAIN.EPOCHS'),
    ('MODEL:\n  TYPE: focalv2\n', [], "MODEL.TYPE must be one of ['focal', 'timm']"),
    ('DATA:\n  BATCH_SIZE: 7\n', [], 'DATA.BATCH_SIZE must be even with mixup/cutmix'),
    ('', ['TRAIN.EPOCHS'], '--opts needs KEY VALUE pairs'),
    ('TRAIN:\n  EPOCHS: 3\n  WARMUP_EPOCHS: 1: 2\n', [],
     'bad.yaml:3:19 is not valid YAML: mapping values are not allowed here'),
    ('MODEL:\n  TYPE: timm\n  TIMM:\n    NAME: resnet_nonexistent\n', [],
     "MODEL.TIMM.NAME 'resnet_nonexistent' is not a timm model"),
    ('MODEL:\n  FOCAL:\n    FOCAL_WINDOWS: [7, 4, 3, 1]\n', [], 'MODEL.FOCAL.FOCAL_WINDOWS must be odd'),
    ('MODEL:\n  FOCAL:\n    EMBED_DIM: 100\n', [], r'MODEL.FOCAL.NUM_HEADS[0] = 3 does not divide'),
    ('DATA:\n  IMG_SIZE: 24\n', [], 'inputs need 32 px or more'),
])
def test_bad_config_is_an_error_naming_the_key(tmp_path, text, opts, message):
    cfg = write(tmp_path / 'bad.yaml', text)
    argv = ['--opts', *opts] if opts else []
    with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace(']', r'\]')):
        get_config(args_for(cfg, *argv))


def test_load_config_merges_file_and_overrides_frozen(tmp_path):
    """What scripts and tests use instead of main.py's command line."""
    cfg = write(tmp_path / 'base.yaml', 'TRAIN:\n  EPOCHS: 7\n  WARMUP_EPOCHS: 2\n')
    config = load_config(cfg, ['TRAIN.WARMUP_EPOCHS', '3'])
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS) == (7, 3) and config.is_frozen()
    with pytest.raises(ConfigError, match='TRAIN.WARMUP_EPOCHS must be in'):
        load_config(cfg, ['TRAIN.WARMUP_EPOCHS', '8'])
