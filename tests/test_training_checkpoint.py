"""utils/training/checkpoint.py: the training checkpoint's format, and how a file that cannot be
restored exactly is refused in one line naming the file and the field.

The checkpoints here are what save_checkpoint writes around a small model (the checks do not
depend on the network); train.py's own resume of damaged files is in tests/test_train.py."""
import math
import types

import pytest
import torch

from utils.files.weights import CheckpointError, atomic_save, load_file
from utils.training.checkpoint import (TrainState, check_checkpoint, check_resume_options, checkpoint_contents,
                                       checkpoint_template)

PATH = 'weights/sfd_face_checkpoint.pth'
BATCHES_PER_EPOCH = 4
SCALER = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
          '_growth_tracker': 3}


class Runtime:
    """The parts of utils.device.Runtime a checkpoint reads: a CPU run with a GradScaler."""
    type, device = 'cpu', torch.device('cpu')

    def state_dict(self):
        return {'scaler': dict(SCALER)}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))


def _run():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    args = types.SimpleNamespace(batch_size=2, seed=0, lr=1e-3)
    return model, optimizer, args


def _checkpoint():
    """What save_checkpoint writes, 2 batches into epoch 1, after some steps (momentum buffers)."""
    model, optimizer, args = _run()
    for p in model.parameters():  # what steps leave (a first step costs seconds on torch 2.14)
        optimizer.state[p]['momentum_buffer'] = torch.randn_like(p)
    state = TrainState(epoch=1, iteration=6, batch_in_epoch=2, loss_sum=7.5, loss_count=2)
    return checkpoint_contents(model, optimizer, Runtime(), args, state)


def validate(ckpt):
    model, optimizer, args = _run()
    state = check_checkpoint(ckpt, PATH, checkpoint_template(model, optimizer, Runtime(), args))
    check_resume_options(PATH, ckpt, state, args, 1, BATCHES_PER_EPOCH, log=lambda *a: None)
    return state


def test_what_save_checkpoint_writes_passes_and_so_do_older_forms(tmp_path):
    ckpt = _checkpoint()
    path = str(tmp_path / 'c.pth')
    atomic_save(ckpt, path)
    state = validate(load_file(path))  # through a real save and a weights_only load
    assert state == TrainState(epoch=1, iteration=6, batch_in_epoch=2, loss_sum=7.5, loss_count=2)
    older = _checkpoint()
    older['rng']['cuda'] = [torch.zeros(16, dtype=torch.uint8)] * 2  # one state per visible device
    older['amp'] = {'apex': {'loss_scaler0': {'loss_scale': 32.0, 'unskipped': 0}}}  # another --amp
    older['state'] = {'epoch': 1, 'iteration': 6, 'batch_in_epoch': 0, 'unvalidated_epoch': 0}  # fewer fields
    del older['version']
    for group in older['optimizer']['param_groups']:  # torch fills in the flags an older torch lacked
        del group['differentiable'], group['fused']
    assert validate(older).unvalidated_epoch == 0


def _set(ckpt, dotted, value):
    if dotted.startswith('weight.'):  # the keys of a state_dict hold dots
        ckpt, dotted = ckpt['weight'], dotted[len('weight.'):].replace('.', '/')
    *parents, last = [key.replace('/', '.') for key in dotted.split('.')]
    for key in parents:
        ckpt = ckpt[int(key) if key.isdigit() else key]
    if isinstance(ckpt, list):
        last = int(last)
    if value is KeyError:
        del ckpt[last]
    else:
        ckpt[last] = value


