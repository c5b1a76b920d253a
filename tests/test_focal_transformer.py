"""The Focal Transformer model: official equivalence, parameter layout, checkpoint adaptation,
input sizes, index maps against the torch ops the official code uses, compile and timm."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models  # noqa: F401  (registers the timm variants)
from timm.models import adapt_input_conv

from conftest import MICRO_CLASSIFIER, MICRO_FAST_CLASSIFIER, MICRO_FOCAL
from models import FocalFastTransformer, FocalTransformer, checkpoint_filter_fn
from models.focal_attention import pooled_key_size, pooled_neighbourhood, surrounding_offsets

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / 'tests' / 'data' / 'golden'
GOLDEN_NAMES = ['default224', 'shift224', 'conv224', 'res256', 'global_only']


def load_golden(name: str) -> dict:
    return torch.load(GOLDEN / f'{name}.pt', weights_only=True)


def golden_model(name: str, **overrides) -> FocalTransformer:
    golden = load_golden(name)
    model = FocalTransformer(**{**golden['config'], **overrides}).eval()
    model.load_state_dict(checkpoint_filter_fn(golden['state_dict'], model), strict=True)
    return model


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the official `forward_features` returns: (B, C) pooled, normed features."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


@pytest.mark.parametrize('name', GOLDEN_NAMES)
def test_released_checkpoint_matches_official_features(name):
    golden = load_golden(name)
    model = golden_model(name)
    with torch.no_grad():
        final_map = model.forward_features(golden['input'])
        features = model.forward_head(final_map, pre_logits=True)
        logits = model.forward_head(final_map)
    side = golden['input'].shape[-1] // 32
    assert final_map.shape == (2, side, side, golden['features'].shape[1])  # (B, H, W, C), timm's convention
    assert (features - golden['features']).abs().max() < 1e-4
    assert (logits - golden['logits']).abs().max() < 1e-4


@pytest.mark.parametrize('variant, official_m', [
    ('focal_tiny_patch4_window7_224', 28.88), ('focal_small_patch4_window7_224', 51.14),
    ('focal_base_patch4_window7_224', 89.82)])
def test_parameter_counts_equal_official(variant, official_m):
    with torch.device('meta'):
        model = timm.create_model(variant)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == official_m


def test_parameter_names_and_shapes_equal_official_learnables():
    golden = load_golden('default224')
    official = {k: v.shape for k, v in golden['state_dict'].items()
                if not any(b in k for b in ('relative_position_index', 'valid_ind', 'attn_mask'))}
    ours = {k: v.shape for k, v in FocalTransformer(**golden['config']).state_dict().items()}
    assert ours == official


def test_pre_norm_sits_only_in_the_downsampling_embeddings_as_official():
    names = FocalTransformer(**MICRO_CLASSIFIER, use_pre_norm=True).state_dict()
    pre_norms = sorted({k.rsplit('.', 1)[0] for k in names if '.pre_norm.' in k})
    assert pre_norms == ['layers.0.downsample.pre_norm', 'layers.1.downsample.pre_norm', 'layers.2.downsample.pre_norm']


def test_filter_accepts_wrapped_prefixed_checkpoints():
    golden = load_golden('default224')
    wrapped = {'model': {f'module.{k}': v for k, v in golden['state_dict'].items()}, 'epoch': 3}
    model = FocalTransformer(**golden['config']).eval()
    model.load_state_dict(checkpoint_filter_fn(wrapped, model), strict=True)
    with torch.no_grad():
        assert (pooled_features(model, golden['input']) - golden['features']).abs().max() < 1e-4


def test_filter_reinitialises_head_of_another_class_count(caplog):
    golden = load_golden('default224')
    model = FocalTransformer(**{**golden['config'], 'num_classes': 7})
    init_head = model.head.weight.detach().clone()
    with caplog.at_level(logging.INFO):
        state = checkpoint_filter_fn(golden['state_dict'], model)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.head.weight, init_head)
    qkv_weight = golden['state_dict']['layers.0.blocks.0.attn.qkv.weight']
    assert torch.equal(model.layers[0].blocks[0].attn.qkv.weight, qkv_weight)
    assert 'head.weight' in caplog.text and 're-initialised' in caplog.text


def test_filter_resizes_position_tables_of_another_window(caplog):
    golden = load_golden('default224')
    model = FocalTransformer(**{**golden['config'], 'window_size': 9, 'img_size': 288})
    with caplog.at_level(logging.INFO):
        state = checkpoint_filter_fn(golden['state_dict'], model)
    model.load_state_dict(state, strict=True)
    key = 'layers.0.blocks.0.attn.relative_position_bias_table'
    old = golden['state_dict'][key]
    assert old.shape == (13 * 13, 1) and state[key].shape == (17 * 17, 1)
    expected = F.interpolate(old.t().reshape(1, 1, 13, 13), size=(17, 17), mode='bicubic', align_corners=False)
    assert torch.allclose(state[key], expected.reshape(1, -1).t())
    assert 'resized from (169, 1) to (289, 1)' in caplog.text
    assert 'relative_position_bias_table_to_neighbors' in caplog.text and 'kept at init' in caplog.text
    assert 'layers.0.blocks.0.pool_layers.0.weight resized from (1, 49) to (1, 81)' in caplog.text


def test_filter_keeps_tables_the_checkpoint_lacks(caplog):
    """A 224 checkpoint has no surroundings table in stage 4 (7x7 map = window); a 256 model does."""
    golden = load_golden('default224')
    model = FocalTransformer(**{**golden['config'], 'img_size': 256})
    key = 'layers.3.blocks.0.attn.relative_position_bias_table_to_neighbors'
    assert key not in golden['state_dict']
    init = model.state_dict()[key].clone()
    with caplog.at_level(logging.INFO):
        model.load_state_dict(checkpoint_filter_fn(golden['state_dict'], model), strict=True)
    assert torch.equal(model.state_dict()[key], init)
    assert f'checkpoint lacks {key}: kept at init' in caplog.text


def test_filter_rejects_another_architecture():
    golden = load_golden('default224')
    model = FocalTransformer(**{**golden['config'], 'depths': [1, 1, 3, 1]})
    with pytest.raises(ValueError, match=r'architecture: missing: layers\.2\.blocks\.2\.'):
        checkpoint_filter_fn(golden['state_dict'], model)
    other_width = FocalTransformer(**{**golden['config'], 'embed_dim': 32})
    with pytest.raises(ValueError, match=r'shape mismatch: patch_embed\.proj\.weight'):
        checkpoint_filter_fn(golden['state_dict'], other_width)


def test_image_size_only_sets_parameter_shapes():
    """A 256-built model fed 288 computes what a 288-built model with the same weights computes."""
    built_256 = golden_model('res256')
    built_288 = FocalTransformer(**{**load_golden('res256')['config'], 'img_size': 288}).eval()
    built_288.load_state_dict(built_256.state_dict(), strict=True)
    images = torch.randn(1, 3, 288, 288)
    with torch.no_grad():
        assert torch.allclose(built_256(images), built_288(images), atol=1e-5)
        assert built_256(torch.randn(1, 3, 320, 320)).shape == (1, 10)
        assert built_256(torch.randn(1, 3, 200, 136)).shape == (1, 10)


@pytest.mark.parametrize('options', [
    dict(), dict(focal_levels=[3, 3, 3, 3]), dict(focal_pool='mean'), dict(focal_pool='max'),
    dict(focal_pool='conv'), dict(focal_pool='none'), dict(expand_layer='even', depths=[2, 2, 2, 2]),
    dict(use_shift=True, depths=[2, 2, 2, 2]), dict(use_layerscale=True, ape=True),
    dict(use_conv_embed=True, use_pre_norm=True), dict(expand_sizes=[0, 0, 0, 0]), dict(expand_stages=[0, 1])])
def test_options_train_with_finite_gradients_at_several_sizes(options):
    torch.manual_seed(0)
    model = FocalTransformer(**{**MICRO_CLASSIFIER, 'img_size': 64, **options})
    for size in (64, 72):
        model.zero_grad()
        model(torch.randn(2, 3, size, size)).logsumexp(1).sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_expand_stages_and_layers_select_blocks_with_surroundings():
    model = FocalTransformer(**{**MICRO_CLASSIFIER, 'depths': [2, 2, 2, 2], 'expand_stages': [0, 2],
                                'expand_layer': 'odd'})
    surrounding = [[blk.attn.num_surrounding for blk in stage.blocks] for stage in model.layers]
    assert surrounding == [[132, 0], [0, 0], [132, 0], [0, 0]]


def test_keys_per_window_are_padded_for_fused_kernels():
    attn = FocalTransformer(**MICRO_CLASSIFIER).layers[0].blocks[0].attn
    assert attn.num_attended_keys == 49 + 132 + 49 and attn.num_keys == 232


@pytest.mark.parametrize('model_class, arguments', [(FocalTransformer, MICRO_CLASSIFIER),
                                                     (FocalFastTransformer, MICRO_FAST_CLASSIFIER)])
def test_gradient_checkpointing_gives_the_same_gradients(model_class, arguments):
    torch.manual_seed(0)
    model = model_class(**{**arguments, 'img_size': 64})
    images = torch.randn(2, 3, 64, 64)
    model(images).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    assert all(torch.allclose(r, p.grad, atol=1e-6) for r, p in zip(reference, model.parameters()))


def test_surroundings_follow_the_official_corner_rolls():
    """Key j of window (0, 0) after the official rolls and valid-index selection, on a map whose
    tokens are their own positions, equals our offsets (wrapped)."""
    ws, e, size = 7, 3, 14
    positions = torch.arange(size * size).view(size, size)
    keys = []
    for shift in ((-e, -e), (-e, e), (e, -e), (e, e)):
        rolled = torch.roll(positions, shifts=shift, dims=(0, 1))[:ws, :ws].flatten()
        keys.append(rolled)
    masks = []
    for rows, cols in ((slice(None, -e), slice(None, -e)), (slice(None, -e), slice(e, None)),
                       (slice(e, None), slice(None, -e)), (slice(e, None), slice(e, None))):
        mask = torch.ones(ws, ws)
        mask[rows, cols] = 0
        masks.append(mask.flatten())
    official = torch.cat(keys)[torch.cat(masks).nonzero().flatten()]
    offsets = surrounding_offsets(ws, e)
    ours = (offsets[:, 0] % size) * size + offsets[:, 1] % size
    assert offsets.shape[0] == 132 and torch.equal(ours, official)


@pytest.mark.parametrize('level, focal_window, grid', [(0, 7, (3, 4)), (0, 3, (2, 2)), (1, 5, (3, 2)), (2, 3, (2, 3))])
def test_pooled_neighbourhoods_follow_the_official_unfold(level, focal_window, grid):
    stride = 2 ** level
    kernel = 2 * (focal_window // 2) + 2 ** level + (2 ** level - 1)
    height, width = grid[0] * stride, grid[1] * stride
    positions = (torch.arange(height * width, dtype=torch.float64) + 1).view(1, 1, height, width)
    unfolded = nn.Unfold(kernel, stride=stride, padding=kernel // 2)(positions)[0].t()  # (nW, kernel^2)
    if level > 0:
        mask = torch.zeros(kernel, kernel)
        mask[2 ** level - 1:, 2 ** level - 1:] = 1
        unfolded = unfolded[:, mask.flatten().nonzero().flatten()]
    index, valid = pooled_neighbourhood(grid, focal_window, level)
    assert index.shape == (grid[0] * grid[1], pooled_key_size(focal_window, level) ** 2)
    assert torch.equal(valid, unfolded > 0)
    assert torch.equal((index + 1).double()[valid], unfolded[valid])


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = FocalTransformer(**{**MICRO_CLASSIFIER, 'img_size': 64, 'use_shift': True, 'depths': [2, 1, 1, 1]}).eval()
    images = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()  # other tests' compiled models would make parameter shapes dynamic
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model)(images)
    assert torch.allclose(eager, compiled, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_training_gives_eager_gradients_without_graph_breaks():
    """fullgraph=True: no graph break anywhere in the model once its layouts exist (the first
    forward at a new size builds them eagerly). Traced by dynamo and AOT autograd, the graphs
    inductor compiles, run without inductor's code generation (minutes of C++ compilation on a
    CPU: `test_torch_compile_matches_eager` covers inductor). The fused backend:
    tests/test_focal_attention.py."""
    torch.manual_seed(0)
    model = FocalTransformer(**{**MICRO_CLASSIFIER, 'img_size': 64, 'use_shift': True, 'attn_backend': 'sdpa'})
    images = torch.randn(2, 3, 64, 64)
    model(images).sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()  # other tests' compiled models would make parameter shapes dynamic
    torch.compile(model, fullgraph=True, backend='aot_eager')(images).sum().backward()
    assert all(torch.allclose(e, p.grad, atol=1e-5) for e, p in zip(eager, model.parameters()))


def test_bfloat16_autocast_runs_close_to_float32():
    model = golden_model('default224')
    images = load_golden('default224')['input']
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        features = pooled_features(model, images)
    assert features.dtype == torch.bfloat16
    assert (features.float() - load_golden('default224')['features']).abs().max() < 0.1


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_autocast_trains_with_finite_gradients(dtype):
    model = FocalTransformer(**MICRO_CLASSIFIER, img_size=64, use_shift=True, focal_pool='fc')
    with torch.autocast('cpu', dtype=dtype):
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.dtype == dtype
    F.cross_entropy(logits.float(), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_under_autocast_gathers_keys_in_the_autocast_dtype(monkeypatch):
    """CUDA autocast keeps LayerNorm outputs in fp32 while linear layers give bf16: keys and values
    must be gathered in bf16 (not promoted to fp32 by the zero key row, doubling the largest
    tensor of the layer) and reach attention in one dtype with the bias."""
    block = FocalTransformer(**MICRO_CLASSIFIER, img_size=64).layers[0].blocks[0].eval()
    x = torch.randn(2, 14, 14, 16)  # a padded map: two windows a side
    pooled = [block.pool(x, level) for level in range(block.attn.num_pooled_levels)]
    seen = []
    attention = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention',
                        lambda q, k, v, attn_mask, **kw: seen.append((q.dtype, k.dtype, v.dtype, attn_mask.dtype))
                        or attention(q, k, v, attn_mask=attn_mask, **kw))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = block.attn(x, pooled, block.layout(14, 14, x.device))
    assert seen == [(torch.bfloat16,) * 4]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_timm_create_model_loads_a_released_checkpoint_through_the_filter(tmp_path):
    golden = load_golden('default224')
    path = tmp_path / 'focal-micro.pth'
    torch.save({'model': golden['state_dict']}, path)
    config = {k: v for k, v in golden['config'].items() if k != 'img_size'}
    model = timm.create_model('focal_tiny_patch4_window7_224', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **config).eval()
    with torch.no_grad():
        assert (pooled_features(model, golden['input']) - golden['features']).abs().max() < 1e-4
    cfg = model.pretrained_cfg
    assert (cfg['interpolation'], cfg['crop_pct'], cfg['mean']) == ('bicubic', 0.875, (0.485, 0.456, 0.406))


@pytest.mark.parametrize('in_chans', [1, 4])
def test_timm_pretrained_file_loads_into_another_input_channel_count(tmp_path, in_chans):
    """The filter passes the 3-channel stem on; timm adapts it after the filter (adapt_input_conv:
    summed for 1 channel, repeated and rescaled for 4); every other weight loads as released."""
    golden = load_golden('default224')
    path = tmp_path / 'focal-micro.pth'
    torch.save({'model': golden['state_dict']}, path)
    config = {k: v for k, v in golden['config'].items() if k != 'img_size'}
    model = timm.create_model('focal_tiny_patch4_window7_224', pretrained=True, in_chans=in_chans,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **config).eval()
    stem = golden['state_dict']['patch_embed.proj.weight']
    assert torch.equal(model.patch_embed.proj.weight, adapt_input_conv(in_chans, stem))
    released = golden_model('default224')
    grey = golden['input'][:, :1]
    with torch.no_grad():
        if in_chans == 1:  # a grey image: what the released model gives on its RGB copy
            torch.testing.assert_close(model(grey), released(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
        else:
            assert model(grey.expand(-1, 4, -1, -1)).shape == (2, 10)
    rest = {k: v for k, v in model.state_dict().items() if k != 'patch_embed.proj.weight'}
    assert all(torch.equal(v, released.state_dict()[k]) for k, v in rest.items())


def test_global_pool_and_reset_classifier_follow_timm():
    model = FocalTransformer(**MICRO_CLASSIFIER, img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final_map = model.forward_features(images)
        assert final_map.shape == (2, 2, 2, model.num_features) and model.head_hidden_size == model.num_features
        assert torch.equal(model.forward_head(final_map, pre_logits=True), final_map.mean((1, 2)))
        model.reset_classifier(5, 'catavgmax')
        assert model.head_hidden_size == 2 * model.num_features and model(images).shape == (2, 5)
        concatenated = torch.cat([final_map.mean((1, 2)), final_map.amax((1, 2))], 1)
        torch.testing.assert_close(model.forward_head(final_map, pre_logits=True), concatenated)
        model.reset_classifier(0)  # keeps the pooling
        torch.testing.assert_close(model(images), concatenated)
        model.reset_classifier(0, '')
        assert torch.equal(model(images), final_map)
    unpooled = FocalTransformer(**{**MICRO_CLASSIFIER, 'num_classes': 0}, img_size=64, global_pool='').eval()
    assert unpooled(images).shape == (2, 2, 2, unpooled.num_features)


@pytest.mark.parametrize('name', ['focal_tiny_patch4_window7_224', 'focal_small_patch4_window7_224',
                                  'focal_base_patch4_window7_224', 'focal_tiny_useconv_patch4_window7_224',
                                  'focal_small_useconv_patch4_window7_224', 'focal_base_useconv_patch4_window7_224'])
def test_variants_are_registered_with_timm(name):
    assert name in timm.list_models('focal_*')
    file_name = name.replace('_patch4_window7_224', '-is224-ws7.pth').replace('_', '-')
    assert timm.get_pretrained_cfg(name).url == (
        'https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k/' + file_name)


def test_bad_constructor_arguments_name_the_problem():
    with pytest.raises(ValueError, match='focal_pool'):
        FocalTransformer(**MICRO_CLASSIFIER, focal_pool='avg')
    with pytest.raises(ValueError, match='expand_layer'):
        FocalTransformer(**MICRO_CLASSIFIER, expand_layer='some')
    with pytest.raises(ValueError, match='num_heads has 3 entries'):
        FocalTransformer(**{**MICRO_CLASSIFIER, 'num_heads': [1, 2, 4]})
    with pytest.raises(TypeError, match='not_an_argument'):  # not taken and ignored
        FocalTransformer(**MICRO_CLASSIFIER, not_an_argument=1)


def one_line_error(error: pytest.ExceptionInfo) -> str:
    assert '\n' not in str(error.value), str(error.value)
    return str(error.value)


def test_timm_users_mistakes_are_one_line_naming_the_argument():
    variant = 'focal_tiny_patch4_window7_224'
    with pytest.raises(ValueError) as error:
        timm.create_model(variant, img_size=16)
    assert one_line_error(error).startswith('img_size 16 is too small') and '32 px or more' in str(error.value)
    with pytest.raises(ValueError) as error:
        timm.create_model(variant, global_pool='token', **MICRO_FOCAL)
    assert one_line_error(error).startswith("global_pool must be one of ('', 'avg', 'max', 'avgmax', 'catavgmax')")
    with pytest.raises(ValueError) as error:
        timm.create_model(variant, features_only=True, out_indices=(0, 4), **MICRO_FOCAL)
    assert one_line_error(error) == ('out_indices must be stage indices in -4..3 or a number 1..4 of last stages, '
                                     'got (0, 4)')
    model = timm.create_model(variant, **MICRO_FOCAL)
    with pytest.raises(ValueError) as error:
        model.reset_classifier(5, 'token')
    assert one_line_error(error).startswith('global_pool must be one of')
    with pytest.raises(ValueError) as error:
        model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[-5])
    assert one_line_error(error).startswith('indices must be stage indices in -4..3')


@pytest.mark.slow
def test_model_stats_prints_official_size_and_cost():
    result = subprocess.run([sys.executable, 'scripts/model_stats.py', '--cfg', 'configs/focal_tiny.yaml'],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == 'params_m=28.88 gflops=4.95'
