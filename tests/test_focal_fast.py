"""Focal-fast (the official `focal_transformer_v2.py`): official outputs and sizes, the key selection
against the official procedure, a file's own selection, other input sizes, gradients against the
official attention written out, and the paths users take (timm, configs, the backbone)."""
import logging
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the timm variants)
from config import load_config
from conftest import MICRO_FAST_CLASSIFIER, REPO_ROOT, read_metrics, run_main, write_micro_config
from models import FocalBackbone, FocalFastTransformer, build_model, checkpoint_filter_fn
from models.focal_attention import NearestGeometry, clear_backend_choices, nearest, nearest_selection, window_offsets

GOLDEN = Path(__file__).resolve().parent / 'data' / 'golden'
FAST_GOLDEN = ['fast_default224', 'fast_shift224', 'fast_patch224']


def load_golden(name: str) -> dict:
    return torch.load(GOLDEN / f'{name}.pt', weights_only=True)


def golden_model(golden: dict, state_dict=None) -> FocalFastTransformer:
    model = FocalFastTransformer(**golden['config']).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict or golden['state_dict'], model), strict=True)
    return model


def official_selection(query_grid, key_grid, top_k):
    """The official `get_topk_closest_indice`, written out for square grids: (nQ, K) indices of the
    keys nearest to each query (window centres when the grids differ) and (nQ, K, 2) query - key."""
    factor = key_grid // query_grid if query_grid != key_grid else 1
    centres = torch.arange(query_grid) * factor + (factor // 2 if query_grid != key_grid else 0)
    q = torch.stack(torch.meshgrid(centres, centres, indexing='ij')).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(key_grid), torch.arange(key_grid), indexing='ij')).flatten(1)
    relative = q[:, :, None] - k[:, None, :]
    distance = torch.sqrt(relative[0].float() ** 2 + relative[1].float() ** 2)
    index = torch.topk(-distance, min(top_k, distance.shape[1]), dim=1).indices
    return index, torch.gather(relative, 2, index[None].repeat(2, 1, 1)).permute(1, 2, 0).float()


