"""A pytest plugin that points timm's own model tests (`tests/test_models.py` of timm's source
archive) at this project's models: `tests/test_timm_model_suite.py` runs that file in a pytest
process of its own with `-p timm_suite_plugin --stand-in-checkpoints DIR`.

  * `import models` registers the project's models with timm before the file is collected.
  * Of the file's tests, those of a project model run (a `model_name` parameter that
    `project_models` gives) that timm's own CI runs, one job per marker (`CI_MARKERS`: all of its
    markers but 'torchscript'), and the two pretrained-loading tests, which timm's CI leaves out
    for their downloads (`PRETRAINED_TESTS`).
  * Pretrained weights come from stand-in released checkpoints: for a model's release address, a
    file of the release's name in DIR, where torch.hub looks before it downloads, holding zeros of
    the model's shapes (the tests check loading, not values). timm's loading path (the checkpoint
    filter, then its `in_chans` and head adaptation) runs as for a real download.
"""
import os
from typing import List
from urllib.parse import urlparse

import timm
import torch

import models  # noqa: F401  (registers the project's models with timm)

CI_MARKERS = ('base', 'cfg', 'forward', 'backward', 'features', 'fxforward', 'fxbackward')
PRETRAINED_TESTS = ('test_model_load_pretrained', 'test_model_features_pretrained')


def project_models() -> List[str]:
    """Every model this project registers with timm: those whose entry point lives in `models`."""
    return [name for name in timm.list_models()
            if timm.models.model_entrypoint(name).__module__.split('.')[0] == models.__name__]


def pytest_addoption(parser):
    parser.addoption('--stand-in-checkpoints', required=True,
                     help='folder for the stand-in released checkpoints (torch.hub reads them from there)')


def pytest_configure(config):
    torch.hub.set_dir(config.getoption('--stand-in-checkpoints'))


def pytest_collection_modifyitems(config, items):
    names = set(project_models())

    def selected(item) -> bool:
        callspec = getattr(item, 'callspec', None)
        if callspec is None or callspec.params.get('model_name') not in names:
            return False
        return item.originalname in PRETRAINED_TESTS or any(item.get_closest_marker(m) for m in CI_MARKERS)

    config.hook.pytest_deselected(items=[item for item in items if not selected(item)])
    items[:] = [item for item in items if selected(item)]


def pytest_runtest_setup(item):
    if item.originalname in PRETRAINED_TESTS:
        write_stand_in_checkpoint(item.callspec.params['model_name'])


def write_stand_in_checkpoint(name: str) -> None:
    """The file torch.hub would download for `name`'s release address, unless it is there."""
    file_name = os.path.basename(urlparse(timm.get_pretrained_cfg(name).url).path)
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', file_name)
    if not os.path.exists(path):
        with torch.device('meta'):
            shapes = timm.create_model(name).state_dict()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({'model': {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}}, path)
