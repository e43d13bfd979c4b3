"""The training checkpoint, `<save_folder>/sfd_face_checkpoint.pth`: the loop's state
(`TrainState`), the file's format and version, writing it, and resuming a run from it.

The file is a dict written by torch.save and read back with weights_only=True:

    version      CHECKPOINT_VERSION
    weight       the model's state_dict, plain key names        } the original repository's two
    epoch        the epoch being trained, or the last one done   } fields, with their meaning
    optimizer    the optimizer's state_dict (SGD momentum buffers)
    amp          the loss scaler (and Apex O2's fp32 master weights): Runtime.state_dict()
    state        TrainState as a dict: the exact position and what the run has measured
    step_index   how many of cfg.LR_STEPS the iteration has passed
    rng          {'torch': the CPU generator's state, 'cuda': this GPU's generator state or None}
    args         the run's options (plain values), world_size (its processes)
    cfg, variant data/config.py's values and the model variant

A file with 'weight' only, or a plain state_dict, is a weights-only checkpoint (what the original
repository wrote): a resume loads the weights and starts the next epoch.

Resuming is one mechanism, not a field-by-field validator: the file is compared with what this
run would write (the same fields, of the same kinds; tensors of the same kinds and shapes, on the
CPU and finite; numbers finite, integers within int64 and not negative where this run's are not),
then everything is restored, and any failure on the way becomes one line naming the file and the
field. A checkpoint that cannot be restored exactly is refused before any work.
"""
import dataclasses
import math
import os
import typing

import torch

from data.config import cfg
from utils.files.weights import CheckpointError, atomic_save, checkpoint_variant, extract_state_dict, load_file, \
    load_weights
from utils.cli import one_line
from utils.training.engine import lr_step_index
from utils.training.val_ap import mean_ap

CHECKPOINT_VERSION = 1
# Options that define the order of a run's batches: a mid-epoch resume needs the same values.
ORDER_OPTIONS = ('batch_size', 'seed')
# Options a resume may change on purpose (e.g. a lower --lr after a divergence); a change is logged.
# (--loss_scale is the device context's to compare: by default a resume continues the checkpoint's.)
TUNABLE_OPTIONS = ('lr', 'momentum', 'weight_decay', 'gamma', 'input_size', 'epochs', 'max_iter', 'amp',
                   'amp_dtype', 'train_file', 'val_file', 'val_ap', 'best_by')
PATH_OPTIONS = ('train_file', 'val_file')
INT64_MAX = 2 ** 63 - 1


@dataclasses.dataclass
class TrainState:
    """Where a run is and what it has measured: all of the loop's state that a checkpoint keeps.

    epoch: the epoch being trained (the next one at an epoch's end); iteration: steps done in the
    whole run; batch_in_epoch: batches of `epoch` done (0 at its start). loss_sum/loss_count: the
    running training loss of `epoch` over its finite steps (under torchrun, rank 0's carries every
    process's). nonfinite_in_a_row: steps skipped in a row for a non-finite loss or an fp16
    overflow. unvalidated_epoch: an epoch trained whose validation a stop cut short (a resume
    validates it first). train_loss: the mean training loss of the last epoch trained. The best
    validation loss and the best mean AP so far (every setting's in best_aps), with their epochs.
    process_losses: in a checkpoint saved inside an epoch under torchrun, every process's
    (loss_sum, loss_count) in rank order, flattened, so that a resume gives each its own and the
    sums add up in the order of an uninterrupted run (loss_sum/loss_count there are the totals).
    """
    epoch: int = 0
    iteration: int = 0
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    nonfinite_in_a_row: int = 0
    unvalidated_epoch: typing.Optional[int] = None
    train_loss: typing.Optional[float] = None
    best_loss: float = math.inf  # inf until a validation
    best_loss_epoch: typing.Optional[int] = None
    best_ap: typing.Optional[float] = None
    best_ap_epoch: typing.Optional[int] = None
    best_aps: typing.Optional[typing.Dict[str, float]] = None
    process_losses: typing.Optional[typing.List[float]] = None  # in a mid-epoch checkpoint under torchrun

    @property
    def mid_epoch(self):
        return self.batch_in_epoch > 0

    def record_validation(self, epoch, val_loss, aps=None):
        """Keep the best validation loss and the best mean AP (`aps`: {setting: AP}, or None when
        not evaluated) with their epochs. Returns (better loss, better AP) for this epoch."""
        better_loss = val_loss < self.best_loss
        if better_loss:
            self.best_loss, self.best_loss_epoch = val_loss, epoch
        mean = mean_ap(aps) if aps else None
        better_ap = mean is not None and (self.best_ap is None or mean > self.best_ap)
        if better_ap:
            self.best_ap, self.best_ap_epoch, self.best_aps = mean, epoch, dict(aps)
        return better_loss, better_ap