def official_attention(attn, x, pooled, selection):
    """The official `WindowAttention.forward` of Focal-fast, term by term, for a (B, H, W, C) map of
    whole windows, pooled maps (B, h_l, w_l, C) and a selection as the official buffers hold it:
    per level (nW, K) indices and (nW, ws^2, K, 2) query - key coordinates. Returns (B, H*W, C)."""
    B, H, W, C = x.shape
    ws, heads = attn.window_size, attn.num_heads
    q, k, v = attn.qkv(x).view(B, H, W, 3, heads, C // heads).unbind(3)
    q = q.view(B, H // ws, ws, W // ws, ws, heads, -1).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, -1, ws * ws, heads,
                                                                                              C // heads)
    keys, values, bias = [], [], []
    for level, (index, coords) in enumerate(selection):
        if level == 0:
            k_level, v_level = k.reshape(B, H * W, heads, -1), v.reshape(B, H * W, heads, -1)
        else:
            _, k_level, v_level = attn.qkv(pooled[level - 1]).view(B, -1, 3, heads, C // heads).unbind(2)
        keys.append(k_level[:, index])
        values.append(v_level[:, index])
        bias.append(attn.coord2rpb_all[level](coords))
    scores = torch.einsum('bwqhd,bwkhd->bwhqk', q * attn.scale, torch.cat(keys, 2))
    scores = scores + torch.cat(bias, 2).permute(0, 3, 1, 2)
    out = torch.einsum('bwhqk,bwkhd->bwqhd', scores.softmax(-1), torch.cat(values, 2)).flatten(3)
    out = attn.proj(out).view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(B, H * W, C)


def per_query_coords(offset: torch.Tensor, window_size: int) -> torch.Tensor:
    """The official (nW, ws^2, K, 2) coordinates of a per-window offset (nW, K, 2)."""
    return offset[:, None] + window_offsets(window_size).float()[None, :, None]


@pytest.mark.parametrize('name', FAST_GOLDEN)
def test_released_focal_fast_checkpoint_gives_official_features_and_logits(name):
    golden = load_golden(name)
    model = golden_model(golden)
    with torch.no_grad():
        final_map = model.forward_features(golden['input'])
        features = model.forward_head(final_map, pre_logits=True)
        logits = model.forward_head(final_map)
    assert final_map.shape == (2, 7, 7, features.shape[1])  # timm's convention: the normed NHWC map
    assert (features - golden['features']).abs().max() < 1e-4
    assert (logits - golden['logits']).abs().max() <= 1e-4 * golden['logits'].abs().max()


@pytest.mark.parametrize('variant, official', [
    ('focalv2_tiny_useconv_patch4_window7_224', 30_220_564), ('focalv2_small_useconv_patch4_window7_224', 51_526_540),
    ('focalv2_base_useconv_patch4_window7_224', 91_186_824)])
def test_released_architectures_have_the_official_parameter_counts(variant, official):
    """30.22M, 51.53M and 91.19M, as the official code builds them."""
    with torch.device('meta'):
        model = timm.create_model(variant)
    assert sum(p.numel() for p in model.parameters()) == official


def test_parameter_names_and_shapes_equal_official_learnables():
    golden = load_golden('fast_default224')
    official = {k: v.shape for k, v in golden['state_dict'].items()
                if 'topk_cloest' not in k and 'window_coords' not in k}
    ours = {k: v.shape for k, v in FocalFastTransformer(**golden['config']).named_parameters()}
    assert ours == official


@pytest.mark.parametrize('side', [56, 28, 14, 7, 112])
@pytest.mark.parametrize('top_k', [128, 20])
def test_selection_follows_the_official_procedure(side, top_k):
    """Where the official code runs (square maps of whole windows), the same keys in the same order."""
    ws = 7
    geometry = NearestGeometry(window_size=ws, shift_size=0, num_pooled_levels=1, top_k=top_k)
    (fine, fine_offset), (pooled, pooled_offset) = nearest_selection(geometry, side, side)
    index, relative = official_selection(side // ws, side, top_k)
    assert torch.equal(fine, index) and torch.equal(fine_offset, relative)
    index, relative = official_selection(side // ws, side // ws, top_k)
    assert torch.equal(pooled, index) and torch.equal(pooled_offset, relative * ws)


def test_golden_files_hold_the_selection_this_torch_computes():
    """Ties between equidistant keys fell in the official run as they fall here (same procedure)."""
    golden = load_golden('fast_default224')
    model = golden_model(golden)
    fresh = FocalFastTransformer(**golden['config'])
    for name, buffer in fresh.named_buffers():
        if '.nearest_' in name:
            assert torch.equal(buffer, model.get_buffer(name)), name


def test_selection_is_computed_in_chunks_with_the_same_ties(monkeypatch):
    geometry = NearestGeometry(window_size=7, shift_size=3, num_pooled_levels=1, top_k=128)
    whole = nearest_selection.__wrapped__(geometry, 61, 45)
    monkeypatch.setattr(nearest, 'TOPK_CHUNK', 1000)
    chunked = nearest_selection.__wrapped__(geometry, 61, 45)
    assert all(torch.equal(a, b) for level_a, level_b in zip(whole, chunked) for a, b in zip(level_a, level_b))


def test_a_files_own_selection_is_used_as_stored():
    """A file whose selection differs from the one the model would compute (here one window takes a
    far token instead of its farthest near one) computes with the file's: the official attention
    with the file's buffers, not the model's."""
    golden = load_golden('fast_default224')
    state = dict(golden['state_dict'])
    prefix = 'layers.1.blocks.0.attn.'
    index, coords = state[prefix + 'topk_cloest_indice_0'].clone(), state[prefix + 'topk_cloest_coords_0'].clone()
    window, far_token = 5, 0  # window (1, 1) of the 28 x 28 map; token (0, 0) is not among its nearest
    assert far_token not in index[window]
    centre = torch.tensor([1 * 7 + 3, 1 * 7 + 3])
    index[window, -1] = far_token
    coords[window, :, -1] = per_query_coords((centre - torch.tensor([0, 0])).float()[None, None], 7)[0, :, 0]
    state[prefix + 'topk_cloest_indice_0'], state[prefix + 'topk_cloest_coords_0'] = index, coords
    model, reference = golden_model(golden, state), golden_model(golden)

    attn = model.layers[1].blocks[0].attn
    x = torch.randn(2, 28, 28, attn.dim)
    pooled = [model.layers[1].blocks[0].pool(x, 0)]
    selection = [(index, coords), (state[prefix + 'topk_cloest_indice_1'], state[prefix + 'topk_cloest_coords_1'])]
    with torch.no_grad():
        ours = attn(x, pooled, attn.layout(28, 28, x.device))
        official = official_attention(attn, x, [p.view(2, 4, 4, -1) for p in pooled], selection)
        assert (ours - official).abs().max() < 1e-5
        assert not torch.allclose(model(golden['input']), reference(golden['input']), atol=1e-6)


@pytest.mark.parametrize('height, width, shift', [(28, 28, 0), (30, 25, 0), (17, 40, 3), (9, 9, 3)])
def test_any_map_size_computes_the_official_attention_of_its_selection(height, width, shift):
    """Maps that are not whole windows or not square: the attention is the official attention of the
    padded map with the computed selection (keys among the real tokens only)."""
    torch.manual_seed(0)
    block = FocalFastTransformer(**{**MICRO_FAST_CLASSIFIER, 'depths': [2, 1, 1, 1], 'use_shift': bool(shift),
                                    'img_size': 112})
    block = block.layers[0].blocks[1 if shift else 0].eval()
    attn = block.attn
    layout = attn.layout(height, width, torch.device('cpu'))
    padded_h, padded_w = layout.padded_size
    x = torch.randn(2, padded_h, padded_w, attn.dim)
    pooled = [block.pool(x, 0)]
    selection = [(index, per_query_coords(offset, 7))
                 for index, offset in nearest_selection(attn.geometry, height, width)]
    with torch.no_grad():
        ours = attn(x, pooled, layout)
        official = official_attention(attn, x, [pooled[0].view(2, padded_h // 7, padded_w // 7, -1)], selection)
    assert (ours - official).abs().max() < 1e-5
    real = (torch.arange(padded_h)[:, None] + shift) % padded_h < height
    real = (real & ((torch.arange(padded_w)[None] + shift) % padded_w < width)).flatten()
    assert real[selection[0][0]].all()  # no padding token among the keys


@pytest.mark.parametrize('size', [(224, 224), (256, 256), (200, 288)])
def test_model_runs_other_input_sizes_and_trains(size):
    model = FocalFastTransformer(**{**MICRO_FAST_CLASSIFIER, 'use_shift': True})
    logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_every_gradient_equals_the_official_attentions_in_float64():
    """The batched position MLPs, gathers and SDPA give the official math's gradients (float64)."""
    torch.manual_seed(0)
    block = FocalFastTransformer(**{**MICRO_FAST_CLASSIFIER, 'img_size': 112}).layers[1].blocks[0].double()
    attn = block.attn
    x = torch.randn(2, 14, 14, attn.dim, dtype=torch.float64, requires_grad=True)
    selection = [(index, per_query_coords(offset, 7).double())
                 for index, offset in nearest_selection(attn.geometry, 14, 14)]
    gradients = []
    for run in ('ours', 'official'):
        pooled = [block.pool(x, 0)]
        if run == 'ours':
            out = attn(x, pooled, attn.layout(14, 14, x.device))
        else:
            out = official_attention(attn, x, [pooled[0].view(2, 2, 2, -1)], selection)
        params = [x] + list(attn.parameters()) + list(block.pool_layers.parameters())
        gradients.append(torch.autograd.grad(out.pow(2).sum(), params))
    for ours, official in zip(*gradients):
        assert torch.allclose(ours, official, rtol=1e-9, atol=1e-10)


def test_filter_converts_official_buffers_and_rejects_malformed_coordinates():
    golden = load_golden('fast_default224')
    model = FocalFastTransformer(**golden['config'])
    converted = checkpoint_filter_fn(golden['state_dict'], model)
    assert not any('topk_cloest' in name or 'window_coords' in name for name in converted)
    broken = dict(golden['state_dict'])
    name = 'layers.0.blocks.0.attn.topk_cloest_coords_0'
    broken[name] = broken[name].clone()
    broken[name][0, 1, 0] += 1
    with pytest.raises(ValueError, match=name):
        checkpoint_filter_fn(broken, model)


def test_a_file_for_another_input_size_fine_tunes_with_the_models_own_selection(caplog):
    golden = load_golden('fast_default224')
    model = FocalFastTransformer(**{**golden['config'], 'img_size': 256})
    with caplog.at_level(logging.INFO):
        model.load_state_dict(checkpoint_filter_fn(golden['state_dict'], model), strict=True)
    assert 'another input size' in caplog.text
    fresh = FocalFastTransformer(**{**golden['config'], 'img_size': 256})
    assert torch.equal(model.layers[0].blocks[0].attn.nearest_index_0, fresh.layers[0].blocks[0].attn.nearest_index_0)


def test_timm_create_model_loads_a_released_file(tmp_path):
    golden = load_golden('fast_default224')
    path = tmp_path / 'focalv2-micro.pth'
    torch.save({'model': golden['state_dict']}, path)
    config = {k: v for k, v in golden['config'].items() if k != 'img_size'}
    model = timm.create_model('focalv2_tiny_useconv_patch4_window7_224', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **config).eval()
    with torch.no_grad():
        assert (model(golden['input']) - golden['logits']).abs().max() < 1e-4
    cfg = model.pretrained_cfg
    assert cfg['url'].endswith('focalv2-tiny-useconv-is224-ws7.pth')
    assert (cfg['interpolation'], cfg['crop_pct'], cfg['mean']) == ('bicubic', 0.875, (0.485, 0.456, 0.406))


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_shipped_configs_build_the_released_architectures(size):
    config = load_config(str(Path(REPO_ROOT) / 'configs' / f'focalv2_{size}_useconv.yaml'))
    with torch.device('meta'):
        ours = build_model(config)
        official = timm.create_model(f'focalv2_{size}_useconv_patch4_window7_224')
    assert isinstance(ours, FocalFastTransformer) and ours.focal_topK == 128
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}


def test_fused_request_runs_sdpa_and_says_why(caplog, monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    clear_backend_choices()
    model = FocalFastTransformer(**{**MICRO_FAST_CLASSIFIER, 'img_size': 64, 'attn_backend': 'fused'})
    with caplog.at_level(logging.WARNING):
        model(torch.randn(1, 3, 64, 64))
    assert 'differ between windows' in caplog.text and 'using SDPA' in caplog.text
    assert models.focal_attention.backends_in_use(model) == {'sdpa'}
    clear_backend_choices()


@pytest.mark.slow
def test_compiled_training_gives_eager_gradients_without_graph_breaks():
    torch.manual_seed(0)
    model = FocalFastTransformer(**{**MICRO_FAST_CLASSIFIER, 'img_size': 64, 'use_shift': True})
    images = torch.randn(2, 3, 64, 64)
    model(images).sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend='aot_eager')(images).sum().backward()
    assert all(torch.allclose(e, p.grad, atol=1e-5) for e, p in zip(eager, model.parameters()))


def test_bfloat16_autocast_gives_finite_logits():
    """(Gradient checkpointing: tests/test_focal_transformer.py, for both model families.)"""
    torch.manual_seed(0)
    model = FocalFastTransformer(**{**MICRO_FAST_CLASSIFIER, 'img_size': 64})
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = model(images)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_backbone_gives_stage_maps_at_detection_sizes():
    backbone = FocalBackbone(**{k: v for k, v in MICRO_FAST_CLASSIFIER.items() if k != 'num_classes'},
                             img_size=(96, 160), model_class=FocalFastTransformer)
    maps = backbone(torch.randn(1, 3, 100, 150))
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(16, 32, 40), (32, 16, 20), (64, 8, 10), (128, 4, 5)]
    sample = FocalFastTransformer(**MICRO_FAST_CLASSIFIER).state_dict()
    backbone.load_checkpoint({'model': sample})  # a 224 classification file: the backbone keeps its own selection
    assert math.isfinite(sum(m.sum().item() for m in backbone(torch.randn(1, 3, 64, 64)).values()))


FAST_YAML = """
MODEL:
  TYPE: focalv2
  NAME: micro_focal_fast
  FOCAL:
    FOCAL_TOPK: 24
"""


def official_format_copy(checkpoint: str, folder: Path, model: FocalFastTransformer) -> str:
    """A checkpoint of ours (of `model`'s architecture) as the official code saves Focal-fast: DDP
    prefixes and per-query selection buffers (`topk_cloest_indice_{l}`, `topk_cloest_coords_{l}`,
    `window_coords`)."""
    weights = torch.load(checkpoint, map_location='cpu', weights_only=True)['model']
    windows = {name: module.window_size for name, module in model.named_modules() if hasattr(module, 'coord2rpb_all')}
    official = {}
    for name, value in weights.items():
        attn, _, buffer = name.rpartition('.nearest_')
        if not attn:
            official[f'module.{name}'] = value
            continue
        kind, level = buffer.split('_')
        if kind == 'index':
            official[f'module.{attn}.topk_cloest_indice_{level}'] = value
        else:
            official[f'module.{attn}.topk_cloest_coords_{level}'] = per_query_coords(value, windows[attn])
            official[f'module.{attn}.window_coords'] = window_offsets(windows[attn]).view(windows[attn],
                                                                                          windows[attn], 2)
    path = str(folder / 'focalv2-official.pth')
    torch.save({'model': official}, path)
    return path


def test_main_trains_resumes_and_evaluates_focal_fast(tmp_path, tiny_data, capsys):
    cfg = write_micro_config(str(tmp_path), FAST_YAML)
    output = str(tmp_path / 'out')
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', output]) == 0
    assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--output', output, '--opts', 'TRAIN.EPOCHS', '2']) == 0
    run_dir = tmp_path / 'out' / 'micro_focal_fast' / 'default'
    metrics = read_metrics(str(run_dir))
    assert [m['epoch'] for m in metrics] == [0, 1]
    checkpoint = str(run_dir / 'ckpt_epoch_1.pth')
    model = build_model(load_config(cfg, ['MODEL.NUM_CLASSES', '10']))
    for source in (checkpoint, official_format_copy(checkpoint, tmp_path, model)):
        capsys.readouterr()
        assert run_main(['--cfg', cfg, '--data-path', tiny_data, '--eval', '--resume', source,
                         '--output', str(tmp_path / 'eval')]) == 0
        assert f" * Acc@1 {metrics[-1]['acc1']:.3f} Acc@5 {metrics[-1]['acc5']:.3f}" in capsys.readouterr().out


def test_a_model_built_on_the_meta_device_leaves_real_selections_in_the_cache():
    """Config checks build models on the meta device; the selections they compute are cached for
    real models too."""
    nearest_selection.cache_clear()
    with torch.device('meta'):
        FocalFastTransformer(**MICRO_FAST_CLASSIFIER)
    geometry = NearestGeometry(window_size=7, shift_size=0, num_pooled_levels=1, top_k=128)
    assert all(t.device.type == 'cpu' for level in nearest_selection(geometry, 56, 56) for t in level)


def test_exact_loading_takes_an_official_file_and_keeps_the_models_selection_at_another_size():
    """Evaluation loads exactly: every learned tensor from the file; the key selection is the file's
    at the file's size and the model's own (what the file's model computes there) at another."""
    from checkpoint import exact_weights
    golden = load_golden('fast_default224')
    model = FocalFastTransformer(**golden['config'])
    weights = exact_weights({'model': golden['state_dict']}, model, 'official.pth')
    assert torch.equal(weights['layers.0.blocks.0.attn.nearest_index_0'],
                       golden['state_dict']['layers.0.blocks.0.attn.topk_cloest_indice_0'])
    larger = FocalFastTransformer(**{**golden['config'], 'img_size': 256})
    larger.load_state_dict(exact_weights({'model': golden['state_dict']}, larger, 'official.pth'))
    reference = golden_model(golden).eval()
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(larger.eval()(images), reference(images), atol=1e-5)
