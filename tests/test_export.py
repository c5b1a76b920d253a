"""Export for deployment: ONNX through PyTorch's default (torch.export-based) exporter, or the named
TorchScript fallback where that one is missing, matching PyTorch in onnxruntime at other batch sizes
than the traced one; torch.export programs of fresh models; scripts/export_onnx.py's command line."""
import inspect
import os
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from conftest import REPO_ROOT, error_line, write_micro_config
from config import load_config
from models import FocalTransformer, build_model
from models.focal_attention import choose_backend, clear_layout_cache, window_layout
from models.focal_attention.fused import interpreter_unavailable_reason

sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))
import export_onnx  # noqa: E402

# PyTorch 2.5 and later have the torch.export-based exporter (with onnxscript, a test dependency);
# PyTorch 2.4 has only the TorchScript one, which the script then names as its fallback.
NEW_EXPORTER = 'dynamic_shapes' in inspect.signature(torch.onnx.export).parameters
pytestmark = [
    pytest.mark.filterwarnings(  # PyTorch 2.4's torch.export on the constant index maps it holds
        'ignore:.*(does not reference an nn.Module|no underlying reference in the owning GraphModule):UserWarning'),
    pytest.mark.usefixtures('one_thread'),
]
SHIFTED = 'MODEL:\n  FOCAL:\n    USE_SHIFT: True\n    DEPTHS: [2, 1, 1, 1]\n'  # stage 0's second block shifts
FAST_SHIFTED = SHIFTED.replace('MODEL:\n', 'MODEL:\n  TYPE: focalv2\n')  # Focal-fast, built at the micro 32 px
SIZE = 40  # not a multiple of the windows: the maps are padded


def micro_classifier(folder: str, extra_yaml: str = SHIFTED) -> FocalTransformer:
    torch.manual_seed(3)
    return build_model(load_config(write_micro_config(folder, extra_yaml))).eval()


def onnx_outputs(path: str, images: torch.Tensor) -> list:
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})


def assert_matches(outputs, expected, tolerance: float = 1e-5) -> None:
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        out = torch.as_tensor(np.asarray(out))
        assert out.shape == ref.shape
        assert (out - ref).norm() <= tolerance * ref.norm(), ((out - ref).abs().max(), ref.abs().max())


def assert_default_exporter_ran(printed: str) -> None:
    if NEW_EXPORTER:
        assert 'exporter: torch.export-based (dynamo=True)' in printed
    else:
        assert 'exporter: TorchScript, the fallback: torch 2.4' in printed and 'no torch.export-based' in printed


@pytest.mark.slow
@pytest.mark.parametrize('architecture', [SHIFTED, FAST_SHIFTED], ids=['focal', 'focalv2'])
def test_classifier_checkpoint_exports_with_the_default_exporter_and_any_batch_runs(architecture, tmp_path, capsys):
    model = micro_classifier(str(tmp_path), architecture)
    torch.save({'model': model.state_dict()}, tmp_path / 'weights.pth')
    output = tmp_path / 'micro.onnx'
    assert export_onnx.main(['--cfg', str(tmp_path / 'micro.yaml'), '--checkpoint', str(tmp_path / 'weights.pth'),
                             '--img-size', str(SIZE), '--output', str(output)]) == 0
    printed = capsys.readouterr().out
    assert_default_exporter_ran(printed)
    assert 'onnxruntime vs PyTorch, batch 3' in printed
    graph = onnx.load(str(output)).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [3, SIZE, SIZE]
    assert [o.name for o in graph.output] == ['logits']
    for batch in (1, 3):
        images = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            assert_matches(onnx_outputs(str(output), images), model(images))


