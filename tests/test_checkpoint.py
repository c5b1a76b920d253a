"""Checkpoint files: atomic writes, choosing what to resume from, full-state round trips."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

import checkpoint as ckpt
from lr_scheduler import build_scheduler
from config import get_config


def training_parts(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = get_config()
    config.defrost()
    config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS = 2, 1
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=5)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** seed)
    ema = ModelEmaV3(model, decay=0.9)
    return model, optimizer, scheduler, scaler, ema


def test_training_state_round_trips_through_a_weights_only_file(tmp_path):
    model, optimizer, scheduler, scaler, ema = training_parts(seed=3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step_update(7)
    scaler.scale(torch.tensor(1.0))
    scaler.update(new_scale=123.0)
    ema.update(model, step=5)
    path = str(tmp_path / 'ckpt_epoch_4.pth')
    ckpt.save_checkpoint(ckpt.training_state(model, optimizer, scheduler, scaler, ema, 4, 55.5,
                                             {'MODEL': {'NAME': 'x'}}), path)
    torch.load(path, weights_only=True)

    fresh = training_parts(seed=9)
    start_epoch, best = ckpt.restore_training(path, *fresh)
    assert (start_epoch, best) == (5, 55.5)
    model2, optimizer2, scheduler2, scaler2, ema2 = fresh
    assert scaler2.get_scale() == 123.0
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optimizer2.param_groups[0]['lr'] == optimizer.param_groups[0]['lr']
    torch.testing.assert_close(optimizer2.state_dict()['state'][0]['exp_avg'],
                               optimizer.state_dict()['state'][0]['exp_avg'])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[name], value)
        torch.testing.assert_close(ema2.module.state_dict()[name], ema.module.state_dict()[name])


def test_save_is_atomic_and_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt_epoch_0.pth')
    ckpt.save_checkpoint({'epoch': 0}, path)

    def crash(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint({'epoch': 1}, path)
    assert torch.load(path, weights_only=True) == {'epoch': 0}


def test_latest_checkpoint_skips_an_unreadable_newest_file(tmp_path):
    for epoch in (1, 2, 10):
        ckpt.save_checkpoint({'epoch': epoch}, str(tmp_path / f'ckpt_epoch_{epoch}.pth'))
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith('ckpt_epoch_10.pth'), "numeric order"
    (tmp_path / 'ckpt_epoch_11.pth').write_bytes(b'half a file')
    (tmp_path / 'ckpt_epoch_12.pth.tmp.123').write_bytes(b'in progress')
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith('ckpt_epoch_10.pth')
    assert ckpt.latest_checkpoint(str(tmp_path / 'missing')) is None


def test_weights_only_checkpoint_cannot_resume_training(tmp_path):
    path = str(tmp_path / 'released.pth')
    torch.save({'model': nn.Linear(4, 4).state_dict()}, path)
    with pytest.raises(ckpt.CheckpointError, match='holds weights only'):
        ckpt.restore_training(path, *training_parts(seed=1))


def test_official_training_checkpoint_with_yacs_config_is_refused_then_converted(tmp_path):
    """The official code saves its yacs CfgNode in training checkpoints: reading it stays
    weights-only (a clear error naming the converter), and the converter extracts the weights."""
    official = tmp_path / 'ckpt_epoch_299.pth'
    weights = {'head.weight': torch.randn(3, 4), 'head.bias': torch.zeros(3)}
    torch.save({'model': weights, 'config': get_config(), 'epoch': 299}, official)
    with pytest.raises(ckpt.CheckpointError, match=r'holds Python objects .* scripts/convert_checkpoint\.py'):
        ckpt.read_checkpoint(str(official))

    converted = tmp_path / 'weights.pth'
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, 'scripts/convert_checkpoint.py', str(official), str(converted)],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = ckpt.read_checkpoint(str(converted))['model']
    assert loaded.keys() == weights.keys() and torch.equal(loaded['head.weight'], weights['head.weight'])
