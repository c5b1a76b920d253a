"""The focal attention package: the fused Triton kernel (run by Triton's CPU interpreter here)
computes what the SDPA reference computes, forward and every gradient; backends are chosen and
logged as documented; layouts are shared, bounded and usable after inference mode."""
import logging

import pytest
import torch

from conftest import MICRO_EVERY_KEY_KIND
from models import FocalBackbone, FocalTransformer
from models.focal_attention import (FocalGeometry, clear_layout_cache, focal_attention,
                                    layout_cache_stats, window_layout)
from models.focal_attention import geometry
from models.focal_attention import fused
from models.focal_attention.fused import interpreter_unavailable_reason, triton_unavailable_reason

CPU = torch.device('cpu')


runs_fused_kernel = pytest.mark.skipif(interpreter_unavailable_reason() is not None,
                                       reason=f'the fused kernel cannot run here: {interpreter_unavailable_reason()}')


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)).item()


def attention_inputs(geometry_args: dict, height: int, width: int, num_heads: int, head_dim: int, batch: int,
                     dtype: torch.dtype):
    layout = window_layout(height, width, FocalGeometry(**geometry_args), CPU)
    channels = num_heads * head_dim
    num_pooled = layout.zero_token - layout.num_fine
    qkv = torch.randn(batch, layout.num_fine, 3 * channels, dtype=dtype, requires_grad=True)
    pooled_kv = torch.randn(batch, num_pooled, 2 * channels, dtype=dtype, requires_grad=True) if num_pooled else None
    bias = torch.randn(num_heads, layout.window_area, layout.num_keys, requires_grad=True)
    grad_out = torch.randn(batch, layout.num_fine, channels, dtype=dtype)
    return layout, qkv, pooled_kv, bias, grad_out


def run_backend(backend: str, layout, qkv, pooled_kv, bias, grad_out, num_heads: int):
    """Output and gradients of qkv, pooled keys/values and position bias."""
    scale = (qkv.shape[-1] // 3 // num_heads) ** -0.5
    out = focal_attention(qkv, pooled_kv, bias, layout, num_heads, scale, backend=backend)
    inputs = [qkv, bias] + ([pooled_kv] if pooled_kv is not None else [])
    return (out,) + torch.autograd.grad(out, inputs, grad_out)


GEOMETRIES = {
    # name: (FocalGeometry arguments, map height, width, heads, head dim, batch)
    'window only (16 keys: one fp32 key block)': (dict(window_size=4, expand_size=0, focal_window=1,
                                                       num_pooled_levels=0, shift_size=0), 8, 8, 2, 16, 2),
    'one level, no pooling': (dict(window_size=4, expand_size=1, focal_window=3, num_pooled_levels=0, shift_size=0),
                              8, 8, 2, 16, 2),
    'two levels, shifted': (dict(window_size=4, expand_size=1, focal_window=3, num_pooled_levels=1, shift_size=2),
                            8, 12, 2, 16, 2),
    'three levels, padded map': (dict(window_size=4, expand_size=2, focal_window=3, num_pooled_levels=2,
                                      shift_size=0), 10, 7, 1, 32, 2),
    'no expansion, odd head size': (dict(window_size=4, expand_size=0, focal_window=1, num_pooled_levels=1,
                                         shift_size=1), 8, 8, 3, 24, 1),
    'map no larger than the window': (dict(window_size=5, expand_size=0, focal_window=1, num_pooled_levels=1,
                                           shift_size=0), 5, 5, 2, 16, 3),
    'window 7, expand 3, shifted (Focal-T stage 1 keys)': (dict(window_size=7, expand_size=3, focal_window=7,
                                                               num_pooled_levels=1, shift_size=3), 14, 14, 1, 32, 1),
    'window 9 (128-query blocks), shifted': (dict(window_size=9, expand_size=1, focal_window=1, num_pooled_levels=1,
                                                  shift_size=4), 9, 18, 1, 16, 1),
}


# The larger geometries take 1.5-2.5 s each under the interpreter: the fast loop leaves them out and keeps
# the others, which have every kind of key group (surroundings, pooled keys, shift, 128-query blocks).
LARGER_GEOMETRIES = ('two levels, shifted', 'three levels, padded map',
                     'window 7, expand 3, shifted (Focal-T stage 1 keys)')


@runs_fused_kernel
@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow) if name in LARGER_GEOMETRIES else name
                                  for name in GEOMETRIES])
def test_fused_kernel_matches_sdpa_forward_and_every_gradient_in_float32(name):
    geometry_args, height, width, num_heads, head_dim, batch = GEOMETRIES[name]
    torch.manual_seed(0)
    inputs = attention_inputs(geometry_args, height, width, num_heads, head_dim, batch, torch.float32)
    reference = run_backend('sdpa', *inputs, num_heads)
    fused = run_backend('fused', *inputs, num_heads)
    for what, value, expected in zip(('output', 'qkv grad', 'bias grad', 'pooled grad'), fused, reference):
        assert relative_error(value, expected) < 1e-5, what


