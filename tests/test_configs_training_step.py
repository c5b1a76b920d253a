"""Every shipped config loads, builds its model and takes one training step through the real
loader, pipeline, mixup, loss, optimizer and schedule (`engine.train_one_epoch`), at its own
image size and depths, with the width scaled down where full size is too slow for a CPU test."""
import logging

import pytest
import torch

import main
from config import get_config, validate_config
from conftest import REPO_ROOT, SHIPPED_CONFIGS
from data.build import build_loader
from engine import NonFiniteGuard, StepSettings, train_one_epoch
from lr_scheduler import build_scheduler, scaled_learning_rates
from models import build_model
from optimizer import build_optimizer

# Scaled-down widths of the timm baselines (MODEL.TIMM.KWARGS), by model-name prefix: attention
# models keep 8 channels per head in their first stage, with the heads of each stage scaled alike.
TIMM_WIDTHS = {
    'swin_': dict(embed_dim=8, num_heads=(1, 2, 4, 8)),
    'deit_': dict(embed_dim=16, num_heads=2),
    'vit_': dict(embed_dim=16, num_heads=2),
    'resnet': dict(channels=(8, 16, 32, 64), stem_width=8),
}
FOCAL_HEAD_DIM = 8  # first-stage channels per head of the scaled-down Focal Transformers

pytestmark = pytest.mark.usefixtures('one_thread')


def scaled_down(path: str, data_path: str):
    """The config of `path` on `data_path` with batches of 2 and a narrow model."""
    config = get_config(main.parse_args(['--cfg', path, '--data-path', data_path, '--batch-size', '2',
                                         '--opts', 'DATA.NUM_WORKERS', '0', 'DATA.PIN_MEMORY', 'False']))
    config.defrost()
    if config.MODEL.TYPE != 'timm':
        focal = config.MODEL.FOCAL
        first_heads = focal.NUM_HEADS[0]
        focal.NUM_HEADS = [heads // first_heads for heads in focal.NUM_HEADS]
        focal.EMBED_DIM = FOCAL_HEAD_DIM
    else:
        widths = [kwargs for prefix, kwargs in TIMM_WIDTHS.items() if config.MODEL.TIMM.NAME.startswith(prefix)]
        assert widths, f"{path}: add a scaled-down width for timm model {config.MODEL.TIMM.NAME} to TIMM_WIDTHS"
        config.MODEL.TIMM.KWARGS.update(widths[0])
    validate_config(config)
    return config


@pytest.mark.parametrize('path', SHIPPED_CONFIGS)
def test_config_builds_its_model_and_takes_a_training_step(path, tiny_data):
    config = scaled_down(f'{REPO_ROOT}/{path}', tiny_data)
    loaders = build_loader(config)
    torch.manual_seed(0)
    model = build_model(main.with_num_classes(config, loaders.num_classes))  # as main.set_up does
    rates = scaled_learning_rates(config, total_batch=config.DATA.BATCH_SIZE)
    optimizer = build_optimizer(config, model, rates.base)
    scheduler = build_scheduler(config, optimizer, 1, rates)
    criterion = main.build_criterion(config, loaders.mixup_fn is not None)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    loaders.set_epoch(0)
    logger = logging.getLogger('test')
    loss = train_one_epoch(model=model, criterion=criterion, loader=loaders.loader_train, optimizer=optimizer,
                           scheduler=scheduler, scaler=None, ema=None, mixup_fn=loaders.mixup_fn, epoch=0,
                           num_epochs=config.TRAIN.EPOCHS, steps_per_epoch=1,
                           settings=StepSettings(clip_grad=config.TRAIN.CLIP_GRAD),
                           guard=NonFiniteGuard(1, logger), device=torch.device('cpu'), logger=logger)
    assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters())), \
        f"{path}: the training step changed no weight"
