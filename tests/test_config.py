"""Config loading: official YAML files, BASE inheritance, overrides and clear errors."""
import argparse
import logging
import os

import pytest

import config
import main
import models.build as models_build
from config import (ConfigError, defaults_note, get_config, get_defaults, load_config, merge_overrides,
                    validate_config)
from models.build import (FAST_ARGUMENT_KEYS, FOCAL_MODELS, TIMM_ARGUMENT_KEYS, focal_kwargs_from_config,
                          in_config_terms)
from utils import run_folder

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
    EXPAND_SIZES: [3, 3, 3, 3]        """  # noqa: W291 (the official files' trailing spaces)

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
    ('MODEL:\n  FOCAL:\n    FOCAL_TOP_K: 128\n', [], 'unknown config key: MODEL.FOCAL.FOCAL_TOP_K'),
    ('', ['TRAIN.LR', '0.1'], 'unknown config key: TRAIN.LR'),
    ('DATA:\n  CACHE_MODE: sometimes\n', [], "DATA.CACHE_MODE must be one of"),
    ('TRAIN:\n  EPOCHS: ten\n', [], 'TRAIN.EPOCHS'),
    ('MODEL:\n  TYPE: focalv3\n', [], "MODEL.TYPE must be one of ['focal', 'focalv2', 'timm']"),
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


# --- Config files that are not what --cfg and BASE expect --------------------------------------

def test_base_that_includes_itself_is_an_error_naming_the_cycle(tmp_path):
    cfg = write(tmp_path / 'self.yaml', "BASE: ['self.yaml']\n")
    with pytest.raises(ConfigError, match=rf'include each other in a cycle through BASE: {cfg} -> {cfg};'):
        get_config(args_for(cfg))


def test_base_files_that_include_each_other_are_an_error_naming_the_cycle(tmp_path):
    first = write(tmp_path / 'first.yaml', "BASE: ['second.yaml']\n")
    second = write(tmp_path / 'second.yaml', "BASE: ['first.yaml']\n")
    with pytest.raises(ConfigError, match=rf'cycle through BASE: {first} -> {second} -> {first};'):
        get_config(args_for(first))
    # A base that two bases share is no cycle.
    write(tmp_path / 'common.yaml', 'TRAIN:\n  EPOCHS: 7\n  WARMUP_EPOCHS: 1\n')
    write(tmp_path / 'left.yaml', "BASE: ['common.yaml']\nTAG: left\n")
    write(tmp_path / 'right.yaml', "BASE: ['common.yaml']\nSEED: 3\n")
    config = get_config(args_for(write(tmp_path / 'top.yaml', "BASE: ['left.yaml', 'right.yaml']\n")))
    assert (config.TRAIN.EPOCHS, config.TAG, config.SEED) == (7, 'left', 3)


def test_base_given_as_one_string_names_that_file(tmp_path):
    write(tmp_path / 'x.yaml', 'TRAIN:\n  EPOCHS: 7\n  WARMUP_EPOCHS: 1\n')
    config = get_config(args_for(write(tmp_path / 'child.yaml', "BASE: 'x.yaml'\nTAG: child\n")))
    assert (config.TRAIN.EPOCHS, config.TAG) == (7, 'child')


def test_missing_base_names_the_file_that_names_it(tmp_path):
    cfg = write(tmp_path / 'child.yaml', "BASE: 'nowhere.yaml'\n")
    with pytest.raises(ConfigError, match=rf"config file not found: {tmp_path / 'nowhere.yaml'} "
                                          rf"\(named in BASE of {cfg}\)"):
        get_config(args_for(cfg))


@pytest.mark.parametrize('content, message', [
    (b'PK\x03\x04\x14\x00\x00\x00\x08\x00\xa3\x88', 'is not a YAML text file'),       # a .pth checkpoint
    (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR', 'is not a YAML text file'),
    (b'TRAIN:\n  EPOCHS: 3\x00\n', 'is not a YAML text file (byte 18: special characters'),
    (b'42\n', 'holds a YAML int, not a mapping of config keys'),
    (b'focal_tiny\n', 'holds a YAML str, not a mapping of config keys'),
    (b'- TRAIN.EPOCHS\n- 3\n', 'holds a YAML list, not a mapping of config keys'),
    (b"BASE: [3]\n", 'BASE must be a list of config file names, got [3]'),
    (b"BASE: {a: b}\n", 'BASE must be a list of config file names'),
    (b'1: 2\n', "config keys are names, got '1'"),
    (b'TRAIN:\n  7: 2\n', "config keys are names, got 'TRAIN.7'"),
    (b'MODEL: 3\n', 'MODEL is a section of keys (TYPE, NAME, RESUME, ...), got 3'),
    (b'TRAIN:\n  BASE_LR: null\n', 'TRAIN.BASE_LR must be a number, got null'),
    (b'DATA:\n  NUM_WORKERS: ~\n', 'DATA.NUM_WORKERS must be an integer, got null'),
    (b'TRAIN:\n  EPOCHS: 2021-01-01\n', 'TRAIN.EPOCHS must be an integer, got datetime.date(2021, 1, 1)'),
    (b'TRAIN:\n  BASE_LR: fast\n', "TRAIN.BASE_LR must be a number, got 'fast'"),
    (b'TRAIN:\n  AUTO_RESUME: 1\n', 'TRAIN.AUTO_RESUME must be true or false, got 1'),
])
def test_config_file_that_is_not_a_mapping_of_keys_is_one_error_naming_the_file(tmp_path, content, message):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        get_config(args_for(str(cfg)))
    assert str(error.value).startswith(str(cfg)) and message in str(error.value)
    assert '\n' not in str(error.value)


def test_config_folder_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=f'config file {tmp_path} is a folder'):
        get_config(args_for(str(tmp_path)))


def test_numbers_yaml_reads_as_strings_or_ints_are_taken_as_floats(tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string; an int where a float belongs means that float."""
    cfg = write(tmp_path / 'c.yaml', 'TRAIN:\n  BASE_LR: 1e-3\n  WEIGHT_DECAY: 0\nMODEL:\n  DROP_PATH_RATE: 0\n')
    config = get_config(args_for(cfg, '--opts', 'TRAIN.MIN_LR', '0'))
    assert (config.TRAIN.BASE_LR, config.TRAIN.WEIGHT_DECAY, config.MODEL.DROP_PATH_RATE, config.TRAIN.MIN_LR) == \
        (1e-3, 0.0, 0.0, 0.0)
    assert all(isinstance(value, float) for value in (config.TRAIN.BASE_LR, config.TRAIN.MIN_LR))


