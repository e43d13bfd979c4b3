"""utils/files/weights.py: what load_file accepts and how it refuses the rest."""
import pytest
import torch

import utils.files.weights as checkpoint
from utils.files.weights import CheckpointError, load_file


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


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))


def test_nan_and_inf_weights_are_named_at_load_time():
    import copy
    import math

    from utils.files.weights import check_finite_weights, load_weights, nonfinite_tensors

    model = _small_model()
    state = copy.deepcopy(model.state_dict())
    assert nonfinite_tensors(state) == []
    state['0.bias'][1] = math.nan
    state['1.weight'][0, 0] = math.inf
    assert nonfinite_tensors(state) == ['0.bias', '1.weight']
    with pytest.raises(CheckpointError, match=r'^m\.pth: 2 of 4 weight tensors hold NaN or inf \(0\.bias, '
                                              r'1\.weight\): the model had diverged when it was saved; use an '
                                              r'earlier checkpoint$'):
        check_finite_weights(state, 'm.pth')
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=r'^m\.pth: 2 of 4 weight tensors hold NaN or inf'):
        load_weights(model, state, 'm.pth')  # what train.py's --resume and --basenet go through
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


@pytest.mark.parametrize('make, words', [
    (lambda t: t.to(torch.int32), '0.weight (int32, cpu)'),  # load_state_dict would copy the integers in
    (lambda t: torch.empty_like(t, device='meta'), '0.weight (float32, meta)'),  # no values to load
])
def test_weights_of_another_kind_are_refused_by_every_loading_path(make, words):
    from utils.files.weights import load_weights

    model = _small_model()
    state = dict(model.state_dict(), **{'0.weight': make(model.state_dict()['0.weight'])})
    with pytest.raises(CheckpointError) as info:
        load_weights(model, state, 'm.pth')
    assert str(info.value).startswith('m.pth: does not fit Sequential: tensors of another kind') and words in str(info.value)
