"""Weights files: atomic saving, safe loading, and model weights in and out (the training
checkpoint's own format is utils/training/checkpoint.py).

Every file that may come from elsewhere is read with `torch.load(..., weights_only=True)`,
so a pickle that would execute code is refused. Errors are `CheckpointError` with a
one-line message that names the file.
"""
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