@pytest.mark.slow
@runs_fused_kernel
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_fused_kernel_matches_sdpa_in_half_precision(dtype):
    """Both backends in 16 bits lie as close to the fp32 reference."""
    geometry_args, height, width, num_heads, head_dim, batch = GEOMETRIES['two levels, shifted']
    torch.manual_seed(0)
    inputs = attention_inputs(geometry_args, height, width, num_heads, head_dim, batch, torch.float32)
    exact = run_backend('sdpa', *inputs, num_heads)
    layout, qkv, pooled_kv, bias, grad_out = inputs
    low = [t.detach().to(dtype).requires_grad_() for t in (qkv, pooled_kv)]
    for backend in ('sdpa', 'fused'):
        result = run_backend(backend, layout, low[0], low[1], bias, grad_out.to(dtype), num_heads)
        assert result[0].dtype == dtype
        for what, value, expected in zip(('output', 'qkv grad', 'bias grad', 'pooled grad'), result, exact):
            assert relative_error(value, expected) < 3e-2, (backend, what)


def test_an_interpreter_that_stores_nothing_is_reported_and_not_used(monkeypatch):
    """Triton 3.0's interpreter under NumPy 2 runs kernels without storing anything: the fused
    backend says so for CPU inputs instead of returning uninitialised memory."""
    class StoresNothing:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setattr(fused, '_interpreter_probe_kernel', StoresNothing())
    fused._interpreter_fault.cache_clear()
    try:
        layout, qkv, *_ = attention_inputs(GEOMETRIES['one level, no pooling'][0], 8, 8, 2, 16, 1, torch.float32)
        reason = fused.unavailable_reason(qkv, layout, 2, 0.)
    finally:
        fused._interpreter_fault.cache_clear()
    assert reason is not None and 'interpreter stores nothing' in reason


@pytest.mark.slow
@runs_fused_kernel
def test_a_planted_kernel_bug_is_caught(monkeypatch):
    """The comparison above fails when the kernel leaves out one mask term (tokens of a shifted
    window stop being masked from other image regions)."""
    geometry_args, height, width, num_heads, head_dim, batch = GEOMETRIES['two levels, shifted']
    torch.manual_seed(0)
    inputs = attention_inputs(geometry_args, height, width, num_heads, head_dim, batch, torch.float32)
    reference = run_backend('sdpa', *inputs, num_heads)
    from models.focal_attention import triton_kernels
    monkeypatch.setattr(triton_kernels, 'MASKED_LOG2', 0.0)
    planted = run_backend('fused', *inputs, num_heads)
    assert relative_error(planted[0], reference[0]) > 1e-3


@pytest.mark.slow
@runs_fused_kernel
def test_fused_backward_is_bitwise_repeatable_in_deterministic_mode():
    geometry_args, height, width, num_heads, head_dim, batch = GEOMETRIES['three levels, padded map']
    torch.manual_seed(0)
    inputs = attention_inputs(geometry_args, height, width, num_heads, head_dim, batch, torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (run_backend('fused', *inputs, num_heads) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def model_output_and_gradients(model: FocalTransformer, images: torch.Tensor, backend: str):
    model.set_attn_backend(backend)
    model.zero_grad()
    out = model(images)
    out.square().mean().backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.slow
@runs_fused_kernel
def test_fused_model_gives_the_sdpa_model_output_and_every_parameter_gradient():
    """A micro model with shift, padding (36x40 input), 1-2 pooled levels, expand 0-2 and a last
    stage no larger than its window: every parameter (qkv/proj, the three kinds of position table,
    pooling layers) gets the reference gradient."""
    torch.manual_seed(0)
    model = FocalTransformer(**MICRO_EVERY_KEY_KIND)
    images = torch.randn(2, 3, 36, 40)
    reference, reference_grads = model_output_and_gradients(model, images, 'sdpa')
    fused, fused_grads = model_output_and_gradients(model, images, 'fused')
    assert relative_error(fused, reference) < 1e-5
    kinds = ['relative_position_bias_table', '_to_neighbors', '_to_windows', 'pool_layers', 'attn.qkv', 'attn.proj']
    assert all(any(kind in name for name in fused_grads) for kind in kinds)
    for name, grad in fused_grads.items():
        assert relative_error(grad, reference_grads[name]) < 1e-4, name


@pytest.mark.slow
@runs_fused_kernel
def test_compiled_fused_model_trains_with_the_eager_gradients_in_one_graph():
    """The custom op stays inside a fullgraph torch.compile graph (layouts exist after one eager
    forward) and its registered backward gives the eager gradients: the graphs dynamo and AOT
    autograd trace for inductor, run without its code generation (inductor itself:
    test_focal_transformer.py; with the compiled kernel on a GPU: scripts/gpu_checks.sh)."""
    torch.manual_seed(0)
    model = FocalTransformer(**{**MICRO_EVERY_KEY_KIND, 'depths': [1, 1, 1, 1]}, attn_backend='fused')
    images = torch.randn(2, 3, 32, 32)
    _, eager = model_output_and_gradients(model, images, 'fused')
    model.zero_grad()
    torch._dynamo.reset()  # other tests' compiled models would make parameter shapes dynamic
    torch.compile(model, fullgraph=True, backend='aot_eager')(images).square().mean().backward()
    for name, p in model.named_parameters():
        assert relative_error(p.grad, eager[name]) < 1e-5, name


@runs_fused_kernel
def test_backends_share_one_checkpoint():
    torch.manual_seed(0)
    sdpa_model = FocalTransformer(**MICRO_EVERY_KEY_KIND, attn_backend='sdpa').eval()
    fused_model = FocalTransformer(**MICRO_EVERY_KEY_KIND, attn_backend='fused').eval()
    fused_model.load_state_dict(sdpa_model.state_dict())
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(fused_model(images), sdpa_model(images)) < 1e-5


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        FocalTransformer(**MICRO_EVERY_KEY_KIND, attn_backend='flash')


def test_auto_runs_sdpa_on_the_cpu_and_says_so_once(fresh_choices, caplog):
    model = FocalTransformer(**MICRO_EVERY_KEY_KIND).eval()
    with caplog.at_level(logging.INFO, logger='models.focal_attention'), torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))
    lines = [r.getMessage() for r in caplog.records if r.name == 'models.focal_attention']
    assert len(lines) == 1 and 'SDPA' in lines[0] and (triton_unavailable_reason() or 'needs CUDA') in lines[0]