# -- writing -------------------------------------------------------------------------------------


def _plain(value):
    """cfg as builtin containers (weights_only loading accepts nothing else)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def plain_args(args):
    """The options as the checkpoint stores them: the plain values of `vars(args)`."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def checkpoint_contents(model, optimizer, device, args, state, world_size=1):
    """The dict `save_checkpoint` writes. `model` is the bare S3FD (plain key names), `device`
    the Runtime (its loss scaler), `state` the TrainState."""
    finished_epoch = state.batch_in_epoch == 0 and state.epoch > 0
    return {
        'version': CHECKPOINT_VERSION,
        'weight': model.state_dict(),
        'epoch': state.epoch - 1 if finished_epoch else state.epoch,
        'optimizer': optimizer.state_dict(),
        'amp': device.state_dict(),
        'state': dataclasses.asdict(state),
        'step_index': lr_step_index(state.iteration),
        'rng': {'torch': torch.get_rng_state(),
                'cuda': torch.cuda.get_rng_state(device.device) if device.type == 'cuda' else None},
        'args': plain_args(args),
        'world_size': world_size,
        'cfg': _plain(cfg),
        'variant': cfg.MODEL_VARIANT,
    }


def save_checkpoint(path, model, optimizer, device, args, state, world_size=1):
    """Write the resumable checkpoint atomically (a kill mid-write keeps the previous file)."""
    atomic_save(checkpoint_contents(model, optimizer, device, args, state, world_size), path)


# -- checking a loaded file against what this run would write -----------------------------------


class _Maybe:
    """Template marker: the field may be missing or None; when present it must be like `inner`."""

    def __init__(self, inner):
        self.inner = inner


_ANY = _Maybe(None)  # any plain value, or nothing


class _Buffer:
    """Template marker: a tensor kept for a parameter (an SGD momentum buffer), of its shape."""

    def __init__(self, parameter):
        self.parameter = parameter


def _show(value):
    if isinstance(value, torch.Tensor):
        return f'a {str(value.dtype).replace("torch.", "")} tensor of shape {tuple(value.shape)}'
    text = repr(value)
    return f'{text[:37] + "..." if len(text) > 40 else text} ({type(value).__name__})'


def _kind(value):
    if isinstance(value, bool):
        return 'a boolean'
    if isinstance(value, int):
        return 'an integer'
    if isinstance(value, float):
        return 'a number'
    if isinstance(value, str):
        return 'a string'
    if value is None:
        return 'None'
    return type(value).__name__


def _tensor_kind(t):
    if t.is_floating_point():
        return 'floating-point'
    return str(t.dtype).replace('torch.', '')