@pytest.mark.slow
def test_backbone_exports_its_stage_maps(tmp_path, capsys):
    write_micro_config(str(tmp_path))
    backbone = export_onnx.build_backbone(str(tmp_path / 'micro.yaml'), None, (), (1, 2, 3))
    for parameter in backbone.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    detector = {f'backbone.{name.removeprefix("body.")}': value for name, value in backbone.state_dict().items()}
    torch.save({'state_dict': detector}, tmp_path / 'det.pth')  # as mmdetection saves a detector
    output = tmp_path / 'backbone.onnx'
    assert export_onnx.main(['--cfg', str(tmp_path / 'micro.yaml'), '--backbone', '--out-indices', '1', '2', '3',
                             '--checkpoint', str(tmp_path / 'det.pth'), '--img-size', '48', '72',
                             '--output', str(output)]) == 0
    printed = capsys.readouterr().out
    assert 'backbone (stages 1, 2, 3)' in printed
    assert_default_exporter_ran(printed)
    assert [o.name for o in onnx.load(str(output)).graph.output] == ['stage1', 'stage2', 'stage3']
    images = torch.randn(3, 3, 48, 72)
    with torch.no_grad():
        assert_matches(onnx_outputs(str(output), images), backbone.eval()(images).values())


@pytest.mark.slow
@pytest.mark.parametrize('architecture, size', [(SHIFTED, SIZE), (FAST_SHIFTED, SIZE), (FAST_SHIFTED, 32)],
                         ids=['focal', 'focalv2', 'focalv2-at-its-built-size'])
def test_torch_export_of_a_fresh_classifier_has_a_dynamic_batch_and_lowers(architecture, size, tmp_path):
    """torch.export as AOTInductor and ExecuTorch take it: of a model that never ran (its index maps
    are built during the trace; a Focal-fast model at its built size from the selection it holds),
    batch dynamic, and still right after the decompositions of lowering."""
    clear_layout_cache()
    model = micro_classifier(str(tmp_path), architecture)
    example = torch.randn(2, 3, size, size)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim('batch')},), strict=False)
    lowered = program.run_decompositions()
    for batch in (1, 3):
        images = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            assert_matches([program.module()(images)], model(images), 1e-6)
            assert_matches([lowered.module()(images)], model(images), 1e-6)


@pytest.mark.slow
def test_torch_export_of_a_fresh_backbone_gives_its_stage_maps(tmp_path):
    clear_layout_cache()
    write_micro_config(str(tmp_path))
    backbone = export_onnx.build_backbone(str(tmp_path / 'micro.yaml'), None, (), (0, 3)).eval()
    program = export_onnx.export_program(backbone, torch.randn(2, 3, SIZE, SIZE))
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert_matches(export_onnx.flat_outputs(program.module()(images)), backbone(images).values(), 1e-6)


@pytest.mark.slow
def test_fused_backend_is_exported_through_sdpa(tmp_path):
    """A model that ran the fused kernel (Triton's interpreter here, where it can run) exports SDPA: the
    exported graph holds no custom op and computes what the model computes."""
    model = micro_classifier(str(tmp_path), SHIFTED + '    ATTN_BACKEND: fused\n')
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    if interpreter_unavailable_reason() is None:
        attention = model.layers[0].blocks[0].attn
        qkv = torch.zeros(1, 64, 3 * attention.dim)
        assert choose_backend('fused', qkv, window_layout(8, 8, attention.geometry, qkv.device), 1) == 'fused'
    program = torch.export.export(model, (images,), strict=False)
    targets = [str(node.target) for node in program.graph.nodes if node.op == 'call_function']
    assert not [target for target in targets if 'focal_attention' in target]
    assert any('scaled_dot_product_attention' in target for target in targets)
    with torch.no_grad():
        assert_matches([program.module()(images)], expected, 1e-5)


@pytest.mark.slow
def test_torchscript_export_of_the_fused_backend_validates_against_the_eager_kernel(tmp_path, capsys):
    write_micro_config(str(tmp_path), SHIFTED)
    assert export_onnx.main(['--cfg', str(tmp_path / 'micro.yaml'), '--opts', 'MODEL.FOCAL.ATTN_BACKEND', 'fused',
                             '--exporter', 'torchscript', '--img-size', '32',
                             '--output', str(tmp_path / 'ts.onnx')]) == 0
    printed = capsys.readouterr().out
    assert 'exporter: TorchScript\n' in printed and 'onnxruntime vs PyTorch, batch 1' in printed


