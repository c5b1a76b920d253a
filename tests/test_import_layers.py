"""The import layers, without cycles: the model package imports no top-level module of the project
(no config, no checkpoint I/O); data imports only utils (not config); config imports data and utils,
and `models` only when it validates a config. So importing config or data defines no Triton kernel:
Triton reads TRITON_INTERPRET when a kernel is defined (triton_interpreter.py). The Triton package
itself is loaded by timm and torchvision (through torch._dynamo), whatever the project imports."""
import ast
import glob
import json
import os
import subprocess
import sys
from typing import Dict, Set

import pytest

from conftest import REPO_ROOT

TOP_LEVEL = sorted({os.path.basename(path)[:-len('.py')] for path in glob.glob(os.path.join(REPO_ROOT, '*.py'))}
                   | {os.path.basename(os.path.dirname(path))
                      for path in glob.glob(os.path.join(REPO_ROOT, '*', '__init__.py'))})
KERNELS = 'models.focal_attention.triton_kernels'
# The project's top-level modules each package may import, anywhere in its code.
ALLOWED = {'models': set(), 'data': {'utils'}}


def project_imports(package: str) -> Dict[str, Set[str]]:
    """The top-level modules of the project (other than `package`) each file of `package` imports,
    function-level imports included."""
    found = {}
    for path in glob.glob(os.path.join(REPO_ROOT, package, '**', '*.py'), recursive=True):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split('.')[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split('.')[0])
        found[os.path.relpath(path, REPO_ROOT)] = names & set(TOP_LEVEL) - {package}
    return found


def loaded_after_importing(module: str) -> set:
    """The names in sys.modules after `import module` in a fresh interpreter."""
    code = 'import importlib, json, sys; importlib.import_module(sys.argv[1]); print(json.dumps(list(sys.modules)))'
    result = subprocess.run([sys.executable, '-c', code, module], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_project_has_the_top_level_modules_this_test_knows():
    assert {'models', 'data', 'config', 'checkpoint', 'utils', 'main', 'triton_interpreter'} <= set(TOP_LEVEL)
    assert 'models/focal_backbone.py' in project_imports('models')


@pytest.mark.parametrize('package', sorted(ALLOWED))
def test_a_package_imports_only_the_modules_below_it(package):
    beyond = {path: names - ALLOWED[package] for path, names in project_imports(package).items()
              if names - ALLOWED[package]}
    assert not beyond, f'{package} may import only {sorted(ALLOWED[package])} of the project'


@pytest.mark.slow
@pytest.mark.parametrize('module', ['config', 'data'])
def test_importing_config_or_data_loads_no_model_code_and_defines_no_kernel(module):
    loaded = loaded_after_importing(module)
    assert {name for name in TOP_LEVEL if name in loaded} <= {module, 'data', 'utils'}
    assert 'models' not in loaded and KERNELS not in loaded