class _Checker:
    def __init__(self, path):
        self.path = path

    def bad(self, field, expected, value):
        raise CheckpointError(f"{self.path}: field '{field}': expected {expected}, found {_show(value)}")

    def tensors(self, value, field):
        """Every tensor in the file: a dense CPU tensor (weights_only loading maps devices to the
        CPU; a 'meta' tensor holds no values), floating-point ones finite."""
        if isinstance(value, torch.Tensor):
            if value.device.type != 'cpu' or value.layout != torch.strided:
                raise CheckpointError(f"{self.path}: field '{field}': a tensor on device '{value.device}' with "
                                      f"layout {value.layout}, which holds no values to restore")
            if value.is_floating_point() and value.numel() and not torch.isfinite(value).all():
                raise CheckpointError(f"{self.path}: field '{field}' holds NaN or inf: the run had diverged "
                                      'when it was saved; use an earlier checkpoint')
        elif isinstance(value, dict):
            for key, item in value.items():
                self.tensors(item, f'{field}.{key}' if field else str(key))
        elif isinstance(value, (list, tuple)):
            for k, item in enumerate(value):
                self.tensors(item, f'{field}[{k}]')

    def like(self, value, template, field):
        """`value` (from the file) has the shape of `template` (what this run would write)."""
        if isinstance(template, _Maybe):
            if value is None or template.inner is None:
                return
            template = template.inner
        if isinstance(template, _Buffer):
            if not isinstance(value, torch.Tensor):
                self.bad(field, 'a tensor or None', value)
            if tuple(value.shape) != tuple(template.parameter.shape):
                raise CheckpointError(f"{self.path}: field '{field}': a momentum buffer of shape {tuple(value.shape)} "
                                      f'for a parameter of shape {tuple(template.parameter.shape)}: the optimizer '
                                      'state is of another model')
            if not value.is_floating_point():
                self.bad(field, 'a floating-point momentum buffer', value)
        elif isinstance(template, torch.Tensor):
            if not (isinstance(value, torch.Tensor) and _tensor_kind(value) == _tensor_kind(template)
                    and value.shape == template.shape):
                self.bad(field, f'a {_tensor_kind(template)} tensor of shape {tuple(template.shape)}', value)
        elif isinstance(template, dict):
            if not isinstance(value, dict):
                self.bad(field, 'a dict', value)
            for key, inner in template.items():
                name = f'{field}.{key}' if field else str(key)
                if key in value:
                    self.like(value[key], inner, name)
                elif not (isinstance(inner, _Maybe) or isinstance(inner, bool) or inner is None):
                    raise CheckpointError(f"{self.path}: field '{name}' is missing")
        elif isinstance(template, (list, tuple)):
            if not isinstance(value, (list, tuple)) or len(value) != len(template):
                self.bad(field, f'a list of {len(template)} items', value)
            for k, (item, inner) in enumerate(zip(value, template)):
                self.like(item, inner, f'{field}[{k}]')
        elif template is not None:
            self.scalar(value, template, field)

    def scalar(self, value, template, field):
        """A plain value of the template's kind (True/False and None stand for each other: torch
        writes None for an option left to its default); numbers finite, integers within int64,
        not negative where the template is not."""
        if {_kind(value), _kind(template)} <= {'a boolean', 'None'}:
            return
        numeric = ('an integer', 'a number')
        same = _kind(value) == _kind(template) or (_kind(template) == 'a number' and _kind(value) in numeric)
        if not same:
            self.bad(field, _kind(template), value)
        if _kind(value) in numeric:
            low = 0 if template >= 0 else -INT64_MAX - 1
            if math.isnan(value) or abs(value) == math.inf or not low <= value <= INT64_MAX:
                limits = 'finite and at least 0' if low == 0 else 'finite'
                self.bad(field, f'{_kind(template)}, {limits}' if _kind(value) == 'a number'
                         else f'an integer from {low} to {INT64_MAX}', value)

    def state(self, value):
        """The 'state' field as a TrainState, each field of the type its annotation gives."""
        if not isinstance(value, dict):
            self.bad('state', 'a dict', value)
        fields = {f.name: f for f in dataclasses.fields(TrainState)}
        hints = typing.get_type_hints(TrainState)
        for key in ('epoch', 'iteration', 'batch_in_epoch'):
            if key not in value:
                raise CheckpointError(f"{self.path}: field 'state.{key}' is missing: the position to resume from "
                                      'is incomplete')
        kept = {}
        for name, item in value.items():
            if name not in fields:
                continue  # a field of another version: not restored
            hint, optional = hints[name], False
            if typing.get_origin(hint) is typing.Union:
                hint, optional = typing.get_args(hint)[0], True
            field = f'state.{name}'
            if item is None and optional:
                pass
            elif typing.get_origin(hint) is list:
                if not isinstance(item, list):
                    self.bad(field, 'a list of numbers', item)
                for k, number in enumerate(item):
                    self.scalar(number, 0.0, f'{field}[{k}]')
            elif typing.get_origin(hint) is dict:
                if not isinstance(item, dict) or not all(isinstance(k, str) for k in item):
                    self.bad(field, 'a dict of numbers by name', item)
                for key, number in item.items():
                    self.scalar(number, 0.0, f'{field}.{key}')
            elif hint is float and fields[name].default == math.inf and item == math.inf:
                pass  # best_loss before any validation
            else:
                self.scalar(item, hint(), field)
            kept[name] = float(item) if hint is float and item is not None else item
        state = TrainState(**kept)
        if state.unvalidated_epoch is not None and state.unvalidated_epoch >= state.epoch:
            self.bad('state.unvalidated_epoch', f'None or an epoch already trained (below {state.epoch})',
                     state.unvalidated_epoch)
        if state.epoch > state.iteration:
            self.bad('state.epoch', f'at most the iterations done ({state.iteration}): each epoch has a batch',
                     state.epoch)
        return state