@pytest.mark.slow
def test_without_onnxscript_the_torchscript_exporter_is_the_named_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'onnxscript', None)
    model = micro_classifier(str(tmp_path))
    example = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        model(example)
    exporter, reason = export_onnx.export_onnx(model, example, str(tmp_path / 'f.onnx'))
    assert exporter == 'torchscript'
    assert ('onnxscript is not installed' if NEW_EXPORTER else 'no torch.export-based ONNX exporter') in reason
    results = export_onnx.validate_onnx(str(tmp_path / 'f.onnx'), model, (SIZE, SIZE))
    assert [batch for batch, _, _ in results] == [1, 3] and max(r for _, _, r in results) < 1e-5

    cfg = str(tmp_path / 'micro.yaml')
    assert export_onnx.main(['--cfg', cfg, '--exporter', 'dynamo', '--output', str(tmp_path / 'g.onnx')]) == 1
    assert '--exporter dynamo cannot run: ' in error_line(capsys)
    assert not (tmp_path / 'g.onnx').exists()


@pytest.mark.slow
def test_an_export_that_fails_validation_keeps_the_previous_file(tmp_path, capsys):
    cfg = write_micro_config(str(tmp_path))
    output = tmp_path / 'micro.onnx'
    output.write_bytes(b'the previous export')
    assert export_onnx.main(['--cfg', cfg, '--exporter', 'torchscript', '--tolerance', '1e-12',
                             '--output', str(output)]) == 1
    assert 'onnxruntime differs from PyTorch: relative error' in error_line(capsys)
    assert output.read_bytes() == b'the previous export'
    assert sorted(os.listdir(tmp_path)) == ['micro.onnx', 'micro.yaml', 'micro_base.yaml']  # no temporary file left


@pytest.mark.parametrize('arguments, message', [
    (['--checkpoint', 'nowhere.pth'], 'checkpoint not found: nowhere.pth'),
    (['--img-size', '16'], '--img-size 16 16 is too small: this model needs at least 32 px a side'),
    (['--img-size', '32', '32', '32'], '--img-size takes one side or HEIGHT WIDTH'),
    (['--opts', 'MODEL.FOCAL.EMBED_DIM', '24', '--checkpoint', 'weights.pth'], 'does not fit this FocalTransformer'),
    # exported as trained: a table of another expand size is neither resized nor left at its initialisation
    (['--opts', 'MODEL.FOCAL.EXPAND_SIZES', '[2, 2, 2, 2]', '--checkpoint', 'weights.pth'],
     'exactly: shape differs (file -> model): layers.0.blocks.0.attn.relative_position_bias_table_to_neighbors'),
    (['--output', 'no/such/folder/f.onnx'], 'no/such/folder does not exist'),
])
def test_bad_config_input_is_one_error_line(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_micro_config(str(tmp_path))
    torch.save({'model': micro_classifier(str(tmp_path), '').state_dict()}, tmp_path / 'weights.pth')
    assert export_onnx.main(['--cfg', cfg] + arguments) == 1
    assert message in error_line(capsys)


@pytest.mark.parametrize('arguments, message', [
    (['--model', 'not_a_model'], '--model not_a_model: not a timm model name'),
    (['--model', 'resnet50', '--backbone'], '--backbone --model resnet50: choose one of focal_base, focal_small'),
    (['--model', 'resnet50', '--opts', 'DATA.IMG_SIZE', '64'], '--opts needs --cfg'),
])
def test_bad_model_names_are_one_error_line(arguments, message, capsys):
    assert export_onnx.main(arguments) == 1
    assert message in error_line(capsys)