@pytest.mark.parametrize('setting, reason', [('interpreter off', 'needs CUDA'), ('dropout', 'attention dropout')])
def test_fused_falls_back_to_sdpa_with_one_warning(setting, reason, fresh_choices, monkeypatch, caplog):
    torch.manual_seed(0)
    if setting == 'interpreter off':
        monkeypatch.setenv('TRITON_INTERPRET', '0')
        model = FocalTransformer(**MICRO_EVERY_KEY_KIND, attn_backend='fused').eval()
    else:
        model = FocalTransformer(**MICRO_EVERY_KEY_KIND, attn_backend='fused', attn_drop_rate=0.5).train()
    images = torch.randn(1, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger='models.focal_attention'):
        torch.manual_seed(1)
        fallback = model(images)
        model(images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    reason = triton_unavailable_reason() or reason
    assert len(warnings) == 1 and reason in warnings[0] and 'using SDPA' in warnings[0]
    model.set_attn_backend('sdpa')
    torch.manual_seed(1)
    assert torch.equal(fallback, model(images))


def test_blocks_of_one_geometry_share_one_layout():
    clear_layout_cache()
    model = FocalTransformer(**{**MICRO_EVERY_KEY_KIND, 'depths': [1, 3, 1, 1], 'use_shift': False}).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert layout_cache_stats()[0] == 4  # one per stage
    blocks = model.layers[1].blocks
    assert blocks[0].layout(4, 4, CPU) is blocks[2].layout(4, 4, CPU)


def test_many_input_sizes_keep_the_layout_cache_bounded(monkeypatch):
    clear_layout_cache()
    monkeypatch.setattr(geometry, 'MAX_CACHED_LAYOUTS', 6)
    model = FocalTransformer(**{**MICRO_EVERY_KEY_KIND, 'depths': [1, 1, 1, 1]}).eval()
    with torch.no_grad():
        for size in range(32, 96, 8):
            model(torch.randn(1, 3, size, size))
            assert layout_cache_stats()[0] <= 6
    clear_layout_cache()


def test_layouts_hold_no_dense_mask():
    """At a detection size the cached index maps of Focal-T's first stage stay small: a dense
    (windows, queries, keys) float mask alone would take 63 MB."""
    clear_layout_cache()
    layout = window_layout(200, 336, FocalGeometry(7, 3, 7, 1, 0), CPU)
    assert layout.num_windows * layout.window_area * layout.num_keys * 4 > 60e6
    assert layout.nbytes() < 6e6
    clear_layout_cache()


def test_classifier_trains_after_a_first_forward_under_inference_mode():
    clear_layout_cache()
    model = FocalTransformer(**MICRO_EVERY_KEY_KIND)
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 32, 32))
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_backbone_trains_after_a_first_forward_under_inference_mode():
    clear_layout_cache()
    kwargs = {k: v for k, v in MICRO_EVERY_KEY_KIND.items() if k not in ('num_classes', 'img_size')}
    backbone = FocalBackbone(img_size=64, **kwargs)
    with torch.inference_mode():
        backbone.eval()(torch.randn(1, 3, 64, 64))
    outputs = backbone.train()(torch.randn(1, 3, 64, 64))
    sum(o.sum() for o in outputs.values()).backward()
    assert backbone.body.patch_embed.proj.weight.grad is not None
