"""Which backend runs focal attention: 'auto' picks the fused kernel only on verified GPU
architectures (devices are described to the chooser through `backends.gpu_architecture`), a backend
is chosen once per geometry, device and kind of input and logged once, and a model tells which
backends its attention modules ran, compiled or not."""
import logging

import pytest
import torch

from conftest import MICRO_32PX
from models import FocalTransformer
from models.focal_attention import backends, backends_in_use, clear_backend_choices
from models.focal_attention.backends import GpuArchitecture
from models.focal_attention.fused import interpreter_unavailable_reason as fused_interpreter_fault

FUSED_RUNS_HERE = fused_interpreter_fault() is None  # on the CPU: under TRITON_INTERPRET=1 (conftest)
pytestmark = pytest.mark.usefixtures('fresh_choices')


def describe_device_as(monkeypatch, capability):
    """Every device is, to the chooser, a GPU of this compute capability."""
    monkeypatch.setattr(backends, 'gpu_architecture', lambda device: GpuArchitecture('Test GPU', capability))


def run_and_log(model: FocalTransformer, caplog, images: torch.Tensor, times: int = 2) -> list:
    with caplog.at_level(logging.INFO, logger='models.focal_attention'), torch.no_grad():
        for _ in range(times):
            model(images)
    return [r.getMessage() for r in caplog.records if r.name == 'models.focal_attention']


@pytest.mark.parametrize('capability, listed', [((9, 0), False), ((8, 6), False), ((7, 5), True), ((7, 0), True)],
                         ids=['sm_90 unverified', 'sm_86 unverified', 'sm_75 listed', 'sm_70 listed'])
def test_auto_on_an_unverified_or_pre_sm80_gpu_runs_sdpa_and_says_once_how_to_opt_in(
        capability, listed, monkeypatch, caplog):
    describe_device_as(monkeypatch, capability)
    if listed:  # below sm_80, even a listed measurement does not make 'auto' pick the kernel
        monkeypatch.setitem(backends.VERIFIED_ARCHITECTURES, capability, 'docs/benchmarks.md: a test entry')
    model = FocalTransformer(**MICRO_32PX).eval()
    lines = run_and_log(model, caplog, torch.randn(1, 3, 32, 32))
    assert backends_in_use(model) == {'sdpa'}
    assert len(lines) == 1 and 'SDPA' in lines[0], lines
    if FUSED_RUNS_HERE:
        sm = f'sm_{capability[0]}{capability[1]}'
        assert sm in lines[0] and ('below sm_80' in lines[0]) == (capability < (8, 0)), lines[0]
        assert "MODEL.FOCAL.ATTN_BACKEND fused (attn_backend='fused')" in lines[0]
        assert ('bash scripts/gpu_checks.sh all' in lines[0]) == (capability >= (8, 0))  # how to verify
    else:  # opting in would not help: the line says why the kernel cannot run
        assert fused_interpreter_fault() in lines[0]


@pytest.mark.skipif(not FUSED_RUNS_HERE, reason=f'the fused kernel cannot run here: {fused_interpreter_fault()}')
def test_auto_on_a_verified_gpu_runs_the_fused_kernel(monkeypatch, caplog):
    describe_device_as(monkeypatch, (9, 0))
    monkeypatch.setitem(backends.VERIFIED_ARCHITECTURES, (9, 0), 'docs/benchmarks.md: a test entry')
    torch.manual_seed(0)
    model = FocalTransformer(**MICRO_32PX).eval()
    images = torch.randn(1, 3, 32, 32)
    lines = run_and_log(model, caplog, images, times=1)
    fused = model(images)
    assert backends_in_use(model) == {'fused'}
    assert len(lines) == 1 and 'fused Triton kernel (verified on sm_90: docs/benchmarks.md: a test entry)' in lines[0]
    model.set_attn_backend('sdpa')
    with torch.no_grad():
        torch.testing.assert_close(fused.detach(), model(images), rtol=1e-5, atol=1e-5)
    assert backends_in_use(model) == {'sdpa'}


