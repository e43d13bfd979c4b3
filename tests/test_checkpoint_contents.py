"""Checkpoints that load but hold bad contents: refused in one line naming the file and the field.

The checkpoint here has every field that train.py's save_checkpoint writes, around a small
model (the checks do not depend on the network)."""
import copy
import math

import pytest
import torch

from utils.checkpoint import (CheckpointError, atomic_save, check_finite_weights, load_file, load_weights,
                              nonfinite_tensors, validate_training_checkpoint)

PATH = 'weights/sfd_face_checkpoint.pth'
BATCHES_PER_EPOCH = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))


def _checkpoint():
    """What train.py's save_checkpoint writes, 2 batches into epoch 1."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    for p in model.parameters():  # what steps leave (a first step costs seconds on torch 2.14)
        optimizer.state[p]['momentum_buffer'] = torch.randn_like(p)
    scaler = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
              '_growth_tracker': 3}
    return {
        'version': 1, 'weight': model.state_dict(), 'epoch': 1, 'optimizer': optimizer.state_dict(),
        'amp': {'scaler': scaler},
        'state': {'epoch': 1, 'iteration': 6, 'batch_in_epoch': 2, 'best_loss': math.inf, 'loss_sum': 7.5,
                  'loss_count': 2, 'nonfinite_in_a_row': 0, 'unvalidated_epoch': None},
        'step_index': 0, 'rng': {'torch': torch.get_rng_state(), 'cuda': None},
        'args': {'batch_size': 2, 'seed': 0, 'lr': 1e-3}, 'world_size': 1, 'cfg': {'INPUT_SIZE': 640},
        'variant': 'reference',
    }


def _shapes():
    return [p.shape for p in _model().parameters()]


def validate(ckpt):
    validate_training_checkpoint(ckpt, PATH, BATCHES_PER_EPOCH, _shapes())


def test_what_train_py_writes_passes_and_so_do_older_forms(tmp_path):
    ckpt = _checkpoint()
    path = str(tmp_path / 'c.pth')
    atomic_save(ckpt, path)
    validate(load_file(path))  # through a real save and a weights_only load
    older = _checkpoint()
    older['rng']['cuda'] = [torch.zeros(16, dtype=torch.uint8)] * 2  # one state per visible device
    older['amp'] = {'apex': {'loss_scaler0': {'loss_scale': 32.0, 'unskipped': 0}}}
    older['state']['unvalidated_epoch'] = 0  # stopped during the validation of epoch 0
    validate(older)
    validate({'weight': ckpt['weight'], 'epoch': 3})  # weights only: the original repository's
    validate({'weight': ckpt['weight'], 'optimizer': 'not used'})  # train.py restores no optimizer from it
    validate_training_checkpoint(ckpt, PATH)  # nothing to compare with: types and signs only


def _set(ckpt, dotted, value):
    *parents, last = dotted.split('.')
    for key in parents:
        ckpt = ckpt[int(key) if key.isdigit() and isinstance(ckpt, list) else key]
    if value is KeyError:
        del ckpt[last]
    else:
        ckpt[last] = value


# (field set, value, the words the message must hold). Each one loads fine and ended in a
# traceback (or a silent skip) at --resume.
BAD = [
    ('rng.torch', torch.zeros(100, dtype=torch.uint8),
     "field 'rng.torch': expected a generator state (a 1-D uint8 tensor of 5056 bytes), found a uint8 tensor "
     "of shape (100,)"),
    ('rng.torch', torch.zeros(5056), "field 'rng.torch': expected a generator state"),
    ('rng.cuda', 'seed', "field 'rng.cuda': expected a generator state (a 1-D uint8 tensor), found 'seed' (str)"),
    ('rng', [1, 2], "field 'rng': expected a dict, found [1, 2] (list)"),
    ('state.iteration', '12', "field 'state.iteration': expected an integer >= 0, found '12' (str)"),
    ('state.iteration', -1, "field 'state.iteration': expected an integer >= 0, found -1 (int)"),
    ('state.iteration', KeyError, "field 'state.iteration' is missing"),
    ('state.epoch', True, "field 'state.epoch': expected an integer >= 0, found True (bool)"),
    ('state.batch_in_epoch', -1, "field 'state.batch_in_epoch': expected 0 to 3 (the batches already done of "
                                 "an epoch of 4 in this run), found -1 (int)"),
    ('state.batch_in_epoch', 999, "field 'state.batch_in_epoch': expected 0 to 3 (the batches already done of "
                                  "an epoch of 4 in this run), found 999 (int)"),
    ('state.best_loss', math.nan, "field 'state.best_loss': expected a number (not NaN), found nan (float)"),
    ('state.loss_sum', math.inf, "field 'state.loss_sum': expected a finite number, found inf (float)"),
    ('state.loss_count', 2.5, "field 'state.loss_count': expected an integer >= 0, found 2.5 (float)"),
    ('state.unvalidated_epoch', 1, "field 'state.unvalidated_epoch': expected None or an epoch already "
                                   "trained (0 to 0), found 1 (int)"),
    ('state', [1, 2, 3], "field 'state': expected a dict, found [1, 2, 3] (list)"),
    ('optimizer', 'sgd', "field 'optimizer': expected a dict, found 'sgd' (str)"),
    ('optimizer', KeyError, "field 'optimizer' is missing while 'state' is there"),
    ('optimizer.state', [], "field 'optimizer.state': expected a dict, found [] (list)"),
    ('optimizer.param_groups', {}, "field 'optimizer.param_groups': expected a non-empty list of dicts"),
    ('optimizer.param_groups.0.params', [0, 1], "field 'optimizer.param_groups': holds 2 parameters, this "
                                                "model has 4: the optimizer state is of another model"),
    ('optimizer.param_groups.0.momentum', math.nan,
     "field 'optimizer.param_groups[0].momentum': expected a finite number >= 0, found nan (float)"),
    ('optimizer.state.1.momentum_buffer', torch.zeros(3),
     "field 'optimizer.state[1].momentum_buffer': a momentum buffer of shape (3,) for a parameter of shape (4,): "
     "the optimizer state is of another model"),
    ('optimizer.state.1.momentum_buffer', torch.full((4,), math.nan),
     "field 'optimizer.state[1].momentum_buffer' holds NaN or inf"),
    ('optimizer.state.1.momentum_buffer', 'zeros',
     "field 'optimizer.state[1].momentum_buffer': expected a tensor or None, found 'zeros' (str)"),
    ('amp', 'O2', "field 'amp': expected a dict, found 'O2' (str)"),
    ('amp.scaler.scale', -1.0, "field 'amp.scaler.scale': expected a positive number, found -1.0 (float)"),
    ('amp.scaler', 65536.0, "field 'amp.scaler': expected a dict, found 65536.0 (float)"),
    ('world_size', 0, "field 'world_size': expected an integer >= 1, found 0 (int)"),
    ('epoch', '1', "field 'epoch': expected an integer >= 0, found '1' (str)"),
    ('args', 'batch_size=2', "field 'args': expected a dict, found 'batch_size=2' (str)"),
    ('version', 2, "field 'version': 2, written by a newer train.py (this one reads version 1 and older)"),
]


@pytest.mark.parametrize('field, value, words', BAD, ids=[f'{f}={v!r}'[:40] for f, v, _ in BAD])
def test_bad_contents_are_one_line_naming_the_file_and_the_field(field, value, words):
    ckpt = _checkpoint()
    if field.startswith('optimizer.state.'):  # the saved state is keyed by parameter number
        _, _, number, key = field.split('.')
        ckpt['optimizer']['state'][int(number)][key] = value
    else:
        _set(ckpt, field, value)
    with pytest.raises(CheckpointError) as info:
        validate(ckpt)
    message = str(info.value)
    assert message.startswith(f'{PATH}: ') and words in message and '\n' not in message


def test_a_checkpoint_that_is_not_a_dict():
    with pytest.raises(CheckpointError, match=r"^weights/sfd_face_checkpoint\.pth: expected a checkpoint dict, "
                                              r"found \[1, 2\] \(list\)$"):
        validate([1, 2])


def test_nan_and_inf_weights_are_named_at_load_time(tmp_path):
    model = _model()
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


def test_apex_master_weights_are_a_list_of_finite_float_tensors(tmp_path):
    """Apex O2's fp32 master weights, saved beside its loss scaler (utils/device.py), pass; a
    damaged list is named."""
    ckpt = _checkpoint()
    ckpt['amp'] = {'apex': {'loss_scaler0': {'loss_scale': 32.0, 'unskipped': 4}},
                   'apex_master_params': [p.detach().float() for p in _model().parameters()]}
    validate(ckpt)
    for bad, words in (([torch.zeros(2), 'x'], "'amp.apex_master_params[1]': expected a float tensor"),
                       ([torch.tensor([float('nan')])], "'amp.apex_master_params[0]': holds NaN/inf"),
                       ('masters', "'amp.apex_master_params': expected a list of tensors")):
        ckpt['amp']['apex_master_params'] = bad
        with pytest.raises(CheckpointError, match=words.replace('[', r'\[').replace(']', r'\]')):
            validate(ckpt)


@pytest.mark.parametrize('field, value, words', [
    ('state.train_loss', 'low', "'state.train_loss'"), ('state.best_ap', float('nan'), "'state.best_ap'"),
    ('state.best_ap_epoch', -1, "'state.best_ap_epoch'"), ('state.best_aps', [0.5], "'state.best_aps'")])
def test_the_fields_of_ap_during_training_are_checked(field, value, words):
    ckpt = _checkpoint()
    ckpt['state'].update(train_loss=7.5, best_ap=0.4, best_ap_epoch=0, best_loss_epoch=0,
                         best_aps={'easy': 0.5, 'medium': 0.4, 'hard': 0.3})
    validate(ckpt)
    _set(ckpt, field, value)
    with pytest.raises(CheckpointError, match=words):
        validate(ckpt)
