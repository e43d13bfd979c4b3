"""utils/checkpoint.py: what load_file accepts and how it refuses the rest."""
import pytest
import torch

import utils.checkpoint as checkpoint
from utils.checkpoint import CheckpointError, load_file


def test_both_torch_save_formats_load(tmp_path):
    state = {'w': torch.arange(4.0)}
    torch.save(state, tmp_path / 'zip.pth')
    torch.save(state, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)  # torch < 1.6 files
    for name in ('zip.pth', 'legacy.pth'):
        assert torch.equal(load_file(str(tmp_path / name))['w'], state['w'])


@pytest.mark.parametrize('kind, words', [
    ('missing', 'no such file'),
    ('directory', 'is a directory, not a checkpoint file'),
    ('empty', 'not a PyTorch checkpoint (an empty file)'),
    ('text', 'not a PyTorch checkpoint (neither a zip archive nor a pickle)'),
    ('truncated', 'not a readable PyTorch checkpoint'),
])
def test_what_is_not_a_checkpoint_is_one_line_naming_the_file(tmp_path, kind, words):
    path = tmp_path / f'{kind}.pth'
    if kind == 'directory':
        path.mkdir()
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'text':
        path.write_text('{"weights": [1, 2, 3]}\n')
    elif kind == 'truncated':
        torch.save({'w': torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(CheckpointError) as info:
        load_file(str(path))
    message = str(info.value)
    assert message.startswith(f'{path}: ') and words in message and '\n' not in message


def test_an_unreadable_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / 'locked.pth'
    torch.save({'w': torch.zeros(1)}, path)

    def refuse(*args, **kwargs):  # what a file of another user with mode 600 does
        raise PermissionError(13, 'Permission denied')

    monkeypatch.setattr(checkpoint, 'open', refuse, raising=False)
    with pytest.raises(CheckpointError, match=r'locked.pth: cannot read the file \(Permission denied\)$'):
        load_file(str(path))