def test_a_backend_is_chosen_once_per_geometry_device_and_kind_of_input(monkeypatch):
    """Two input sizes (two layouts per geometry) cost no second choice; another dtype does."""
    asked = []
    monkeypatch.setattr(backends, 'gpu_architecture', lambda device: asked.append(device) or None)
    model = FocalTransformer(**{**MICRO_32PX, 'depths': [2, 1, 1, 1], 'use_shift': True}).eval()
    geometries = {block.geometry for stage in model.layers for block in stage.blocks}
    assert len(geometries) == 5
    with torch.no_grad():
        for size in (32, 40):
            model(torch.randn(1, 3, size, size))
        assert len(asked) == len(geometries)
        model.double()(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert len(asked) == 2 * len(geometries)


@pytest.mark.slow
def test_compiled_model_records_the_backend_it_ran_in_one_graph():
    model = FocalTransformer(**MICRO_32PX, attn_backend='sdpa').eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(images)  # layouts and choices exist after one eager forward
        for module in model.modules():
            if hasattr(module, 'backend_record'):
                module.backend_record.name = None
        torch._dynamo.reset()
        torch.compile(model, backend='eager', fullgraph=True)(images)
    assert backends_in_use(model) == {'sdpa'}


def test_backends_in_use_reads_each_module():
    model = FocalTransformer(**MICRO_32PX, attn_backend='sdpa').eval()
    assert backends_in_use(model) == set()  # nothing ran yet
    model.layers[3].blocks[0].attn.attn_backend = 'fused'
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert backends_in_use(model) == ({'sdpa', 'fused'} if FUSED_RUNS_HERE else {'sdpa'})


def test_a_fused_kernel_that_fails_on_the_gpu_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    """What a GPU's first run of the kernels finds (a launch beyond the block's shared memory, or a
    result unlike SDPA's) makes 'fused', and a verified 'auto', run SDPA and say why."""
    failure = 'OutOfResources: out of resource: shared memory, Required: 149504, Hardware limit: 101376'
    monkeypatch.setattr(backends.fused, 'launch_failure', lambda qkv, layout, num_heads: failure)
    monkeypatch.setattr(backends.fused, 'unavailable_reason', lambda *args, **kwargs: None)
    describe_device_as(monkeypatch, (9, 0))
    monkeypatch.setitem(backends.VERIFIED_ARCHITECTURES, (9, 0), 'docs/benchmarks.md: a test entry')
    for requested in ('fused', 'auto'):
        clear_backend_choices()
        caplog.clear()
        model = FocalTransformer(**MICRO_32PX, attn_backend=requested).eval()
        lines = run_and_log(model, caplog, torch.randn(1, 3, 32, 32))
        assert backends_in_use(model) == {'sdpa'}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == len(set(lines) & set(warnings)) == 3, lines  # one per geometry (3 here)
        assert all(failure in line and 'SDPA' in line for line in warnings), warnings


@pytest.mark.skipif(fused_interpreter_fault() is not None, reason=f'the interpreter cannot run it: '
                                                                  f'{fused_interpreter_fault()}')
def test_the_gpu_probe_passes_the_kernels_and_catches_a_wrong_result(monkeypatch):
    """`probe_failure`, the body of a GPU's first-run check, run on the CPU under the interpreter."""
    from models.focal_attention import FocalGeometry, fused, window_layout
    layout = window_layout(8, 8, FocalGeometry(4, 1, 3, 1, 2), torch.device('cpu'))
    assert fused.probe_failure(torch.device('cpu'), torch.float32, layout, 2, 32) is None
    correct = fused.fused_focal_attention
    monkeypatch.setattr(fused, 'fused_focal_attention', lambda *args: 1.5 * correct(*args))
    assert 'output differs from SDPA' in fused.probe_failure(torch.device('cpu'), torch.float32, layout, 2, 32)