def test_opts_reach_free_form_timm_kwargs_and_refuse_base(tmp_path):
    cfg = write(tmp_path / 'c.yaml', 'MODEL:\n  TYPE: timm\n  TIMM:\n    NAME: resnet10t\n')
    config = get_config(args_for(cfg, '--opts', 'MODEL.TIMM.KWARGS.stem_width', '16'))
    assert dict(config.MODEL.TIMM.KWARGS) == {'stem_width': 16}
    with pytest.raises(ConfigError, match='--opts cannot set BASE'):
        get_config(args_for(cfg, '--opts', 'BASE', "['x.yaml']"))
    with pytest.raises(ConfigError, match=r'--opts: TRAIN is a section of keys'):
        get_config(args_for(cfg, '--opts', 'TRAIN', '3'))


def test_empty_config_says_that_the_defaults_run(tmp_path):
    cfg = write(tmp_path / 'empty.yaml', '# nothing yet\n')
    level, line = defaults_note(get_config(args_for(cfg, '--data-path', '/data')), cfg)
    assert level == logging.WARNING
    assert line == (f"config {cfg}: values other than config.py's defaults: DATA.DATA_PATH '/data'. The model "
                    f"and training recipe are all config.py's defaults: focal_tiny_patch4_window7_224 for 300 "
                    f"epochs; is {cfg} the config you meant?")


