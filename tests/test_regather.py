"""Gathered keys and values are regathered in backward instead of being kept for it."""
import contextlib
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import MICRO_64PX_SHIFTED
from models import FocalFastTransformer, FocalTransformer
from models.focal_attention.input_saving import input_saving_sdpa
from models.focal_attention.regather import _Regather, regathered_in_backward

ROOT = Path(__file__).resolve().parent.parent


def gather_and_scale(regather: bool):
    source = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 40, (300,))
    gathered = source.index_select(0, index)
    scale = torch.randn(150, 8, dtype=torch.float64, requires_grad=True)
    with regathered_in_backward(gathered, source, 0, index) if regather else contextlib.nullcontext():
        out = gathered[1::2] * scale  # saves a strided view of the gathered tensor
    return source, gathered, scale, out


def test_saved_view_is_regathered_with_its_values_and_geometry():
    source, gathered, scale, out = gather_and_scale(regather=True)
    saved = out.grad_fn._saved_self
    assert saved.untyped_storage().data_ptr() != gathered.untyped_storage().data_ptr()
    assert saved.stride() == gathered[1::2].stride()
    assert torch.equal(saved, gathered[1::2])


def test_without_regather_the_graph_keeps_the_gathered_storage():
    source, gathered, scale, out = gather_and_scale(regather=False)
    assert out.grad_fn._saved_self.untyped_storage().data_ptr() == gathered.untyped_storage().data_ptr()


def test_regathered_gradients_equal_the_plain_ones():
    torch.manual_seed(0)
    source, _, scale, out = gather_and_scale(regather=True)
    out.sum().backward(retain_graph=True)
    first = source.grad.clone(), scale.grad.clone()
    out.sum().backward()  # a second backward over the retained graph regathers again
    torch.manual_seed(0)
    plain_source, _, plain_scale, plain_out = gather_and_scale(regather=False)
    plain_out.sum().backward()
    assert torch.equal(first[0], plain_source.grad) and torch.equal(first[1], plain_scale.grad)
    assert torch.equal(source.grad, 2 * first[0]) and torch.equal(scale.grad, 2 * first[1])


def count_regathered_views(monkeypatch) -> list:
    """Patch the pack hook to record how many saved tensors became regathered views."""
    views = []
    pack = _Regather.pack

    def counting_pack(self, tensor):
        packed = pack(self, tensor)
        views.append(not isinstance(packed, torch.Tensor))
        return packed
    monkeypatch.setattr(_Regather, 'pack', counting_pack)
    return views


def block_gradients(block, x, regather_keys):
    x = x.clone().requires_grad_()
    block.zero_grad()
    block(x, 16, 16, regather_keys=regather_keys).square().sum().backward()
    return [x.grad] + [p.grad for p in block.parameters()]


def test_input_saving_attention_stand_in_matches_sdpa():
    query, key, value = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    bias = torch.randn(1, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    inputs = (query, key, value, bias)
    out = input_saving_sdpa(query, key, value, attn_mask=bias, scale=0.3)
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(a, b)


def test_focal_attention_saves_no_gathered_keys_and_keeps_its_gradients(monkeypatch):
    monkeypatch.setattr(F, 'scaled_dot_product_attention',
                        input_saving_sdpa)
    views = count_regathered_views(monkeypatch)
    model = FocalTransformer(**MICRO_64PX_SHIFTED).double()
    block = model.layers[0].blocks[1]  # shifted, with surroundings and pooled keys
    x = torch.randn(2, 256, 16, dtype=torch.float64)
    regathered = block_gradients(block, x, regather_keys=True)
    assert views.count(True) == 2  # keys and values
    views.clear()
    plain = block_gradients(block, x, regather_keys=False)
    assert not views
    for a, b in zip(regathered, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize('context', ['no_grad', 'checkpoint'])
def test_regather_stays_out_of_inference_and_block_checkpointing(monkeypatch, context):
    views = count_regathered_views(monkeypatch)
    model = FocalTransformer(**MICRO_64PX_SHIFTED, use_checkpoint=context == 'checkpoint').train()
    images = torch.randn(2, 3, 64, 64)
    if context == 'no_grad':
        with torch.no_grad():
            model(images)
    else:
        F.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    assert not views


def test_torch_func_gradients_run_without_regather():
    """torch.func wraps tensors without storage: the regather stands aside and grad matches autograd."""
    from torch.func import functional_call, grad
    model = FocalTransformer(**MICRO_64PX_SHIFTED).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    func_grads = grad(lambda p: functional_call(model, p, (images,)).sum())(params)
    model(images).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(func_grads[name], p.grad)


@pytest.mark.slow
def test_full_size_focal_tiny_keeps_about_what_swin_tiny_keeps_for_backward():
    """scripts/activation_memory.py at batch 2: Focal-T keeps 1.09x timm's Swin-T (1.27x when
    the gathered keys were kept), weights' bf16 copies and position biases included."""
    result = subprocess.run([sys.executable, 'scripts/activation_memory.py', '--sizes', 'tiny', '--families', 'focal',
                             '--batch-size', '2'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TIMM_FUSED_ATTN='0'))
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1]
    focal_mib, swin_mib, ratio = (float(cell) for cell in row.strip('|').split('|')[1:])
    assert row.startswith('| focal-tiny |') and focal_mib > 0 and swin_mib > 0
    assert ratio < 1.18, row


@pytest.mark.parametrize('model_class', [FocalTransformer, FocalFastTransformer])
def test_a_graph_dropped_without_backward_frees_its_activations(model_class):
    """A forward with gradients and no backward (evaluation outside no_grad, a skipped step): the
    graph and what it saved go with the output. Saved outputs passed through the hooks as
    themselves would form a cycle through C++ that no collector frees (a model's activations per
    forward: timm's model tests ran out of memory)."""
    arguments = dict(MICRO_64PX_SHIFTED, focal_topK=16) if model_class is FocalFastTransformer else MICRO_64PX_SHIFTED
    model = model_class(**arguments)
    stage_outputs = []
    model.layers[0].register_forward_hook(lambda module, args, output: stage_outputs.append(weakref.ref(output)))
    out = model(torch.randn(2, 3, 64, 64))
    assert stage_outputs[0]() is not None and out.grad_fn is not None
    del out
    gc.collect()
    assert stage_outputs[0]() is None
