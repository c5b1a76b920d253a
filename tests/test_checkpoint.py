"""Checkpoint files: atomic writes, choosing what to resume from, full-state round trips."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

import checkpoint as ckpt
from conftest import REPO_ROOT
from config import get_config


def training_parts(seed: int, lr: float = 1e-3) -> ckpt.TrainingParts:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=lr)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** seed)
    return ckpt.TrainingParts(model, optimizer, scaler, ModelEmaV3(model, decay=0.9))


def test_training_state_round_trips_through_a_weights_only_file(tmp_path):
    """Everything but the optimizer's hyperparameters, which stay those of the config in
    force (here another learning rate and weight decay)."""
    parts = training_parts(seed=3)
    parts.model(torch.randn(2, 4)).sum().backward()
    parts.optimizer.step()
    parts.scaler.scale(torch.tensor(1.0))
    parts.scaler.update(new_scale=123.0)
    parts.ema.update(parts.model, step=5)
    path = str(tmp_path / 'ckpt_epoch_4.pth')
    ckpt.save_checkpoint(ckpt.training_state(parts, 4, 55.5, 3, {'MODEL': {'NAME': 'x'}},
                                             {'total_batch': 8}), path)
    checkpoint = ckpt.read_training_state(path)
    assert (checkpoint['epoch'], checkpoint['max_accuracy'], checkpoint['best_epoch']) == (4, 55.5, 3)

    fresh = training_parts(seed=9, lr=2e-3)
    ckpt.restore_training(checkpoint, path, fresh)
    assert fresh.scaler.get_scale() == 123.0
    assert fresh.optimizer.param_groups[0]['lr'] == fresh.optimizer.param_groups[0]['weight_decay'] == 2e-3
    torch.testing.assert_close(fresh.optimizer.state_dict()['state'][0]['exp_avg'],
                               parts.optimizer.state_dict()['state'][0]['exp_avg'])
    for name, value in parts.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[name], value)
        torch.testing.assert_close(fresh.ema.module.state_dict()[name], parts.ema.module.state_dict()[name])


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
        ckpt.save_checkpoint({'epoch': epoch, 'optimizer': {}}, str(tmp_path / f'ckpt_epoch_{epoch}.pth'))
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith('ckpt_epoch_10.pth'), "numeric order"
    (tmp_path / 'ckpt_epoch_11.pth').write_bytes(b'half a file')
    (tmp_path / 'ckpt_epoch_12.pth.tmp.123').write_bytes(b'in progress')
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith('ckpt_epoch_10.pth')
    assert ckpt.latest_checkpoint(str(tmp_path / 'missing')) is None


def test_a_file_without_a_format_version_reads_as_before(tmp_path):
    """Training states carry FORMAT_VERSION; one written before it was recorded restores as before."""
    parts = training_parts(seed=3)
    state = ckpt.training_state(parts, 4, 55.5, 3, {'MODEL': {'NAME': 'x'}}, {'total_batch': 8})
    assert state.pop('format_version') == ckpt.FORMAT_VERSION
    path = str(tmp_path / 'ckpt_epoch_4.pth')
    ckpt.save_checkpoint(state, path)
    fresh = training_parts(seed=9)
    ckpt.restore_training(ckpt.read_training_state(path), path, fresh)
    for name, value in parts.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[name], value)


def test_a_newer_format_version_is_one_error_line_and_not_skipped_for_an_older_file(tmp_path):
    """Resuming from the older file instead would roll the run back."""
    for epoch, version in ((1, ckpt.FORMAT_VERSION), (2, ckpt.FORMAT_VERSION + 1)):
        ckpt.save_checkpoint({'epoch': epoch, 'optimizer': {}, 'format_version': version},
                             str(tmp_path / f'ckpt_epoch_{epoch}.pth'))
    with pytest.raises(ckpt.NewerFormatError) as error:
        ckpt.latest_checkpoint(str(tmp_path))
    assert str(error.value) == (
        f"checkpoint {tmp_path / 'ckpt_epoch_2.pth'} has format version {ckpt.FORMAT_VERSION + 1}, of a "
        f"later version of this code, which reads versions up to {ckpt.FORMAT_VERSION}: update the code "
        f"to read it")


def test_weights_only_checkpoint_cannot_resume_training(tmp_path):
    path = str(tmp_path / 'released.pth')
    torch.save({'model': nn.Linear(4, 4).state_dict()}, path)
    with pytest.raises(ckpt.CheckpointError, match='holds weights only'):
        ckpt.read_training_state(path)


def convert_checkpoint(source: Path, target: Path) -> Path:
    """`scripts/convert_checkpoint.py source target`, which must succeed; returns target."""
    result = subprocess.run([sys.executable, 'scripts/convert_checkpoint.py', str(source), str(target)],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return target


@pytest.mark.slow
def test_official_training_checkpoint_with_yacs_config_is_refused_then_converted(tmp_path):
    """The official code saves its yacs CfgNode in training checkpoints: reading it stays
    weights-only (a clear error naming the converter), and the converter extracts the weights."""
    official = tmp_path / 'ckpt_epoch_299.pth'
    weights = {'head.weight': torch.randn(3, 4), 'head.bias': torch.zeros(3)}
    torch.save({'model': weights, 'config': get_config(), 'epoch': 299}, official)
    with pytest.raises(ckpt.CheckpointError, match=r'holds Python objects .* scripts/convert_checkpoint\.py'):
        ckpt.read_checkpoint(str(official))

    converted = convert_checkpoint(official, tmp_path / 'weights.pth')
    loaded = ckpt.read_checkpoint(str(converted))['model']
    assert loaded.keys() == weights.keys() and torch.equal(loaded['head.weight'], weights['head.weight'])


@pytest.mark.slow
def test_whole_model_saved_with_torch_save_is_converted_to_its_weights(tmp_path):
    """`torch.save(model)` pickles the model object: the read error names the converter, and the
    converter gives the model's weights, which then load into a fresh model."""
    from conftest import MICRO_FOCAL
    from models import FocalTransformer
    torch.manual_seed(0)
    model = FocalTransformer(img_size=32, num_classes=3, **MICRO_FOCAL)
    pickled = tmp_path / 'model.pth'
    torch.save(model, pickled)
    with pytest.raises(ckpt.CheckpointError, match=r'torch\.save\(model\).*scripts/convert_checkpoint\.py'):
        ckpt.read_checkpoint(str(pickled))

    converted = convert_checkpoint(pickled, tmp_path / 'weights.pth')
    fresh = FocalTransformer(img_size=32, num_classes=3, **MICRO_FOCAL)
    ckpt.load_for_evaluation(str(converted), fresh)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_exact_loading_names_what_is_missing_of_another_shape_or_beyond_the_model():
    """Any model: names and shapes of the file against `model.state_dict()`, one line, and the
    way to fine-tune instead."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    weights = {f'module.{name}': value for name, value in model.state_dict().items()}
    weights.pop('module.2.bias')
    weights['module.0.weight'] = torch.zeros(5, 4)
    weights['module.3.weight'] = torch.zeros(3, 3)
    with pytest.raises(ckpt.CheckpointError) as raised:
        ckpt.exact_weights({'model': weights}, model, 'file.pth')
    message = str(raised.value)
    assert '\n' not in message
    assert 'does not fit this Sequential exactly: missing 2.bias; ' in message
    assert 'shape differs (file -> model): 0.weight (5, 4) -> (4, 4); not in the model: 3.weight' in message
    assert message.endswith('fine-tune from it (main.py --pretrained file.pth)')


def test_exact_loading_takes_every_tensor_as_stored_and_skips_recomputed_index_buffers():
    """The official releases hold index tables and attention masks that our models recompute."""
    torch.manual_seed(0)
    model, trained = nn.Linear(4, 3), nn.Linear(4, 3)
    stored = dict(trained.state_dict(), relative_position_index=torch.zeros(9, dtype=torch.long),
                  **{'blocks.1.attn_mask': torch.zeros(4, 4)})
    ckpt.load_exactly(model, {'state_dict': stored}, 'file.pth')
    assert torch.equal(model.weight, trained.weight) and torch.equal(model.bias, trained.bias)
