"""Focal Transformer as a dense-prediction backbone: timm's multi-scale API, `FocalBackbone`
shapes, strides and stage norms, checkpoint loading, frozen stages, and a torchvision detection
training step."""
import importlib.util
import logging
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the timm variants)
from checkpoint import read_checkpoint
from conftest import MICRO_FOCAL
from models import FocalTransformer
from models.focal_backbone import FocalBackbone, focal_backbone
from models.focal_fpn import focal_fpn_backbone

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(224, 224), (384, 512), (600, 408)]


pytestmark = pytest.mark.usefixtures('one_thread')


def micro_backbone(**kwargs) -> FocalBackbone:
    return focal_backbone('focal_tiny', **dict(MICRO_FOCAL, **kwargs))


def micro_classifier(**kwargs) -> FocalTransformer:
    """The classifier with the architecture of `micro_backbone()` (same img_size: same windows)."""
    return timm.create_model('focal_tiny_patch4_window7_224', img_size=(800, 1333), num_classes=10,
                             **dict(MICRO_FOCAL, **kwargs)).eval()


def randomise_stage_norms(backbone: FocalBackbone) -> None:
    for i in backbone.out_indices:
        torch.nn.init.normal_(backbone.stage_norm(i).weight)
        torch.nn.init.normal_(backbone.stage_norm(i).bias)


def stage_outputs_by_hooks(model: FocalTransformer, x: torch.Tensor) -> list:
    """What each stage returns inside the classifier's own forward: its (B, C_i, H_i, W_i) map."""
    outputs = []
    handles = [stage.register_forward_hook(lambda module, args, out: outputs.append(out)) for stage in model.layers]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize('height,width', SIZES)
