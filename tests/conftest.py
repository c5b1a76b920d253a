"""Shared pieces of the tests: the micro Focal Transformers (as constructor arguments for model
tests, as a YAML config for training runs), tiny generated datasets, an in-process `main.py`
runner, one trained micro run per session and the `slow` marker. Test files import these names
from `conftest`."""
import contextlib
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, Iterator, List, Optional

import pytest
import torch

from triton_interpreter import use_interpreter_without_cuda

# Without a GPU, Triton kernels (the fused focal attention) run under Triton's CPU interpreter:
# decided before the kernels are defined, i.e. before `models` is imported.
use_interpreter_without_cuda()

from config import get_defaults  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: seconds or more a test (a subprocess or torchrun, an end-to-end run of a script, an '
                   'export, torch.compile, the kernel compile, timm\'s suite, a full-size model): the fast '
                   'loop `pytest -m "not slow" tests` leaves it out, the default run (and CI) runs it')


# A four-stage Focal Transformer small enough for a CPU test: FocalTransformer(**MICRO_FOCAL),
# or as config keys `micro_focal_config()`.
MICRO_FOCAL = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], drop_path_rate=0.0)
# ... with two focal levels and a 10-class head: the model tests' classifier, and its Focal-fast
# form with the released models' K and convolutional embedding.
MICRO_CLASSIFIER = dict(MICRO_FOCAL, focal_levels=[2, 2, 2, 2], num_classes=10)
MICRO_FAST_CLASSIFIER = dict(MICRO_CLASSIFIER, focal_topK=128, use_conv_embed=True)
# Micro models of the attention tests, each keeping the geometries its tests count or need:
# at 32 px with 4 px windows, three block geometries (five with depths [2, 1, 1, 1] and shift);
MICRO_32PX = dict(img_size=32, window_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                  focal_levels=[2, 2, 2, 2], focal_windows=[3, 1, 1, 1], expand_sizes=[1, 1, 0, 0], num_classes=3,
                  drop_path_rate=0.0)
# every kind of key and position table: shift, 1-2 pooled levels, expand 0-2 and a last stage no
# larger than its window;
MICRO_EVERY_KEY_KIND = dict(img_size=32, window_size=4, embed_dim=32, depths=[1, 2, 1, 1], num_heads=[2, 2, 2, 2],
                            focal_levels=[2, 3, 2, 2], focal_windows=[3, 3, 1, 1], expand_sizes=[1, 2, 1, 0],
                            use_shift=True, focal_pool='fc', num_classes=5, drop_path_rate=0.0)
# at 64 px, a second block in stage 0 that shifts, with surroundings and pooled keys.
MICRO_64PX_SHIFTED = dict(img_size=64, embed_dim=16, depths=[2, 1, 1, 1], num_heads=[1, 2, 2, 2], focal_levels=[2] * 4,
                          focal_windows=[3] * 4, expand_sizes=[3] * 4, use_shift=True, focal_pool='fc', num_classes=5,
                          drop_path_rate=0.0)


def micro_focal_config():
    """The default config (unfrozen) with the architecture of MICRO_FOCAL."""
    config = get_defaults()
    config.MODEL.FOCAL.EMBED_DIM = MICRO_FOCAL['embed_dim']
    config.MODEL.FOCAL.DEPTHS = list(MICRO_FOCAL['depths'])
    config.MODEL.FOCAL.NUM_HEADS = list(MICRO_FOCAL['num_heads'])
    config.MODEL.DROP_PATH_RATE = MICRO_FOCAL['drop_path_rate']
    return config

# The micro config of end-to-end runs of main.py (32 px, 10 classes, no augmentation to speak of).
MICRO_FOCAL_YAML = """
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 8
  NUM_WORKERS: 0
  PIN_MEMORY: False
MODEL:
  TYPE: focal
  NAME: micro_focal
  NUM_CLASSES: 10
  DROP_PATH_RATE: 0.0
  FOCAL:
    EMBED_DIM: 16
    DEPTHS: [1, 1, 1, 1]
    NUM_HEADS: [1, 1, 2, 2]
    WINDOW_SIZE: 4
    FOCAL_POOL: "fc"
    FOCAL_LEVELS: [2, 2, 2, 2]
    FOCAL_WINDOWS: [3, 1, 1, 1]
    EXPAND_SIZES: [1, 1, 1, 1]
TRAIN:
  EPOCHS: 1
  WARMUP_EPOCHS: 0
  BASE_LR: 1.0e-3
AUG:
  AUTO_AUGMENT: none
  REPROB: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
PRINT_FREQ: 2
"""


def write_micro_config(folder: str, extra_yaml: str = '') -> str:
    """`micro.yaml` in `folder`: `extra_yaml` on top of the micro config (through `BASE:`, so
    that a section in `extra_yaml` adds to the micro one instead of replacing it)."""
    with open(os.path.join(folder, 'micro_base.yaml'), 'w') as f:
        f.write(MICRO_FOCAL_YAML)
    path = os.path.join(folder, 'micro.yaml')
    with open(path, 'w') as f:
        f.write("BASE: ['micro_base.yaml']\n" + extra_yaml)
    return path