# (field set, value, the words the message must hold). Each loads fine; restoring it would end in
# a traceback, or in a run that is silently not the one saved.
BAD = [
    ('rng', None, "field 'rng': expected a dict, found None"),
    ('rng', [1, 2], "field 'rng': expected a dict, found [1, 2] (list)"),
    ('rng.torch', torch.zeros(100, dtype=torch.uint8),
     "field 'rng.torch': expected a uint8 tensor of shape (5056,), found a uint8 tensor of shape (100,)"),
    ('rng.torch', torch.zeros(5056), "field 'rng.torch': expected a uint8 tensor of shape (5056,), found a float32"),
    ('state.iteration', '12', "field 'state.iteration': expected an integer, found '12' (str)"),
    ('state.iteration', -1, "field 'state.iteration': expected an integer from 0 to 9223372036854775807, found -1"),
    ('state.iteration', 10 ** 30, "field 'state.iteration': expected an integer from 0 to 9223372036854775807"),
    ('state.epoch', 10 ** 30, "field 'state.epoch': expected an integer from 0 to 9223372036854775807"),
    ('state.epoch', 7, "field 'state.epoch': expected at most the iterations done (6)"),
    ('state.iteration', KeyError, "field 'state.iteration' is missing"),
    ('state.epoch', True, "field 'state.epoch': expected an integer, found True (bool)"),
    ('state.batch_in_epoch', 999, "field 'state.batch_in_epoch': expected 0 to 3 (the batches already done of an "
                                  "epoch of 4 in this run), found 999 (int)"),
    ('state.best_loss', math.nan, "field 'state.best_loss': expected a number, finite and at least 0, found nan"),
    ('state.loss_sum', math.inf, "field 'state.loss_sum': expected a number, finite and at least 0, found inf"),
    ('state.loss_count', 2.5, "field 'state.loss_count': expected an integer, found 2.5 (float)"),
    ('state.unvalidated_epoch', 1, "field 'state.unvalidated_epoch': expected None or an epoch already trained "
                                   "(below 1), found 1 (int)"),
    ('state.best_aps', [0.5], "field 'state.best_aps': expected a dict of numbers by name, found [0.5] (list)"),
    ('state', [1, 2, 3], "field 'state': expected a dict, found [1, 2, 3] (list)"),
    ('optimizer', 'sgd', "field 'optimizer': expected a dict, found 'sgd' (str)"),
    ('optimizer', KeyError, "field 'optimizer' is missing while 'state' is there"),
    ('optimizer.state', [], "field 'optimizer.state': expected a dict, found [] (list)"),
    ('optimizer.param_groups', {}, "field 'optimizer.param_groups': expected a list of 1 items, found {} (dict)"),
    ('optimizer.param_groups.0.params', [0, 1],
     "field 'optimizer.param_groups[0].params': expected a list of 4 items, found [0, 1] (list)"),
    ('optimizer.param_groups.0.dampening', KeyError, "field 'optimizer.param_groups[0].dampening' is missing"),
    ('optimizer.param_groups.0.nesterov', 'yes',
     "field 'optimizer.param_groups[0].nesterov': expected a boolean, found 'yes' (str)"),
    ('optimizer.param_groups.0.momentum', math.nan,
     "field 'optimizer.param_groups[0].momentum': expected a number, finite and at least 0, found nan (float)"),
    ('optimizer.state.1.momentum_buffer', torch.zeros(3),
     "field 'optimizer.state.1.momentum_buffer': a momentum buffer of shape (3,) for a parameter of shape (4,): "
     "the optimizer state is of another model"),
    ('optimizer.state.1.momentum_buffer', torch.full((4,), math.nan),
     "field 'optimizer.state.1.momentum_buffer' holds NaN or inf"),
    ('optimizer.state.1.momentum_buffer', 'zeros',
     "field 'optimizer.state.1.momentum_buffer': expected a tensor or None, found 'zeros' (str)"),
    ('optimizer.state.1.momentum_buffer', torch.zeros(4, device='meta'),
     "field 'optimizer.state.1.momentum_buffer': a tensor on device 'meta'"),
    ('amp', 'O2', "field 'amp': expected a dict, found 'O2' (str)"),
    ('amp.scaler.scale', -1.0, "field 'amp.scaler.scale': expected a number, finite and at least 0, found -1.0"),
    ('amp.scaler', 65536.0, "field 'amp.scaler': expected a dict, found 65536.0 (float)"),
    ('world_size', 0, "field 'world_size': expected an integer >= 1, found 0 (int)"),
    ('epoch', '1', "field 'epoch': expected an integer, found '1' (str)"),
    ('args', 'batch_size=2', "field 'args': expected a dict, found 'batch_size=2' (str)"),
    ('args.batch_size', '2', "field 'args.batch_size': expected an integer, found '2' (str)"),
    ('version', 2, "field 'version': 2, written by a newer train.py (this one reads version 1 and older)"),
    ('weight.0.weight', torch.zeros(4, 3, 3, 3, device='meta'), "field 'weight.0.weight': a tensor on device 'meta'"),
    ('weight.0.bias', torch.tensor([1.0, math.nan, 0.0, 0.0]), "field 'weight.0.bias' holds NaN or inf"),
]


@pytest.mark.parametrize('field, value, words', BAD, ids=[f'{f}={v!r}'[:40] for f, v, _ in BAD])
def test_bad_contents_are_one_line_naming_the_file_and_the_field(field, value, words):
    ckpt = _checkpoint()
    _set(ckpt, field, value)
    with pytest.raises(CheckpointError) as info:
        validate(ckpt)
    message = str(info.value)
    assert message.startswith(f'{PATH}: ') and words in message and '\n' not in message, message


def test_a_checkpoint_that_is_not_a_dict():
    with pytest.raises(CheckpointError, match=r"^weights/sfd_face_checkpoint\.pth: expected a checkpoint dict, "
                                              r"found \[1, 2\] \(list\)$"):
        validate([1, 2])


def test_apex_master_weights_are_finite_tensors():
    """Apex O2's fp32 master weights, saved beside its loss scaler (utils/device.py), pass; NaN in
    them is named (their number of tensors and shapes are the device context's to check)."""
    ckpt = _checkpoint()
    ckpt['amp'] = {'apex': {'loss_scaler0': {'loss_scale': 32.0, 'unskipped': 4}},
                   'apex_master_params': [p.detach().float() for p in _model().parameters()]}
    validate(ckpt)
    ckpt['amp']['apex_master_params'][1] = torch.tensor([math.nan] * 4)
    with pytest.raises(CheckpointError, match=r"field 'amp\.apex_master_params\[1\]' holds NaN or inf"):
        validate(ckpt)


def test_the_fields_of_ap_during_training_pass():
    ckpt = _checkpoint()
    ckpt['state'].update(train_loss=7.5, best_ap=0.4, best_ap_epoch=0, best_loss_epoch=0, best_loss=3.0,
                         best_aps={'easy': 0.5, 'medium': 0.4, 'hard': 0.3})
    state = validate(ckpt)
    assert state.best_aps == {'easy': 0.5, 'medium': 0.4, 'hard': 0.3} and state.best_loss == 3.0


def test_record_validation_keeps_the_best_loss_and_the_best_mean_ap():
    state = TrainState()
    assert state.record_validation(0, 5.0, {'easy': 0.3, 'medium': 0.2, 'hard': 0.1}) == (True, True)
    assert state.record_validation(1, 6.0, {'easy': 0.6, 'medium': 0.3, 'hard': 0.0}) == (False, True)
    assert state.record_validation(2, 4.0, None) == (True, False)
    assert state.record_validation(3, math.nan, None) == (False, False)  # a diverged epoch is never the best
    assert (state.best_loss, state.best_loss_epoch, state.best_ap_epoch) == (4.0, 2, 1)
    assert state.best_ap == pytest.approx(0.3) and state.best_aps['easy'] == 0.6
