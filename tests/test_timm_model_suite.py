"""timm's own model tests on every model this project registers with timm.

timm checks its models with one file, `tests/test_models.py` of pytorch-image-models; the source
archive of each timm release on PyPI holds it. This test takes the archive of the installed timm
(`pip download --no-deps --no-binary :all: timm==VERSION` into `.cache/timm-tests/VERSION/`, once),
applies `CHANGES` to the file and runs it in a pytest process of its own with `timm_suite_plugin`,
which selects the tests of the project's models and gives them stand-in released checkpoints.
No test code of timm's is kept in the project. A test of timm's that fails, errs or skips fails
this test, and so does an archive that cannot be had.
"""
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Tuple

import pytest
import timm

from conftest import REPO_ROOT, launcher_env
from timm_suite_plugin import project_models

pytestmark = pytest.mark.slow
ARCHIVES = os.path.join(REPO_ROOT, '.cache', 'timm-tests')
TEST_FILE = 'tests/test_models.py'
# timm's tests that every project model must pass, and those a model with a released checkpoint (a
# release address in a cfg of its own: the Focal variants) must pass too. timm's filters decide the
# rest: the Swin ablation variant, without a cfg of its own, has no backward tests, nor (timm 1.0.9)
# a cfg test.
EVERY_MODEL_TESTS = ('test_model_forward', 'test_model_forward_features', 'test_model_forward_intermediates_features',
                     'test_model_forward_intermediates', 'test_model_forward_fx')
RELEASED_MODEL_TESTS = ('test_model_default_cfgs', 'test_model_backward', 'test_model_backward_fx',
                        'test_model_load_pretrained', 'test_model_features_pretrained')


def timm_test_file() -> str:
    """The text of `tests/test_models.py` in the installed timm's source archive."""
    folder = os.path.join(ARCHIVES, timm.__version__)
    archive = os.path.join(folder, f'timm-{timm.__version__}.tar.gz')
    if not os.path.exists(archive):
        result = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
                                 f'timm=={timm.__version__}', '-d', folder], capture_output=True, text=True)
        if result.returncode:
            reason = (result.stderr.strip() or result.stdout.strip() or 'no output').splitlines()[-1]
            pytest.fail(f'cannot download the source archive of timm {timm.__version__}, which holds its model '
                        f'tests: {reason} (or put timm-{timm.__version__}.tar.gz from PyPI into {folder})')
    with tarfile.open(archive) as files:
        return files.extractfile(f'timm-{timm.__version__}/{TEST_FILE}').read().decode()


def project_modules() -> List[str]:
    """The module names timm's registry gives the project's models (e.g. 'focal_transformer')."""
    return sorted({timm.models.model_entrypoint(name).__module__.rsplit('.', 1)[-1] for name in project_models()})


# The changes to timm's file, as (its text, the replacement, why): each text must occur once there.
CHANGES: List[Tuple[str, str, str]] = [
    ('FEAT_INTER_FILTERS = [\n', 'FEAT_INTER_FILTERS = [\n    ' + ''.join(f'{m!r}, ' for m in project_modules()) + '\n',
     "the forward_intermediates tests take the models of the modules this list names: the project's join"),
]


def changed_test_file() -> str:
    text = timm_test_file()
    for old, new, why in CHANGES:
        if text.count(old) != 1:
            pytest.fail(f'timm {timm.__version__} {TEST_FILE} holds {old!r} {text.count(old)} times, not once: '
                        f'the change "{why}" no longer applies')
        text = text.replace(old, new)
    return text


def outcomes(junit_xml: str) -> Dict[Tuple[str, str], str]:
    """(timm's test, project model) -> 'passed', 'failure', 'error' or 'skipped', from pytest's report."""
    models = set(project_models())
    result = {}
    for case in ElementTree.parse(junit_xml).iter('testcase'):
        test, params = case.get('name')[:-1].split('[', 1)
        model, = models.intersection(params.split('-'))
        kinds = [child.tag for child in case if child.tag in ('failure', 'error', 'skipped')]
        result[test, model] = kinds[0] if kinds else 'passed'
    return result


def test_timm_model_tests_pass_for_every_project_model(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'test_models.py').write_text(changed_test_file())
    (run / 'pytest.ini').write_text('[pytest]\n')  # not the project's pytest settings
    env = launcher_env()  # one thread: the tests' ops are small (inputs of 32 px), threads wait on each other
    env['PYTHONPATH'] = os.path.join(REPO_ROOT, 'tests') + os.pathsep + env['PYTHONPATH']  # the plugin
    env.pop('GITHUB_ACTIONS', None)  # there timm's file leaves its pretrained tests out
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'timm_suite_plugin',
         '--stand-in-checkpoints', str(tmp_path / 'hub'), '--junitxml', str(tmp_path / 'report.xml'),
         '-W', 'ignore::pytest.PytestUnknownMarkWarning', 'test_models.py'],
        cwd=run, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    assert result.returncode == 0, f'timm {timm.__version__} model tests ({seconds:.0f} s):\n{result.stdout[-30000:]}'
    ran = outcomes(str(tmp_path / 'report.xml'))
    assert all(outcome == 'passed' for outcome in ran.values()), {k: v for k, v in ran.items() if v != 'passed'}
    released = set(timm.list_models(pretrained=True))
    for model in project_models():
        expected = EVERY_MODEL_TESTS + (RELEASED_MODEL_TESTS if model in released else ())
        assert [test for test in expected if (test, model) not in ran] == [], model
    print(f'timm {timm.__version__} model tests: {len(ran)} passed for {len(project_models())} models '
          f'in {seconds:.0f} s')