def write_tiny_dataset(root: str, train_per_class: int = 4, val_per_class: int = 3) -> str:
    """10 classes of 32 px demo images in the ImageNet folder layout."""
    from data.demo import write_demo_dataset
    write_demo_dataset(root, 32, train_per_class, val_per_class, seed=1)
    return root


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> str:
    """`write_tiny_dataset` once per test session (tests must not modify it)."""
    return write_tiny_dataset(str(tmp_path_factory.mktemp('data') / 'tiny'))


def run_main(args: List[str]) -> int:
    """`main.py` in this process (no interpreter start-up), forced onto the CPU."""
    import main
    return main.main(args + ['--device', 'cpu'])


def read_metrics(run_dir: str) -> List[dict]:
    """The records of a run folder's metrics.jsonl, every line strict JSON (a bare NaN or
    Infinity fails, as does a line cut short)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, tiny_data) -> dict:
    """One finished one-epoch micro run of `tiny_data` (tests must not modify it): its config
    file, the epoch's checkpoint (in <root>/out/micro_focal/default) and its metrics record."""
    root = tmp_path_factory.mktemp('trained')
    cfg = write_micro_config(str(root))
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', str(root / 'out')]) == 0
    run_dir = root / 'out' / 'micro_focal' / 'default'
    [metrics] = read_metrics(str(run_dir))
    return dict(cfg=cfg, checkpoint=str(run_dir / 'ckpt_epoch_0.pth'), metrics=metrics)


@contextlib.contextmanager
def interrupted_at_epoch(epoch: int) -> Iterator[None]:
    """A user's Ctrl-C as training would start `epoch`: inside the block main.train_one_epoch raises
    KeyboardInterrupt there, and the block must end with it."""
    import main
    real_train_one_epoch = main.train_one_epoch

    def interrupted(**kwargs):
        if kwargs['epoch'] == epoch:
            raise KeyboardInterrupt
        return real_train_one_epoch(**kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(main, 'train_one_epoch', interrupted)
        yield


def launcher_env() -> Dict[str, str]:
    """This process's environment for a Python process it launches (`main.py`, timm's model
    tests): the repository first on `PYTHONPATH`, ahead of (not instead of) the paths already
    there, which may be where the packages come from; one thread per process (two share the CPU)
    and no GPU."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
    env.pop('CUDA_VISIBLE_DEVICES', None)
    return env


def run_main_subprocess(launcher: List[str], args: List[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """`main.py` under a launcher (`torchrun ...`) on the CPU. After `timeout` seconds the
    launcher is stopped with SIGTERM, on which it stops its workers (they run in sessions of
    their own, out of reach of a kill of the launcher's group), and the run returns as failed
    with what it printed. Output goes through files: a worker left behind holding a pipe
    would block the read."""
    with tempfile.TemporaryFile('w+') as stdout, tempfile.TemporaryFile('w+') as stderr:
        process = subprocess.Popen([sys.executable, '-m'] + launcher + ['main.py'] + args + ['--device', 'cpu'],
                                   cwd=REPO_ROOT, env=launcher_env(), stdout=stdout, stderr=stderr, text=True)
        note = ''
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            note = f'\n[stopped after {timeout} s]'
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout.read(), stderr.read() + note)


def load_checkpoint(path: str) -> dict:
    """Checkpoints must load with `weights_only=True`."""
    return torch.load(path, map_location='cpu', weights_only=True)


def error_line(capsys) -> str:
    """The run's stderr, checked to end in one `error:` line and to hold no traceback."""
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith('error: '), err
    return last


# The shipped configs (files starting with '_' are partial bases that the others inherit) and the
# reproduction scripts with a DRY_RUN mode (common.sh is sourced by them; gpu_checks.sh runs tests
# and benchmarks on a GPU).
SHIPPED_CONFIGS = sorted(os.path.relpath(path, REPO_ROOT).replace(os.sep, '/')
                         for path in glob.glob(os.path.join(REPO_ROOT, 'configs', '**', '*.yaml'), recursive=True)
                         if not os.path.basename(path).startswith('_'))
REPRODUCTION_SCRIPTS = sorted(os.path.basename(path) for path in glob.glob(os.path.join(REPO_ROOT, 'scripts', '*.sh'))
                              if os.path.basename(path) not in ('common.sh', 'gpu_checks.sh'))


def dry_run_commands(script: str, **env: str) -> List[List[str]]:
    """The commands `scripts/<script>` prints with DRY_RUN=1 (its `+ ...` lines, shell-quoted by
    common.sh's `run`), as argument lists."""
    result = subprocess.run(['bash', os.path.join(REPO_ROOT, 'scripts', script)], cwd=REPO_ROOT,
                            env=dict(os.environ, DRY_RUN='1', **env), capture_output=True, text=True)
    assert result.returncode == 0, f"DRY_RUN=1 bash scripts/{script} failed:\n{result.stderr}"
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith('+ ')]


def main_arguments(command: List[str]) -> Optional[List[str]]:
    """The arguments a printed command passes to main.py, or None if it does not run main.py."""
    return command[command.index('main.py') + 1:] if 'main.py' in command else None


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: micro models run their ops on tiny tensors, where threads
    cost more than they save; on a CPU shared with other processes, two threads of small ops wait on
    each other (a scaled-down model's training step took 10-20 times longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_choices():
    """No attention backend chosen (nor its choice logged) before the test, nor left after it."""
    from models.focal_attention import clear_backend_choices
    clear_backend_choices()
    yield
    clear_backend_choices()