def test_config_note_lists_the_values_that_are_not_defaults(tmp_path):
    cfg = write(tmp_path / 'c.yaml', 'TRAIN:\n  EPOCHS: 30\n  WARMUP_EPOCHS: 20\nMODEL:\n  FOCAL:\n'
                                     '    DEPTHS: [2, 2, 2, 2]\n')
    level, line = defaults_note(get_config(args_for(cfg, '--opts', 'TRAIN.EPOCHS', '40')), cfg)
    assert level == logging.INFO
    assert line == f"config {cfg}: values other than config.py's defaults: MODEL.FOCAL.DEPTHS [2, 2, 2, 2], " \
                   f"TRAIN.EPOCHS 40"


# --- Values out of range: one rule per key, checked at start-up --------------------------------

@pytest.mark.parametrize('key, value, message', [
    ('DATA.NUM_WORKERS', '-1', 'DATA.NUM_WORKERS must be an integer >= 0, got -1'),
    ('TRAIN.BASE_LR', '-1.0', 'TRAIN.BASE_LR must be a number >= 0, got -1.0'),
    ('TRAIN.BASE_LR', 'nan', 'TRAIN.BASE_LR must be a number >= 0, got nan'),
    ('TRAIN.MIN_LR', '-0.000001', 'TRAIN.MIN_LR must be a number >= 0'),
    ('TRAIN.WEIGHT_DECAY', '-0.05', 'TRAIN.WEIGHT_DECAY must be a number >= 0'),
    ('TRAIN.CLIP_GRAD', '-1.0', 'TRAIN.CLIP_GRAD must be a number >= 0'),
    ('TRAIN.EPOCHS', '0', 'TRAIN.EPOCHS must be an integer >= 1, got 0'),
    ('TRAIN.WARMUP_EPOCHS', '-1', 'TRAIN.WARMUP_EPOCHS must be an integer >= 0'),
    ('TRAIN.START_EPOCH', '300', 'TRAIN.START_EPOCH must be below TRAIN.EPOCHS (300), got 300'),
    ('TRAIN.MAX_NONFINITE_STEPS', '0', 'TRAIN.MAX_NONFINITE_STEPS must be an integer >= 1'),
    ('TRAIN.ACCUMULATION_STEPS', '-2', 'TRAIN.ACCUMULATION_STEPS must be an integer >= 0'),
    ('TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '0', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be an integer >= 1'),
    ('TRAIN.LR_SCHEDULER.DECAY_RATE', '0.0', 'TRAIN.LR_SCHEDULER.DECAY_RATE must be a number in (0, 1]'),
    ('TRAIN.OPTIMIZER.EPS', '0.0', 'TRAIN.OPTIMIZER.EPS must be a number > 0'),
    ('TRAIN.OPTIMIZER.BETAS', '[0.9, 1.0]', 'TRAIN.OPTIMIZER.BETAS must be 2 numbers in [0, 1), got (0.9, 1.0)'),
    ('TRAIN.OPTIMIZER.BETAS', '[0.9]', 'TRAIN.OPTIMIZER.BETAS must be 2 numbers in [0, 1)'),
    ('TRAIN.OPTIMIZER.MOMENTUM', '-0.9', 'TRAIN.OPTIMIZER.MOMENTUM must be a number in [0, 1)'),
    ('TRAIN.EMA.DECAY', '1.0', 'TRAIN.EMA.DECAY must be a number in [0, 1)'),
    ('MODEL.LABEL_SMOOTHING', '1.0', 'MODEL.LABEL_SMOOTHING must be a number in [0, 1)'),
    ('AUG.REPROB', '1.5', 'AUG.REPROB must be a probability in [0, 1]'),
    ('AUG.RECOUNT', '0', 'AUG.RECOUNT must be an integer >= 1'),
    ('AUG.MIXUP', '-0.8', 'AUG.MIXUP must be a number >= 0'),
    ('AUG.CUTMIX', '-1.0', 'AUG.CUTMIX must be a number >= 0'),
    ('AUG.MIXUP_PROB', '2.0', 'AUG.MIXUP_PROB must be a probability in [0, 1]'),
    ('AUG.MIXUP_SWITCH_PROB', '-0.5', 'AUG.MIXUP_SWITCH_PROB must be a probability in [0, 1]'),
    ('AUG.COLOR_JITTER', '-0.4', 'AUG.COLOR_JITTER must be a number >= 0'),
    ('AUG.CUTMIX_MINMAX', '[0.8, 0.2]', 'AUG.CUTMIX_MINMAX must be null or [low, high] with 0 <= low < high <= 1'),
    ('AUG.REMODE', "'blur'", "AUG.REMODE must be one of ['const', 'rand', 'pixel']"),
    ('AUG.AUTO_AUGMENT', "'rand-x9'", "AUG.AUTO_AUGMENT 'rand-x9' is not a policy timm reads"),
    ('AUG.AUTO_AUGMENT', "'autoaug'", "AUG.AUTO_AUGMENT 'autoaug' is not a policy timm reads"),
    ('DATA.DEMO.IMAGE_SIZE', '0', 'DATA.DEMO.IMAGE_SIZE must be an integer >= 1'),
    ('DATA.DEMO.TRAIN_PER_CLASS', '0', 'DATA.DEMO.TRAIN_PER_CLASS must be an integer >= 1'),
    ('SEED', str(2 ** 64), 'SEED must be an integer in [-9223372036854775808, 9223372036854775807]'),
    ('PRINT_FREQ', '0', 'PRINT_FREQ must be an integer >= 1'),
    ('MODEL.FOCAL.IN_CHANS', '1', 'MODEL.FOCAL.IN_CHANS must be 3, the RGB images the data loader gives'),
])
def test_value_out_of_range_is_a_config_error_naming_the_key(tmp_path, key, value, message):
    cfg = write(tmp_path / 'c.yaml', '')
    with pytest.raises(ConfigError) as error:
        get_config(args_for(cfg, '--opts', key, value))
    assert str(error.value).startswith(message)