def checkpoint_template(model, optimizer, device, args):
    """What this run would write, as `_Checker.like` compares it: the optimizer's groups as built,
    one optional SGD state per parameter (a momentum buffer of its shape), the loss scaler's state
    for whichever scaler the file has (a resume may change --amp), this torch's generator states."""
    groups = optimizer.state_dict()['param_groups']
    shapes = [p.detach().to('meta') for group in optimizer.param_groups for p in group['params']]
    order = {name: getattr(args, name) for name in ORDER_OPTIONS}
    return {
        'version': _Maybe(1), 'epoch': _Maybe(0), 'world_size': _Maybe(1), 'step_index': _Maybe(0),
        'variant': _Maybe('reference'), 'cfg': _ANY,
        'args': _Maybe({name: _Maybe(value) for name, value in order.items()}),
        'optimizer': {'param_groups': groups,
                      'state': _Maybe({k: _Maybe({'momentum_buffer': _Maybe(_Buffer(p))}) for k, p in enumerate(shapes)})},
        'amp': _Maybe({name: _Maybe(value) for name, value in device.state_dict().items()
                       if name != 'apex_master_params'}),
        'rng': {'torch': torch.get_rng_state(), 'cuda': _ANY},
    }


def check_checkpoint(ckpt, path, template):
    """The structure of a full training checkpoint against `checkpoint_template`; returns its
    TrainState. CheckpointError, one line naming the file and the field, on the first fault."""
    check = _Checker(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: expected a checkpoint dict, found {_show(ckpt)}')
    check.scalar(ckpt.get('version', 1), 1, 'version')
    if ckpt.get('version', 1) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: field 'version': {ckpt['version']}, written by a newer train.py (this one "
                              f'reads version {CHECKPOINT_VERSION} and older)')
    if 'optimizer' not in ckpt:
        raise CheckpointError(f"{path}: field 'optimizer' is missing while 'state' is there: not a complete "
                              'training checkpoint')
    check.tensors(ckpt, '')
    check.like(ckpt, template, '')
    if ckpt.get('world_size') is not None and ckpt['world_size'] < 1:
        check.bad('world_size', 'an integer >= 1', ckpt['world_size'])
    return check.state(ckpt['state'])


# -- resuming ------------------------------------------------------------------------------------


def _same_option(name, saved, now):
    if name in PATH_OPTIONS and isinstance(saved, str) and isinstance(now, str):
        return os.path.normpath(os.path.abspath(saved)) == os.path.normpath(os.path.abspath(now))
    return saved == now


def check_resume_options(path, ckpt, state, args, world_size, batches_per_epoch, log):
    """Compare the run's options with the checkpoint's. A mid-epoch position only means the same
    batches with the same batch size, seed and number of processes: anything else is an error.
    Other changes are allowed and logged (at an epoch's end a changed batch size included: the
    remaining epochs use it, and the LR schedule still counts iterations)."""
    saved = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    if state.mid_epoch:
        now = {name: getattr(args, name) for name in ORDER_OPTIONS if name in saved}
        then = {name: saved[name] for name in now}
        if isinstance(ckpt.get('world_size'), int):
            now['processes'], then['processes'] = world_size, ckpt['world_size']
        changed = [name for name in now if now[name] != then[name]]
        if changed:
            raise CheckpointError(
                f'{path} stopped mid-epoch ({state.batch_in_epoch} batches into epoch {state.epoch}); resuming it '
                'exactly needs the same ' + ', '.join(f'{name} (checkpoint {then[name]}, now {now[name]})'
                                                      for name in changed)
                + ": pass the checkpoint's values" + (' and run as many processes' if 'processes' in changed else ''))
        if state.batch_in_epoch >= batches_per_epoch:
            raise CheckpointError(f"{path}: field 'state.batch_in_epoch': expected 0 to {batches_per_epoch - 1} (the "
                                  f'batches already done of an epoch of {batches_per_epoch} in this run), found '
                                  f'{state.batch_in_epoch} (int)')
    tunable = TUNABLE_OPTIONS + (() if state.mid_epoch else ORDER_OPTIONS)
    changed = [name for name in tunable if name in saved and not _same_option(name, saved[name], getattr(args, name))]
    if changed:
        log('Resuming with changed options: ' + ', '.join(
            f'--{name} {getattr(args, name)} (checkpoint {saved[name]})' for name in changed))


def _restore_rng(rng, device):
    if not rng:
        return
    if rng.get('torch') is not None:
        torch.set_rng_state(rng['torch'])
    cuda = rng.get('cuda')
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state
        index = device.device.index or 0
        cuda = cuda[index] if len(cuda) > index else None
    if cuda is not None and device.type == 'cuda':
        torch.cuda.set_rng_state(cuda, device.device)


def _restore(path, field, action):
    """Run one restoring step; any failure becomes one line naming the file and the field."""
    try:
        action()
    except CheckpointError:
        raise
    except Exception as error:  # what a damaged field raises depends on where it reaches
        raise CheckpointError(f"{path}: field '{field}' cannot be restored ({one_line(error)})") from None


def resume(path, model, optimizer, device, args, batches_per_epoch, world_size=1, log=print):
    """Load a checkpoint into the model, loss scaler and optimizer (after `device.initialize`, as
    Apex requires) and the generators; returns the TrainState to continue from. The run's own
    --momentum and --weight_decay apply (a change is logged)."""
    log(f'Resuming training, loading {path}...')
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or 'state' not in ckpt:
        # Weights only: the original repository's checkpoint, or a plain state_dict.
        load_weights(model, extract_state_dict(ckpt, path), path)
        saved_epoch = ckpt.get('epoch')
        _Checker(path).scalar(saved_epoch if saved_epoch is not None else 0, 0, 'epoch')
        epoch = saved_epoch + 1 if saved_epoch is not None else 0
        log(f'{path} holds weights only: optimizer state and position are not restored; starting at epoch {epoch}')
        return TrainState(epoch=epoch, iteration=epoch * batches_per_epoch)
    state = check_checkpoint(ckpt, path, checkpoint_template(model, optimizer, device, args))
    variant = checkpoint_variant(ckpt)
    if variant is not None and variant != cfg.MODEL_VARIANT:
        raise CheckpointError(f'{path} holds a {variant!r} model, this run builds {cfg.MODEL_VARIANT!r} '
                              '(cfg.MODEL_VARIANT)')
    check_resume_options(path, ckpt, state, args, world_size, batches_per_epoch, log)
    load_weights(model, extract_state_dict(ckpt, path), path)
    # The loss scaler first: under Apex O2 it makes the fp32 master weights, on which the
    # optimizer's state then lands in fp32.
    scale_notes = []  # the loss scale, when it does not simply continue
    _restore(path, 'amp', lambda: scale_notes.append(device.load_state_dict(ckpt.get('amp') or {}, optimizer)))
    for note in filter(None, scale_notes):
        log(note)
    _restore(path, 'optimizer', lambda: optimizer.load_state_dict(ckpt['optimizer']))
    for group in optimizer.param_groups:  # the options of this run (the log says when they changed)
        group['momentum'], group['weight_decay'] = args.momentum, args.weight_decay
    _restore(path, 'rng', lambda: _restore_rng(ckpt.get('rng'), device))
    if torch.distributed.is_initialized():  # this process's part of the running epoch loss
        rank = torch.distributed.get_rank()
        if state.process_losses and len(state.process_losses) == 2 * world_size:
            state.loss_sum, state.loss_count = state.process_losses[2 * rank], int(state.process_losses[2 * rank + 1])
        elif rank != 0:  # older checkpoints: rank 0 carries every process's sums
            state.loss_sum, state.loss_count = 0.0, 0
    state.process_losses = None
    return state