def test_backbone_maps_have_exact_strides_at_any_input_size(height, width):
    backbone = micro_backbone().eval()
    assert backbone.out_channels == [16, 32, 64, 128]
    assert backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, height, width))
    assert list(features) == ['0', '1', '2', '3']
    for (name, feature), channels, stride in zip(features.items(), backbone.out_channels, backbone.strides):
        padded_h, padded_w = math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
        assert feature.shape == (1, channels, padded_h // stride, padded_w // stride), name
        assert torch.isfinite(feature).all()


def test_backbone_returns_only_the_requested_stages():
    backbone = micro_backbone(out_indices=(1, 2, 3))
    assert backbone.out_channels == [32, 64, 128] and backbone.strides == [8, 16, 32]
    assert [name for name, _ in backbone.named_children() if name.startswith('norm')] == ['norm1', 'norm2', 'norm3']
    with torch.no_grad():
        assert list(backbone.eval()(torch.randn(1, 3, 128, 96))) == ['1', '2', '3']


def test_backbone_drops_modules_after_the_last_output_stage():
    backbone = micro_backbone(out_indices=(0, 1, 2))
    assert len(backbone.body.layers) == 3 and backbone.body.layers[2].downsample is None
    backbone.train()
    sum(f.sum() for f in backbone(torch.randn(1, 3, 64, 64)).values()).backward()
    unused = [name for name, p in backbone.named_parameters() if p.grad is None]
    assert unused == []  # DDP without find_unused_parameters needs this


@pytest.mark.parametrize('height,width', [(224, 224), (600, 408)])
def test_backbone_features_equal_classifier_stage_outputs(height, width, caplog):
    torch.manual_seed(0)
    classifier = micro_classifier()
    backbone = micro_backbone().eval()
    randomise_stage_norms(backbone)
    with caplog.at_level(logging.INFO):
        backbone.load_checkpoint({'model': classifier.state_dict()})
    for i in range(4):
        assert f'checkpoint lacks norm{i}' in caplog.text
        assert torch.equal(backbone.stage_norm(i).weight, torch.ones(backbone.out_channels[i]))
        assert torch.equal(backbone.stage_norm(i).bias, torch.zeros(backbone.out_channels[i]))
    assert 'head.weight' in caplog.text and 'norm.*' in caplog.text
    randomise_stage_norms(backbone)  # so that the check below sees a norm with its own weights

    x = torch.randn(2, 3, height, width)
    padded = F.pad(x, (0, -width % 32, 0, -height % 32))
    expected = stage_outputs_by_hooks(classifier, padded)
    with torch.no_grad():
        raw = backbone.forward_stages(x)
        features = backbone(x)
    for i, (stage, stage_map) in enumerate(zip(raw, expected)):
        torch.testing.assert_close(stage, stage_map.permute(0, 2, 3, 1), rtol=0, atol=0)
        norm = backbone.stage_norm(i)
        normed = F.layer_norm(stage, norm.normalized_shape, norm.weight, norm.bias)
        torch.testing.assert_close(features[str(i)], normed.permute(0, 3, 1, 2))


def test_a_grey_backbone_loads_an_rgb_checkpoint_as_timm_would():
    """in_chans=1: the stem's three input channels summed (timm's adapt_input_conv), so a grey image
    gives the stage maps the RGB backbone gives on its three copies."""
    torch.manual_seed(0)
    checkpoint = {'model': micro_classifier().state_dict()}
    rgb, grey = micro_backbone().eval(), micro_backbone(in_chans=1).eval()
    rgb.load_checkpoint(checkpoint)
    grey.load_checkpoint(checkpoint)
    image = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        for got, want in zip(grey(image).values(), rgb(image.expand(-1, 3, -1, -1)).values()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_imagenet_224_checkpoint_loads_with_logged_adaptations(caplog):
    """A 224 classifier's last stage does not expand (its map equals the window); at detection
    sizes it does, so its neighbour position tables start at init, and a 1000-class head goes."""
    classifier = timm.create_model('focal_tiny_patch4_window7_224', num_classes=1000, **MICRO_FOCAL)
    backbone = micro_backbone()
    with caplog.at_level(logging.INFO):
        backbone.load_checkpoint(classifier.state_dict())
    missing = 'layers.3.blocks.0.attn.relative_position_bias_table_to_neighbors'
    assert f'checkpoint lacks {missing}: kept at init' in caplog.text
    assert 'head.weight (1000, 128) is not used' in caplog.text
    for name, value in classifier.state_dict().items():
        if name.startswith('layers.0.'):
            assert torch.equal(backbone.body.state_dict()[name], value), name


def test_detector_checkpoint_with_backbone_prefix_loads_stage_norms(tmp_path, caplog):
    torch.manual_seed(0)
    source = micro_backbone().eval()
    randomise_stage_norms(source)
    official_keys = {'backbone.' + k.removeprefix('body.'): v for k, v in source.state_dict().items()}
    path = tmp_path / 'detector.pth'
    torch.save({'meta': {'epoch': 12}, 'state_dict': {**official_keys, 'neck.conv.weight': torch.zeros(1)}}, path)
    target = micro_backbone().eval()
    with caplog.at_level(logging.INFO):
        target.load_checkpoint(read_checkpoint(str(path)))
    assert 'ignoring 1 others' in caplog.text and 'checkpoint lacks norm' not in caplog.text
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for name, feature in source(x).items():
            torch.testing.assert_close(target(x)[name], feature, rtol=0, atol=0)


def test_checkpoint_of_another_architecture_is_rejected():
    other = timm.create_model('focal_tiny_patch4_window7_224', **dict(MICRO_FOCAL, embed_dim=32))
    with pytest.raises(ValueError, match='does not match'):
        micro_backbone().load_checkpoint(other.state_dict())


def test_frozen_stages_get_no_gradients_and_stay_in_eval_mode():
    backbone = micro_backbone(frozen_stages=1, drop_path_rate=0.1).train()
    frozen = [backbone.body.patch_embed, backbone.body.layers[0]]
    assert all(not p.requires_grad for module in frozen for p in module.parameters())
    assert all(not module.training for module in frozen)
    assert all(p.requires_grad for p in backbone.body.layers[1].parameters())
    backbone.load_checkpoint(micro_classifier(drop_path_rate=0.1).state_dict())
    assert not backbone.body.layers[0].blocks[0].norm1.weight.requires_grad  # loading keeps them frozen
    sum(f.sum() for f in backbone(torch.randn(1, 3, 64, 64)).values()).backward()
    assert backbone.body.patch_embed.proj.weight.grad is None
    assert backbone.body.layers[1].blocks[0].attn.qkv.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = micro_backbone().train()
    checkpointed = micro_backbone(use_checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 96)
    for model in (plain, checkpointed):
        sum((f ** 2).sum() for f in model(x).values()).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert all(stage.use_checkpoint for stage in checkpointed.body.layers)


def test_forward_intermediates_follows_timm_api():
    torch.manual_seed(0)
    model = micro_classifier()
    x = torch.randn(1, 3, 224, 160)
    expected = stage_outputs_by_hooks(model, x)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(model.forward_head(final), model(x))
        for stage, stage_map in zip(maps, expected):
            assert torch.equal(stage, stage_map)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last_two] == [64, 128]
        nhwc = model.forward_intermediates(x, indices=[0], stop_early=True, output_fmt='NHWC', intermediates_only=True)
        assert torch.equal(nhwc[0], maps[0].permute(0, 2, 3, 1))
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        assert torch.equal(normed, model.norm(expected[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NLC')


@pytest.mark.parametrize('feature_cls', ['getter', 'hook', 'fx'])
def test_timm_features_only_gives_stage_maps_and_feature_info(feature_cls):
    """Every timm feature extractor gives each stage's map as forward_intermediates does, NCHW:
    through forward_intermediates ('getter', the default), forward hooks or an FX graph (which also
    resizes an absolute position embedding)."""
    torch.manual_seed(0)
    classifier = micro_classifier(ape=True)
    features = timm.create_model('focal_tiny_patch4_window7_224', img_size=(800, 1333), features_only=True,
                                 feature_cls=feature_cls, ape=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(state_dict=classifier.state_dict()), **MICRO_FOCAL).eval()
    assert features.feature_info.channels() == [16, 32, 64, 128]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 600, 408)
    with torch.no_grad():
        maps = features(x)
        expected = classifier.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, 16, 150, 102), (1, 32, 75, 51), (1, 64, 37, 25), (1, 128, 18, 12)]
    for got, want in zip(maps, expected):
        assert torch.equal(got, want)


def test_features_only_prunes_stages_after_the_last_index():
    features = timm.create_model('focal_tiny_patch4_window7_224', features_only=True, out_indices=(0, 1), **MICRO_FOCAL)
    assert len(features.model.layers) == 2 and features.model.layers[1].downsample is None
    assert [m.shape[1] for m in features(torch.randn(1, 3, 64, 64))] == [16, 32]


def load_demo():
    spec = importlib.util.spec_from_file_location('detection_demo', ROOT / 'scripts' / 'detection_demo.py')
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@pytest.mark.parametrize('detector', ['retinanet', pytest.param('mask_rcnn', marks=pytest.mark.slow)])  # 5 s
def test_detection_training_step_reaches_the_backbone(detector):
    demo = load_demo()
    torch.manual_seed(0)
    height, width = 128, 160
    images, targets = demo.make_batch(2, height, width, num_classes=3)
    model = demo.build_detectors(3, height, width, **MICRO_FOCAL)[detector]
    backbone = model.backbone.body
    before = backbone.body.patch_embed.proj.weight.detach().clone()
    losses = demo.train_step(model, images, targets)
    assert losses and all(math.isfinite(v) for v in losses.values())
    for param in (backbone.body.patch_embed.proj.weight, backbone.body.layers[0].blocks[0].attn.qkv.weight,
                  backbone.stage_norm(backbone.out_indices[-1]).weight):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    assert not torch.equal(backbone.body.patch_embed.proj.weight, before)
    outputs = demo.predict(model, images)
    assert len(outputs) == 2
    for output in outputs:
        assert output['boxes'].ndim == 2 and output['boxes'].shape[1] == 4
        if detector == 'mask_rcnn':
            assert output['masks'].shape[1:] == (1, height, width)


def test_fpn_layouts_for_retinanet_and_mask_rcnn():
    retina = focal_fpn_backbone(out_indices=(1, 2, 3), extra='p6p7', **MICRO_FOCAL).eval()
    mask = focal_fpn_backbone(extra='maxpool', **MICRO_FOCAL).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        retina_maps, mask_maps = retina(x), mask(x)
    assert list(retina_maps) == ['1', '2', '3', 'p6', 'p7']
    assert list(mask_maps) == ['0', '1', '2', '3', 'pool']
    assert [m.shape[-2:] for m in retina_maps.values()] == [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]
    assert all(m.shape[1] == 256 == retina.out_channels for m in retina_maps.values())
    with pytest.raises(ValueError, match='extra'):
        focal_fpn_backbone(extra='p6', **MICRO_FOCAL)