def test_every_numeric_key_has_a_range_here_or_in_the_model():
    """The whole class: a numeric key added without a rule fails this test. The model's keys are
    the arguments `models.build` passes to FocalTransformer, whose constructor checks them."""
    model_keys = set(FAST_ARGUMENT_KEYS.values()) | set(TIMM_ARGUMENT_KEYS.values())
    unused = {'LOCAL_RANK'}
    for key, value in config._leaves(config.get_defaults()):
        items = value if isinstance(value, (list, tuple)) else [value]
        if items and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items):
            assert key in config._NUMBERS or key in model_keys or key in unused, key


# --- Architecture: the model's own checks, reported with the config key -----------------------

ARCHITECTURE_MISTAKES = [
    ('MODEL.DROP_PATH_RATE', '1.5', 'MODEL.DROP_PATH_RATE must lie in [0, 1), got 1.5'),
    ('MODEL.DROP_RATE', '2.0', 'MODEL.DROP_RATE must lie in [0, 1), got 2.0'),
    ('MODEL.DROP_RATE', '-0.1', 'MODEL.DROP_RATE must lie in [0, 1)'),
    ('MODEL.NUM_CLASSES', '-1', 'MODEL.NUM_CLASSES must be an integer >= 0'),
    ('MODEL.FOCAL.NUM_HEADS', '[3, 6, 12]', 'MODEL.FOCAL.NUM_HEADS has 3 entries, one per stage of '
                                            'MODEL.FOCAL.DEPTHS (4)'),
    ('MODEL.FOCAL.NUM_HEADS', '[3, 0, 12, 24]', 'MODEL.FOCAL.NUM_HEADS[1] = 0 does not divide'),
    ('MODEL.FOCAL.DEPTHS', '[2, 0, 6, 2]', 'MODEL.FOCAL.DEPTHS must be one positive integer per stage'),
    ('MODEL.FOCAL.DEPTHS', "[2, 'a', 6, 2]", 'MODEL.FOCAL.DEPTHS must be one positive integer per stage'),
    ('MODEL.FOCAL.EMBED_DIM', '0', 'MODEL.FOCAL.EMBED_DIM must be an integer >= 1'),
    ('MODEL.FOCAL.PATCH_SIZE', '0', 'MODEL.FOCAL.PATCH_SIZE must be an integer >= 1'),
    ('MODEL.FOCAL.WINDOW_SIZE', '0', 'MODEL.FOCAL.WINDOW_SIZE must be an integer >= 1'),
    ('MODEL.FOCAL.MLP_RATIO', '0.0', 'MODEL.FOCAL.MLP_RATIO must be a positive number'),
    ('MODEL.FOCAL.FOCAL_LEVELS', '[2, 0, 2, 2]', 'MODEL.FOCAL.FOCAL_LEVELS must be integers >= 1'),
    ('MODEL.FOCAL.FOCAL_WINDOWS', '[7, -1, 3, 1]', 'MODEL.FOCAL.FOCAL_WINDOWS must be odd positive integers'),
    ('MODEL.FOCAL.EXPAND_SIZES', '[3, -1, 3, 3]', 'MODEL.FOCAL.EXPAND_SIZES must be integers >= 0'),
    ('MODEL.FOCAL.FOCAL_POOL', "'avg'", 'MODEL.FOCAL.FOCAL_POOL must be one of'),
    ('MODEL.FOCAL.EXPAND_LAYER', "'some'", 'MODEL.FOCAL.EXPAND_LAYER must be one of'),
    ('DATA.IMG_SIZE', '16', 'DATA.IMG_SIZE 16 is too small: with MODEL.FOCAL.PATCH_SIZE 4 and 4 stages'),
    ('MODEL.TYPE', 'focalv2', 'MODEL.FOCAL.FOCAL_TOPK', '0', 'MODEL.FOCAL.FOCAL_TOPK must be a positive integer'),
    ('MODEL.TYPE', 'focalv2', 'MODEL.FOCAL.NUM_HEADS', '[3, 0, 12, 24]', 'MODEL.FOCAL.NUM_HEADS[1] = 0 does not'),
]


