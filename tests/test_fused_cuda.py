"""The fused kernel compiled for a GPU (skipped without CUDA): full-size Focal-T/S/B stage shapes
against SDPA in fp32 and bf16, bitwise repeatable backward, and a Focal-T training step.

    python -m pytest -q tests/test_fused_cuda.py
"""
import pytest
import timm
import torch

import models  # noqa: F401  (registers the focal_* models with timm)
from models.focal_attention import focal_attention
from models.focal_attention.fused import triton_unavailable_reason

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU'),
              pytest.mark.skipif(triton_unavailable_reason() is not None, reason=str(triton_unavailable_reason()))]
CUDA = torch.device('cuda')


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def stage_case(model_name: str, stage: int, batch: int, dtype: torch.dtype, img_size: int = 224):
    torch.manual_seed(stage)
    model = timm.create_model(model_name, num_classes=0).to(CUDA)
    block = model.layers[stage].blocks[-1]
    size = img_size // 4 // 2 ** stage
    layout = block.layout(size, size, CUDA)
    channels, num_pooled = block.attn.dim, layout.zero_token - layout.num_fine
    qkv = torch.randn(batch, layout.num_fine, 3 * channels, device=CUDA, dtype=dtype, requires_grad=True)
    pooled = torch.randn(batch, num_pooled, 2 * channels, device=CUDA, dtype=dtype, requires_grad=True)
    bias = (block.attn.position_bias().detach() + torch.randn_like(block.attn.position_bias())).requires_grad_()
    grad_out = torch.randn(batch, layout.num_fine, channels, device=CUDA, dtype=dtype)
    return (qkv, pooled, bias, layout, block.attn.num_heads, block.attn.scale), grad_out


def run(case, grad_out, backend):
    qkv, pooled, bias, layout, num_heads, scale = case
    out = focal_attention(qkv, pooled, bias, layout, num_heads, scale, backend=backend)
    return [out, *torch.autograd.grad(out, [qkv, pooled, bias], grad_out)]


@pytest.mark.parametrize('model_name', ['focal_tiny_patch4_window7_224', 'focal_base_patch4_window7_224'])
@pytest.mark.parametrize('stage', [0, 1, 2, 3])
@pytest.mark.parametrize('dtype, tolerance', [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_fused_matches_sdpa_at_full_size(model_name, stage, dtype, tolerance):
    torch.backends.cuda.matmul.allow_tf32 = False
    case, grad_out = stage_case(model_name, stage, 4, dtype)
    reference = run(case, grad_out, 'sdpa')
    fused = run(case, grad_out, 'fused')
    for what, value, expected in zip(('out', 'dqkv', 'dpooled', 'dbias'), fused, reference):
        assert torch.isfinite(value).all(), what
        assert relative_error(value, expected) < tolerance, what


def test_fused_backward_is_bitwise_repeatable():
    torch.use_deterministic_algorithms(True)
    try:
        case, grad_out = stage_case('focal_tiny_patch4_window7_224', 0, 8, torch.bfloat16)
        first, second = run(case, grad_out, 'fused'), run(case, grad_out, 'fused')
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize('compiled', [False, True])
def test_focal_tiny_training_step_matches_sdpa(compiled):
    torch.manual_seed(0)
    model = timm.create_model('focal_tiny_patch4_window7_224', num_classes=10).to(CUDA)
    images = torch.randn(8, 3, 224, 224, device=CUDA)
    grads = {}
    for backend in ('sdpa', 'fused'):
        model.set_attn_backend(backend)
        model.zero_grad()
        runner = torch.compile(model) if compiled else model
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = runner(images).float().logsumexp(1).mean()
        loss.backward()
        grads[backend] = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    for name, grad in grads['fused'].items():
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, grads['sdpa'][name]) < 5e-2, name
