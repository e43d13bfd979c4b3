"""Checkpoint files: atomic saving, safe loading, and model weights in and out.

Every file that may come from elsewhere is read with `torch.load(..., weights_only=True)`,
so a pickle that would execute code is refused. Errors are `CheckpointError` with a
one-line message that names the file.
"""
import math

import torch

from utils.cli import UserError
from utils.files.fileio import atomic_path


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def _tensors(obj):
    """The tensors inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def tensor_bytes(obj):
    """Bytes of the tensor data inside `obj` (nested dicts, lists, tuples), each storage counted
    once: about the size `torch.save(obj)` writes (the pickle and the zip records add a few
    hundred bytes per tensor)."""
    storages = {}
    for t in _tensors(obj):
        try:
            storage = t.untyped_storage()
            storages[(str(t.device), storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse, meta: count the elements
            storages[id(t)] = t.numel() * t.element_size()
    return sum(storages.values())


def save_size_estimate(obj):
    """A little more than `torch.save(obj)` writes: the tensor bytes plus 1 KiB per tensor and
    64 KiB for the rest (measured: an S3FD checkpoint writes 0.03% more than its tensors)."""
    return tensor_bytes(obj) + 1024 * sum(1 for _ in _tensors(obj)) + 65536


def atomic_save(obj, path):
    """torch.save through a temporary file renamed over `path`, synced to disk first.

    A crash or kill during the write leaves the previous file intact. A full disk raises
    `utils.files.fileio.DiskFullError` (an OSError): one line naming `path`, the space free and the
    size of the file, where torch itself says 'basic_ios::clear: iostream error'.
    """
    # Through a Python file rather than a path: torch's own C++ file writer reports a full disk
    # as 'basic_ios::clear: iostream error' without an errno, and keeps the failed file open (its
    # space held) until the process ends; a Python file raises ENOSPC and is closed here.
    with atomic_path(path, sync=True, needed=save_size_estimate(obj)) as tmp, open(tmp, 'wb') as handle:
        torch.save(obj, handle)


def load_file(path, map_location='cpu'):
    """Read a checkpoint with weights_only=True; CheckpointError on any failure."""
    try:
        with open(path, 'rb') as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise CheckpointError(f'{path}: is a directory, not a checkpoint file') from None
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read the file ({e.strerror or e})') from None
    # torch.save writes a zip archive; files of torch < 1.6 are a pickle (protocol 2: 0x80 0x02).
    if magic != b'PK\x03\x04' and not magic.startswith(b'\x80'):
        what = 'an empty file' if not magic else 'neither a zip archive nor a pickle'
        raise CheckpointError(f'{path}: not a PyTorch checkpoint ({what})')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if 'Unsupported global' in str(e) or 'GLOBAL' in str(e):
            raise CheckpointError(f'{path}: refused: the file holds Python objects other than '
                                  f'tensors and plain containers, and weights_only=True does not '
                                  f'execute them') from None
        if 'Weights only load failed' in msg:
            msg = 'unrecognised content'
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({msg})') from None


_PREFIXES = ('module.', '_orig_mod.')


def extract_state_dict(obj, path='<checkpoint>'):
    """The model state_dict inside a loaded checkpoint.

    Accepts a plain state_dict, a training checkpoint ({'weight': ...} as written by
    train.py), or {'model': ...} / {'state_dict': ...}. Strips DDP's 'module.' and
    torch.compile's '_orig_mod.' prefixes.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: expected a state_dict or a checkpoint dict, found {type(obj).__name__}')
    state = obj
    for key in ('weight', 'model', 'state_dict'):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path}: no model weights found (expected a dict of tensors, '
                              f'or one under "weight", "model" or "state_dict")')
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def describe_keys(keys, limit=8):
    """'a, b, c, ... (N in all)': a sorted, shortened list of state_dict keys for messages."""
    keys = sorted(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')


def nonfinite_tensors(state_dict):
    """Names of the floating-point tensors of `state_dict` that hold a NaN or inf, in order."""
    named = [(k, v) for k, v in state_dict.items()
             if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel()]
    if not named:
        return []
    flags = torch.stack([~torch.isfinite(v.detach()).all() for _, v in named]).tolist()  # one sync
    return [k for (k, _), bad in zip(named, flags) if bad]


def check_finite_weights(state_dict, path='<checkpoint>'):
    """CheckpointError naming the file and the tensors when any weight is NaN or inf: such a
    model was saved after it diverged, and would detect nothing (or train nothing)."""
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise CheckpointError(f'{path}: {len(bad)} of {len(state_dict)} weight tensors hold NaN or inf '
                              f'({describe_keys(bad, 3)}): the model had diverged when it was saved; '
                              f'use an earlier checkpoint')


def load_weights(module, state_dict, path='<checkpoint>'):
    """module.load_state_dict(strict=True) with a clear message on any mismatch, and
    `check_finite_weights` first: weights holding NaN or inf are refused at load time."""
    own = module.state_dict()
    missing = set(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    problems = []
    if missing:
        problems.append(f'missing keys: {describe_keys(missing)}')
    if unexpected:
        problems.append(f'unexpected keys: {describe_keys(unexpected)}')
    wrong = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
             for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if wrong:
        problems.append(f'shape mismatch (file vs model): {describe_keys(wrong, 4)}')
    # What load_state_dict would take without a word: integers copied into float weights, and
    # tensors that hold no values ('meta') or are not dense.
    odd = [f'{k} ({str(state_dict[k].dtype).replace("torch.", "")}, {state_dict[k].device.type})'
           for k, v in own.items() if k in state_dict
           and (state_dict[k].is_floating_point() != v.is_floating_point() or state_dict[k].device.type == 'meta'
                or state_dict[k].layout != torch.strided)]
    if odd:
        problems.append(f'tensors of another kind than the model\'s (dense, with values, floating-point where '
                        f'its are): {describe_keys(odd, 3)}')
    if problems:
        raise CheckpointError(f'{path}: does not fit {type(module).__name__}: ' + '; '.join(problems))
    check_finite_weights(state_dict, path)
    module.load_state_dict(state_dict, strict=True)


def check_layout(state, expected, path, layout_name, hint=None):
    """Raise CheckpointError unless `state` holds every key of `expected` with its shape.

    state: {key: tensor}; expected: {key: torch.Size}. The message names the file, lists
    the missing keys and the shape mismatches, and ends with `hint` when given.
    """
    missing = [k for k in expected if k not in state]
    wrong = [f'{k} {tuple(state[k].shape)} (expected {tuple(shape)})'
             for k, shape in expected.items() if k in state and state[k].shape != shape]
    if not missing and not wrong:
        return
    problems = []
    if missing:
        problems.append(f'missing {len(missing)} of {len(expected)} keys: {describe_keys(missing, 10)}')
    if wrong:
        problems.append(f'wrong shapes: {describe_keys(wrong, 4)}')
    message = f'{path}: not the {layout_name} layout: ' + '; '.join(problems)
    if hint:
        message += f' ({hint})'
    raise CheckpointError(message)


def checkpoint_variant(obj):
    """Model variant recorded in a checkpoint ('reference', 'caffe'), or None."""
    if isinstance(obj, dict):
        if isinstance(obj.get('variant'), str):
            return obj['variant']
        if isinstance(obj.get('cfg'), dict) and isinstance(obj['cfg'].get('MODEL_VARIANT'), str):
            return obj['cfg']['MODEL_VARIANT']
    return None


def load_model(path, phase='test', device='cpu', variant=None):
    """Build S3FD and load weights from `path` (plain state_dict or training checkpoint).

    The variant is taken from `variant`, else from the checkpoint, else cfg's default.
    Returns the network on `device`, in eval mode for phase 'test'.
    """
    from s3fd import build_s3fd  # local import: keeps this module free of model code

    obj = load_file(path)
    net = build_s3fd(phase, variant=variant or checkpoint_variant(obj))
    load_weights(net, extract_state_dict(obj, path), path)
    net.to(device)
    if phase == 'test':
        net.eval()
    return net


# -- the contents of a training checkpoint (train.py's save_checkpoint) -----------------------

def _show(value):
    """A short description of a bad value for a message."""
    if isinstance(value, torch.Tensor):
        return f'a {str(value.dtype).replace("torch.", "")} tensor of shape {tuple(value.shape)}'
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + '...'
    return f'{text} ({type(value).__name__})'


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Fields:
    """Field checks that raise CheckpointError naming the file and the field."""

    def __init__(self, path):
        self.path = path

    def bad(self, field, expected, value):
        raise CheckpointError(f"{self.path}: field '{field}': expected {expected}, found {_show(value)}")

    def dict(self, field, value):
        if not isinstance(value, dict):
            self.bad(field, 'a dict', value)
        return value

    def int(self, field, value, low=0, high=None, expected=None):
        """An int (not a bool) with low <= value (< high)."""
        if not _is_int(value) or value < low or (high is not None and value >= high):
            if expected is None:
                expected = f'an integer >= {low}' if high is None else f'an integer from {low} to {high - 1}'
            self.bad(field, expected, value)
        return value

    def number(self, field, value, finite=True, positive=False):
        ok = _is_number(value) and not math.isnan(value) and (not finite or math.isfinite(value))
        if ok and positive and not value > 0:
            ok = False
        if not ok:
            what = 'a positive number' if positive else 'a finite number' if finite else 'a number (not NaN)'
            self.bad(field, what, value)
        return value

    def byte_tensor(self, field, value, size=None):
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
                and (size is None or value.numel() == size)):
            self.bad(field, 'a generator state (a 1-D uint8 tensor' + (f' of {size} bytes)' if size else ')'),
                     value)
        return value

    def finite_tensors(self, field, value):
        bad = nonfinite_tensors(value)
        if bad:
            raise CheckpointError(f"{self.path}: field '{field}.{bad[0]}' holds NaN or inf: the run had "
                                  f"diverged when it was saved; use an earlier checkpoint")


def _check_state(f, state, batches_per_epoch):
    f.dict('state', state)
    for key in ('epoch', 'iteration', 'batch_in_epoch'):
        if key not in state:
            raise CheckpointError(f"{f.path}: field 'state.{key}' is missing: the position to resume "
                                  f"from is incomplete")
    epoch = f.int('state.epoch', state['epoch'])
    f.int('state.iteration', state['iteration'])
    if batches_per_epoch is None:
        f.int('state.batch_in_epoch', state['batch_in_epoch'])
    else:
        f.int('state.batch_in_epoch', state['batch_in_epoch'], 0, batches_per_epoch,
              f'0 to {batches_per_epoch - 1} (the batches already done of an epoch of '
              f'{batches_per_epoch} in this run)')
    if 'best_loss' in state:
        f.number('state.best_loss', state['best_loss'], finite=False)
    for key in ('train_loss', 'best_ap'):  # None until an epoch was trained / evaluated for AP
        if state.get(key) is not None:
            f.number(f'state.{key}', state[key])
    for key in ('best_loss_epoch', 'best_ap_epoch'):
        if state.get(key) is not None:
            f.int(f'state.{key}', state[key])
    if state.get('best_aps') is not None:
        f.dict('state.best_aps', state['best_aps'])
        for setting, ap in state['best_aps'].items():
            f.number(f'state.best_aps.{setting}', ap)
    if 'loss_sum' in state:
        f.number('state.loss_sum', state['loss_sum'])
    for key in ('loss_count', 'nonfinite_in_a_row'):
        if key in state:
            f.int(f'state.{key}', state[key])
    if state.get('unvalidated_epoch') is not None:
        f.int('state.unvalidated_epoch', state['unvalidated_epoch'], 0, max(epoch, 0),
              f'None or an epoch already trained (0 to {epoch - 1})' if epoch > 0 else 'None (epoch is 0)')


def _check_optimizer(f, optimizer, parameter_shapes):
    f.dict('optimizer', optimizer)
    groups = optimizer.get('param_groups')
    if not isinstance(groups, list) or not groups:
        f.bad('optimizer.param_groups', 'a non-empty list of dicts', groups)
    ids = []
    for g, group in enumerate(groups):
        field = f'optimizer.param_groups[{g}]'
        f.dict(field, group)
        params = group.get('params')
        if not isinstance(params, list) or not all(_is_int(p) for p in params):
            f.bad(f'{field}.params', 'a list of parameter numbers', params)
        ids.extend(params)
        for key in ('lr', 'momentum', 'dampening', 'weight_decay'):
            if key in group:
                value = group[key]
                if not _is_number(value) or not math.isfinite(value) or value < 0:
                    f.bad(f'{field}.{key}', 'a finite number >= 0', value)
    if len(set(ids)) != len(ids):
        f.bad('optimizer.param_groups', 'each parameter in one group only', sorted(ids))
    if parameter_shapes is not None and len(ids) != len(parameter_shapes):
        raise CheckpointError(f"{f.path}: field 'optimizer.param_groups': holds {len(ids)} parameters, "
                              f"this model has {len(parameter_shapes)}: the optimizer state is of another model")
    shapes = dict(zip(ids, parameter_shapes)) if parameter_shapes is not None else {}
    states = f.dict('optimizer.state', optimizer.get('state'))
    for key, value in states.items():
        field = f'optimizer.state[{key!r}]'
        if key not in ids:
            f.bad('optimizer.state', f'states of the parameters listed in param_groups (0 to {len(ids) - 1})',
                  key)
        f.dict(field, value)
        buffer = value.get('momentum_buffer')
        if buffer is not None:
            if not isinstance(buffer, torch.Tensor):
                f.bad(f'{field}.momentum_buffer', 'a tensor or None', buffer)
            if key in shapes and tuple(buffer.shape) != tuple(shapes[key]):
                raise CheckpointError(f"{f.path}: field '{field}.momentum_buffer': a momentum buffer of shape "
                                      f"{tuple(buffer.shape)} for a parameter of shape {tuple(shapes[key])}: "
                                      f"the optimizer state is of another model")
        f.finite_tensors(field, value)


def _check_amp(f, amp):
    f.dict('amp', amp)
    for name, value in amp.items():
        if name == 'apex_master_params':  # Apex O2's fp32 master weights (utils.device), one per parameter
            if not isinstance(value, (list, tuple)):
                raise CheckpointError(f"{f.path}: field 'amp.apex_master_params': expected a list of tensors, "
                                      f'found {_show(value)}')
            for k, tensor in enumerate(value):
                if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                    raise CheckpointError(f"{f.path}: field 'amp.apex_master_params[{k}]': expected a float "
                                          f'tensor, found {_show(tensor)}')
            bad = nonfinite_tensors(dict(enumerate(value)))
            if bad:
                raise CheckpointError(f"{f.path}: field 'amp.apex_master_params[{bad[0]}]': holds NaN/inf")
            continue
        f.dict(f'amp.{name}', value)
        # GradScaler: {'scale': 65536.0, '_growth_tracker': 0, ...}; Apex: {'loss_scaler0':
        # {'loss_scale': 32.0, 'unskipped': 0}}.
        inner = [(f'amp.{name}', value)] + [(f'amp.{name}.{k}', v) for k, v in value.items() if isinstance(v, dict)]
        for field, table in inner:
            for key in ('scale', 'loss_scale'):
                if key in table and table[key] is not None:
                    f.number(f'{field}.{key}', table[key], positive=True)


def _check_rng(f, rng, cuda_rng_bytes):
    f.dict('rng', rng)
    if rng.get('torch') is not None:
        f.byte_tensor('rng.torch', rng['torch'], torch.get_rng_state().numel())
    cuda = rng.get('cuda')
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible device
        for k, item in enumerate(cuda):
            f.byte_tensor(f'rng.cuda[{k}]', item, cuda_rng_bytes)
    elif cuda is not None:
        f.byte_tensor('rng.cuda', cuda, cuda_rng_bytes)


def validate_training_checkpoint(ckpt, path, batches_per_epoch=None, parameter_shapes=None,
                                 cuda_rng_bytes=None, version=1):
    """Check the fields of a loaded training checkpoint before any of them is used.

    `ckpt` is what `load_file` returned. Checks types, ranges and sizes of what train.py's
    save_checkpoint writes: 'state' (epoch, iteration >= 0; 0 <= batch_in_epoch <
    `batches_per_epoch`; best_loss not NaN; loss_sum finite; counts >= 0; unvalidated_epoch
    None or an earlier epoch), 'optimizer' (param_groups and per-parameter state dicts, as
    many parameters as `parameter_shapes` lists and momentum buffers of their shapes, no
    NaN/inf), 'amp' (dicts, loss scales > 0), 'rng' (uint8 generator states of the size this
    torch uses; `cuda_rng_bytes` for the CUDA one, where known), 'epoch', 'world_size',
    'step_index', 'args', 'cfg', 'variant', 'version' (<= `version`). A file without 'state' is
    a weights-only checkpoint (train.py restores nothing else from it): only its top-level
    fields are checked. The weights themselves are checked by extract_state_dict and
    load_weights (NaN/inf included).
    Call it right after load_file, before anything reads the checkpoint's fields.

    Raises CheckpointError: one line naming the file and the field.
    """
    f = _Fields(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: expected a checkpoint dict, found {_show(ckpt)}')
    if 'version' in ckpt:
        f.int('version', ckpt['version'], 1)
        if ckpt['version'] > version:
            raise CheckpointError(f"{path}: field 'version': {ckpt['version']}, written by a newer train.py "
                                  f"(this one reads version {version} and older)")
    if 'epoch' in ckpt:
        f.int('epoch', ckpt['epoch'])
    if 'world_size' in ckpt:
        f.int('world_size', ckpt['world_size'], 1)
    if 'step_index' in ckpt:
        f.int('step_index', ckpt['step_index'])
    for key in ('args', 'cfg'):
        if key in ckpt:
            f.dict(key, ckpt[key])
    if 'variant' in ckpt and not isinstance(ckpt['variant'], str):
        f.bad('variant', 'a string', ckpt['variant'])
    if 'state' in ckpt and 'optimizer' not in ckpt:
        raise CheckpointError(f"{path}: field 'optimizer' is missing while 'state' is there: not a "
                              f"complete training checkpoint")
    if 'state' not in ckpt:
        return  # weights only (train.py restores neither optimizer, amp nor rng from it)
    _check_state(f, ckpt['state'], batches_per_epoch)
    _check_optimizer(f, ckpt['optimizer'], parameter_shapes)
    if ckpt.get('amp') is not None:
        _check_amp(f, ckpt['amp'])
    if ckpt.get('rng') is not None:
        _check_rng(f, ckpt['rng'], cuda_rng_bytes)