@pytest.mark.parametrize('mistake', ARCHITECTURE_MISTAKES)
def test_architecture_mistake_is_the_models_error_worded_with_the_config_key(mistake):
    """One place per rule: the config error is the constructor's ValueError, its argument names
    replaced by the config keys they come from. (Config key-value pairs, then the message.)"""
    *opts, message = mistake
    config = get_defaults()
    merge_overrides(config, opts)
    with pytest.raises(ValueError) as model_error:
        FOCAL_MODELS[config.MODEL.TYPE](**focal_kwargs_from_config(config))
    with pytest.raises(ConfigError) as config_error:
        validate_config(config)
    assert str(config_error.value) == in_config_terms(config, str(model_error.value))
    assert str(config_error.value).startswith(message)


def test_timm_drop_rates_are_checked_before_the_model_is_built(tmp_path):
    cfg = write(tmp_path / 't.yaml', 'MODEL:\n  TYPE: timm\n  DROP_PATH_RATE: 1.5\n  TIMM:\n    NAME: resnet10t\n')
    with pytest.raises(ConfigError, match=r'^MODEL.DROP_PATH_RATE must lie in \[0, 1\), got 1.5'):
        get_config(args_for(cfg))


def test_model_error_that_names_no_argument_keeps_its_traceback(monkeypatch):
    """A ValueError from inside the model code that is not about an argument is a bug."""
    def broken(**kwargs):
        raise ValueError('a bug in the model code')

    monkeypatch.setitem(models_build.FOCAL_MODELS, 'focal', broken)
    models_build._check_focal_arguments.cache_clear()
    with pytest.raises(ValueError, match='a bug in the model code'):
        validate_config(get_defaults())
    models_build._check_focal_arguments.cache_clear()
