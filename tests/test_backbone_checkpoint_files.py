"""A backbone's checkpoint file is read as `main.py` reads one (`checkpoint.read_checkpoint`, then
`FocalBackbone.load_checkpoint`): a missing, foreign or truncated file is a one-line
`CheckpointError`, never a traceback from deep inside torch.load."""
import pytest

from checkpoint import CheckpointError, read_checkpoint
from conftest import MICRO_FOCAL
from models.focal_backbone import focal_backbone


def micro_backbone():
    return focal_backbone('focal_tiny', **MICRO_FOCAL)


def test_a_missing_checkpoint_file_is_a_one_line_error(tmp_path):
    path = tmp_path / 'absent.pth'
    with pytest.raises(CheckpointError, match=f'checkpoint not found: {path}'):
        micro_backbone().load_checkpoint(read_checkpoint(path))


@pytest.mark.parametrize('content, message', [(b'not a checkpoint\n', 'is not a checkpoint'),
                                              (b'PK\x03\x04 cut short', 'cannot read checkpoint')])
def test_a_foreign_or_truncated_file_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / 'weights.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        micro_backbone().load_checkpoint(read_checkpoint(str(path)))
    assert '\n' not in str(error.value)

