"""`exporting()` tells a trace for deployment (torch.export, torch.jit tracing) from a torch.compile
trace on every supported torch: dynamo answers `torch.compiler.is_exporting()` with True inside
every torch.compile trace on torch 2.7 to 2.11, which made a compiled model asked for the fused
kernel run SDPA without a word."""
import pytest
import torch
from torch import nn

from conftest import MICRO_FOCAL
from models import FocalTransformer
from models.focal_attention import backends_in_use, exporting
from models.focal_attention.fused import interpreter_unavailable_reason

# Strict torch.export marks its dynamo pass as exporting from torch 2.8 on (backends.exporting).
STRICT_EXPORT_SEEN = torch.torch_version.TorchVersion(torch.__version__) >= '2.8'


class ExportingProbe(nn.Module):
    """x + 1 where `exporting()` held while the forward was traced (or run), else x - 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if exporting() else x - 1


TRACERS = {
    'eager': lambda module, x: module,
    'torch.compile': lambda module, x: torch.compile(module, backend='eager', fullgraph=True),
    'torch.export': lambda module, x: torch.export.export(module, (x,), strict=False).module(),
    'torch.export strict': lambda module, x: torch.export.export(module, (x,), strict=True).module(),
    'torch.jit.trace': lambda module, x: torch.jit.trace(module, (x,), check_trace=False),  # Python runs x - 1
}
EXPORTS = {'eager': False, 'torch.compile': False, 'torch.export': True, 'torch.export strict': True,
           'torch.jit.trace': True}


@pytest.mark.parametrize('tracer', TRACERS)
def test_exporting_holds_under_export_and_tracing_only(tracer):
    if tracer == 'torch.export strict' and not STRICT_EXPORT_SEEN:
        pytest.skip(f'torch {torch.__version__} sets no flag in the dynamo pass of strict export (2.8 and later do)')
    x = torch.zeros(2)
    torch._dynamo.reset()
    traced = TRACERS[tracer](ExportingProbe(), x)
    assert torch.equal(traced(x), x + 1 if EXPORTS[tracer] else x - 1), f'exporting() under {tracer}'


@pytest.mark.slow
def test_compiled_model_runs_the_fused_kernel_it_asked_for_and_exports_sdpa():
    """What ran, read from the model: the fused kernel in a torch.compile graph where its kernels can
    run here (Triton's interpreter; not Triton 3.0 and 3.1 under NumPy 2), SDPA in a torch.export
    graph everywhere."""
    model = FocalTransformer(**MICRO_FOCAL, attn_backend='fused').eval()
    images = torch.randn(1, 3, 32, 32)
    expected = {'fused'} if interpreter_unavailable_reason() is None else {'sdpa'}
    with torch.no_grad():
        model(images)  # layouts and backend choices exist after one eager forward
        assert backends_in_use(model) == expected
        for module in model.modules():
            if hasattr(module, 'backend_record'):
                module.backend_record.name = None
        torch._dynamo.reset()
        torch.compile(model, backend='eager', fullgraph=True)(images)
    assert backends_in_use(model) == expected

    torch.export.export(model, (images,), strict=False)
    assert backends_in_use(model) == {'sdpa'}
