"""The training engine: one SGD step, the epoch loop with its validation, the finite-loss
check, the speed meter, stop signals, and when checkpoints are written and how a run resumes
from one. train.py builds the pieces and hands them to `Trainer`:

    state = resume(path, model, optimizer, ctx, batches_per_epoch, args) if args.resume else new_state()
    Trainer(args, ctx, net, model, criterion, optimizer, train_loader, val_loader, state, writer).run()

The loop's position lives in `state` (see `new_state`); `weights/sfd_face_checkpoint.pth`
holds it with everything else needed to continue a run exactly. Errors meant for the user
are raised as `TrainingError` (or another `utils.cli.UserError`); train.py prints them.
"""
import datetime
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from data.config import cfg
from utils import device as devices
from utils.augmentations import subtract_mean
from utils.checkpoint import (CheckpointError, atomic_save, checkpoint_variant, extract_state_dict,
                              load_file, load_weights, nonfinite_tensors, tensor_bytes,
                              validate_training_checkpoint)
from utils.cli import UserError
from utils.fileio import OutputDirError
from utils.runguard import check_space_for_epoch
from utils.val_ap import format_ap_line, mean_ap

CHECKPOINT_VERSION = 1
# Options that define the order of a run's batches: a mid-epoch resume needs the same values.
ORDER_OPTIONS = ('batch_size', 'seed')
# Options a resume may change on purpose (e.g. a lower --lr after a divergence); a change is logged.
TUNABLE_OPTIONS = ('lr', 'momentum', 'weight_decay', 'gamma', 'input_size', 'epochs', 'max_iter',
                   'amp', 'amp_dtype', 'train_file', 'val_file', 'val_ap', 'best_by')
# Non-finite losses in a row after which a run stops (its last good state saved).
MAX_NONFINITE_IN_A_ROW = 10


class TrainingError(UserError, RuntimeError):
    """A training run cannot go on; the message is one line for the user."""


def log(*parts):
    """Print on the main process only (torchrun starts one process per device)."""
    if devices.is_main_process():
        print(*parts, flush=True)


# -- learning rate -------------------------------------------------------------------------------


def lr_step_index(iteration):
    """How many of cfg.LR_STEPS `iteration` has reached."""
    return sum(iteration >= step for step in cfg.LR_STEPS)


def learning_rate(args, iteration):
    """--lr * --gamma ** lr_step_index(iteration)."""
    return args.lr * args.gamma ** lr_step_index(iteration)


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


# -- one step ------------------------------------------------------------------------------------


def to_device(images, targets, device, channels_last=False):
    """Images to the device, uint8 ones (the loader's) made float32 minus the mean there,
    channels-last on request; targets stay on the host: the loss reads the face sizes there."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:  # one pass: float32, mean and layout together
        images = subtract_mean(images, cfg.img_mean, memory_format)
    return images.contiguous(memory_format=memory_format), targets


class FiniteCheck:
    """Whether a step's loss is finite (on every process), read without draining the device's queue.

    `submit(loss)` right after the forward; `ok()` after the backward has been queued: on an
    accelerator (CUDA, NPU: any whose torch module has an Event) the flag travels to pinned
    host memory behind the forward, so waiting for it does not stall the queued backward.
    """

    def __init__(self, device):
        backend = torch.get_device_module(device.type) if device.type != 'cpu' else None
        self.event = backend.Event() if hasattr(backend, 'Event') else None
        self.flag = None
        if self.event is not None:
            self.host = torch.zeros((), dtype=torch.int32).pin_memory()

    def submit(self, loss):
        flag = torch.isfinite(loss.detach()).int()
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if self.event is not None:
            self.host.copy_(flag, non_blocking=True)
            self.event.record()
        else:
            self.flag = flag

    def ok(self):
        if self.event is not None:
            self.event.synchronize()
            return bool(self.host)
        return bool(self.flag)


def training_step(net, criterion, optimizer, ctx, finite, images, targets, channels_last=False):
    """One SGD step: forward under autocast, loss, backward and update unless the loss is not
    finite or (NPU fp16) the gradients overflowed. Returns (loss, loss_l, loss_c) detached and
    whether the update was applied."""
    images, targets = to_device(images, targets, ctx.device, channels_last)
    ctx.zero_grad(optimizer)
    with ctx.autocast():
        out = net(images)
    loss_l, loss_c = criterion(out, targets)
    loss = loss_l + loss_c
    finite.submit(loss)
    ctx.backward(loss, optimizer)
    stepped = finite.ok()
    if stepped:
        stepped = ctx.step(optimizer)  # False: the gradients overflowed (NPU fp16), the step was skipped
    else:
        ctx.discard(optimizer)
    return loss.detach(), loss_l.detach(), loss_c.detach(), stepped


def nonfinite_parameters(model):
    """Names of the parameters that hold a NaN or inf (one host synchronisation)."""
    return nonfinite_tensors(dict(model.named_parameters()))


# -- timing and stopping -------------------------------------------------------------------------


class SpeedMeter:
    """Timing of the iterations since the last `reset()`: the log's Timer (seconds of compute
    per iteration, the wait for the loader left out), images/s and the ETA.

        meter.batch_arrived()   # when the loader hands over a batch
        meter.step_done()       # when its step is queued
    """

    def __init__(self, images_per_iteration):
        self.images_per_iteration = images_per_iteration
        self.reset()

    def reset(self):
        self.start = self._waiting_since = time.time()
        self.data_wait = 0.0
        self.iterations = 0

    def batch_arrived(self):
        self.data_wait += time.time() - self._waiting_since

    def step_done(self):
        self.iterations += 1
        self._waiting_since = time.time()

    @property
    def elapsed(self):
        return time.time() - self.start

    def seconds_per_iteration(self):
        """Compute time per iteration (the wait for data left out): the original Timer line."""
        return (self.elapsed - self.data_wait) / max(self.iterations, 1)

    def data_wait_per_iteration(self):
        return self.data_wait / max(self.iterations, 1)

    def images_per_second(self):
        return self.iterations * self.images_per_iteration / max(self.elapsed, 1e-9)

    def eta(self, iterations_left):
        """'H:MM:SS' for `iterations_left` at the pace since the last reset."""
        seconds = iterations_left * self.elapsed / max(self.iterations, 1)
        return str(datetime.timedelta(seconds=int(max(0, seconds))))


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits at the next step."""

    def __init__(self):
        self.signal = None
        self._pid = os.getpid()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked with this handler: the main process decides
        name = signal.Signals(signum).name
        if self.signal is not None:
            if signum != signal.SIGINT:
                # Schedulers deliver SIGTERM twice (to every process and again through torchrun's
                # agent) and send SIGKILL after their grace period: keep on towards the save.
                return
            # A second Ctrl-C: the user wants out now, without a traceback.
            print(f'\n{name} received again: stopping now without saving (the last saved checkpoint '
                  f'is kept)', file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signal = name
        print(f'\n{self.signal} received: saving a checkpoint after this iteration (during validation: '
              f'at once)', file=sys.stderr, flush=True)

    def requested(self, device, sync_now):
        """Whether any process was asked to stop (checked together when `sync_now`)."""
        flag = self.signal is not None
        if dist.is_initialized():
            if not sync_now:
                return False
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


# -- checkpoints ---------------------------------------------------------------------------------


def new_state(epoch=0, iteration=0):
    """The training loop's position. 'epoch' is the current epoch, 'batch_in_epoch' the batches
    of it already done, 'loss_sum'/'loss_count' the running epoch loss of the log line,
    'unvalidated_epoch' an epoch trained whose validation was cut short by a stop (else None),
    'train_loss' the mean training loss of the last epoch trained. The best validation loss and
    the best AP so far (the mean over its settings, with every setting's AP in 'best_aps') are
    kept with their epochs, whichever of them --best_by puts in sfd_face.pth."""
    return {'epoch': epoch, 'iteration': iteration, 'batch_in_epoch': 0, 'best_loss': math.inf,
            'loss_sum': 0.0, 'loss_count': 0, 'nonfinite_in_a_row': 0, 'unvalidated_epoch': None,
            'train_loss': None, 'best_loss_epoch': None, 'best_ap': None, 'best_ap_epoch': None,
            'best_aps': None}


def _plain(value):
    """cfg as builtin containers (weights_only loading accepts nothing else)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_checkpoint(path, model, optimizer, ctx, args, state, world_size=1):
    """The resumable checkpoint. 'weight' and 'epoch' keep the original repository's meaning
    (the weights, and the epoch being trained or just validated); 'state' holds the exact
    position, from which a resume continues."""
    finished_epoch = state['batch_in_epoch'] == 0 and state['epoch'] > 0
    atomic_save({
        'version': CHECKPOINT_VERSION,
        'weight': model.state_dict(),
        'epoch': state['epoch'] - 1 if finished_epoch else state['epoch'],
        'optimizer': optimizer.state_dict(),
        'amp': ctx.state_dict(),
        'state': dict(state),
        'step_index': lr_step_index(state['iteration']),
        'rng': {'torch': torch.get_rng_state(),
                'cuda': torch.cuda.get_rng_state(ctx.device) if ctx.type == 'cuda' else None},
        'args': {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        'world_size': world_size,
        'cfg': _plain(cfg),
        'variant': cfg.MODEL_VARIANT,
    }, path)


def check_resume_options(path, ckpt, args, world_size):
    """Compare the run's options with those the checkpoint was trained with. A mid-epoch
    position only means the same batches with the same batch size, seed and number of
    processes: anything else is an error. Other changes are allowed and logged."""
    saved = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    mid_epoch = isinstance(ckpt.get('state'), dict) and ckpt['state'].get('batch_in_epoch', 0) > 0
    if mid_epoch:
        now = {name: getattr(args, name) for name in ORDER_OPTIONS if name in saved}
        then = {name: saved[name] for name in now}
        if isinstance(ckpt.get('world_size'), int):
            now['processes'], then['processes'] = world_size, ckpt['world_size']
        changed = [name for name in now if now[name] != then[name]]
        if changed:
            raise TrainingError(
                f'{path} stopped mid-epoch ({ckpt["state"]["batch_in_epoch"]} batches into epoch '
                f'{ckpt["state"].get("epoch")}); resuming it exactly needs the same '
                + ', '.join(f'{name} (checkpoint {then[name]}, now {now[name]})' for name in changed)
                + ': pass the checkpoint\'s values' + (' and run as many processes' if 'processes' in changed else ''))
    changed = [name for name in TUNABLE_OPTIONS if name in saved and saved[name] != getattr(args, name)]
    if changed:
        log('Resuming with changed options: ' + ', '.join(
            f'--{name} {getattr(args, name)} (checkpoint {saved[name]})' for name in changed))


def resume(path, model, optimizer, ctx, batches_per_epoch, args, world_size=1):
    """Load a checkpoint into model/optimizer/scaler (after `ctx.initialize`, as Apex requires);
    returns the loop state to continue from."""
    log(f'Resuming training, loading {path}...')
    ckpt = load_file(path)
    validate_training_checkpoint(
        ckpt, path, batches_per_epoch, [p.shape for group in optimizer.param_groups for p in group['params']],
        cuda_rng_bytes=torch.cuda.get_rng_state(ctx.device).numel() if ctx.type == 'cuda' else None,
        version=CHECKPOINT_VERSION)
    variant = checkpoint_variant(ckpt)
    if variant is not None and variant != cfg.MODEL_VARIANT:
        raise CheckpointError(f'{path} holds a {variant!r} model, this run builds {cfg.MODEL_VARIANT!r} '
                              '(cfg.MODEL_VARIANT)')
    load_weights(model, extract_state_dict(ckpt, path), path)
    check_resume_options(path, ckpt, args, world_size)
    if 'state' not in ckpt or 'optimizer' not in ckpt:
        # Weights only (the original repository's checkpoint, or a plain state_dict).
        epoch = int(ckpt.get('epoch', -1)) + 1 if isinstance(ckpt.get('epoch'), int) else 0
        log(f'{path} holds weights only: optimizer state and position are not restored; '
            f'starting at epoch {epoch}')
        return new_state(epoch=epoch, iteration=epoch * batches_per_epoch)
    try:
        # The loss scaler first: under Apex O2 it makes the fp32 master weights, on which the
        # optimizer's state then lands in fp32.
        message = ctx.load_state_dict(ckpt.get('amp', {}), optimizer)
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f'{path}: optimizer state does not fit this model ({e})') from None
    if message:  # the loss scale, when it does not simply continue
        log(message)
    for group in optimizer.param_groups:  # the options of this run (the log says when they changed)
        group['momentum'], group['weight_decay'] = args.momentum, args.weight_decay
    rng = ckpt.get('rng', {})
    if 'torch' in rng:
        torch.set_rng_state(rng['torch'])
    cuda_rng = rng.get('cuda')
    if isinstance(cuda_rng, (list, tuple)):  # older checkpoints: every visible device's state
        cuda_rng = cuda_rng[ctx.device.index or 0] if len(cuda_rng) > (ctx.device.index or 0) else None
    if cuda_rng is not None and ctx.type == 'cuda':
        torch.cuda.set_rng_state(cuda_rng, ctx.device)
    state = new_state()
    state.update(ckpt['state'])
    if dist.is_initialized() and dist.get_rank() != 0:
        state.update(loss_sum=0.0, loss_count=0)  # rank 0 carries every process's running epoch loss
    return state


# -- the loop ------------------------------------------------------------------------------------


class Trainer:
    """The training loop: one object holds what every step needs.

    net is what runs the forward (possibly compiled / DDP-wrapped), model the bare S3FD whose
    state_dict is saved with the plain key names. Validation runs the network without the DDP
    wrapper: processes validate different numbers of batches and must not meet in a collective.
    """

    def __init__(self, args, ctx, net, model, criterion, optimizer, train_loader, val_loader, state, writer,
                 val_ap=None):
        self.args, self.ctx = args, ctx
        self.val_ap = val_ap  # utils.val_ap.ValAP with --val_ap, else None
        self.net, self.model = net, model
        self.eval_net = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
        self.criterion, self.optimizer = criterion, optimizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.state, self.writer = state, writer
        self.sampler = train_loader.batch_sampler
        self.total_iters = min(args.max_iter, args.epochs * self.sampler.batches_per_epoch)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.main = devices.is_main_process()
        self.checkpoint_path = os.path.join(args.save_folder, f'sfd_{args.dataset}_checkpoint.pth')
        self.best_path = os.path.join(args.save_folder, f'sfd_{args.dataset}.pth')
        self.metrics_path = os.path.join(args.save_folder, 'metrics.jsonl')
        self.validation = {}  # what the last validation measured, for the metrics row
        self.finite = FiniteCheck(ctx.device)
        self.meter = SpeedMeter(args.batch_size * self.world)
        self.stop = None  # StopRequest while run() is active
        self.stopped = False  # whether a stop signal ended the run before its end (its checkpoint saved)
        self.weights_bytes = tensor_bytes(model.state_dict())

    def run(self):
        self.stop = StopRequest()
        self.net.train()
        try:
            pending = self.state['unvalidated_epoch']  # a stop came during its validation
            if pending is not None and not self.finish_epoch(pending):
                return
            while self.state['epoch'] < self.args.epochs and self.state['iteration'] < self.total_iters:
                epoch = self.state['epoch']
                self.check_space(epoch)
                if not self.train_one_epoch(epoch):
                    return  # stopped mid-epoch; the checkpoint is saved
                loss_sum, loss_count = devices.all_reduce_sum(
                    [self.state['loss_sum'], self.state['loss_count']], self.ctx.device)
                self.state.update(epoch=epoch + 1, batch_in_epoch=0, loss_sum=0.0, loss_count=0,
                                  unvalidated_epoch=epoch,
                                  train_loss=loss_sum / loss_count if loss_count else None)
                if not self.finish_epoch(epoch):
                    return
        finally:
            self.stop.close()

    def check_space(self, epoch):
        """Stop before an epoch whose saves would not fit in the save folder (DiskFullError, one
        line), rather than after its work (the main process, which saves, checks)."""
        if not self.main:
            return
        first = self.state['iteration']
        last = min(first + self.sampler.batches_per_epoch - self.state['batch_in_epoch'], self.total_iters)
        check_space_for_epoch(self.args.save_folder, self.checkpoint_path, self.weights_bytes, first, last,
                              cfg.SAVE_INTERVAL, epoch,
                              best_path=self.best_path if self.val_loader is not None else None)

    def finish_epoch(self, epoch):
        """Validate the trained `epoch` and save the epoch-end checkpoint; False when the run stops
        (a stop during validation saves the checkpoint at once, marked for a resume to validate)."""
        self.validation = {}
        if self.val_loader is not None and not self.validate(epoch):
            self.save_checkpoint(f'{self.stop.signal or "stop requested"} during validation: '
                                 f'epoch {epoch} is trained, a resume validates it first')
            self.stopped = True
            return False
        self.state['unvalidated_epoch'] = None
        self.write_metrics(epoch)
        self.save_checkpoint()
        if self.stop.requested(self.ctx.device, sync_now=True):  # every process stops
            log(f'{self.stop.signal or "stop requested"}: checkpoint saved to {self.checkpoint_path}')
            self.stopped = True
            return False
        return True

    def save_checkpoint(self, reason=None):
        bad = nonfinite_parameters(self.model)  # the same on every process
        if bad:
            raise TrainingError(
                f'{len(bad)} weight tensors hold NaN/inf ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}): '
                f'a gradient went non-finite. Not saved over {self.checkpoint_path}: its last state is kept '
                'to resume from (with a lower --lr)')
        if self.main:
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.ctx, self.args, self.state,
                            self.world)
            if reason:
                log(f'{reason}: checkpoint saved to {self.checkpoint_path} (iteration {self.state["iteration"]})')

    def train_one_epoch(self, epoch):
        """Train the rest of `epoch`; False when the run stops before the epoch's end."""
        args, ctx, state = self.args, self.ctx, self.state
        self.sampler.set_epoch(epoch, state['batch_in_epoch'])
        loss_sum = torch.tensor(state['loss_sum'], dtype=torch.float32, device=ctx.device)
        self.meter.reset()
        for images, targets in self.train_loader:
            self.meter.batch_arrived()
            iteration = state['iteration']
            set_learning_rate(self.optimizer, learning_rate(args, iteration))
            loss, loss_l, loss_c, stepped = training_step(self.net, self.criterion, self.optimizer, ctx,
                                                          self.finite, images, targets, args.channels_last)
            if stepped:
                loss_sum += loss
                state['loss_count'] += 1
                state['nonfinite_in_a_row'] = 0
            else:
                self.skip_nonfinite(iteration, loss_l, loss_c)

            state['batch_in_epoch'] += 1
            state['iteration'] += 1
            self.meter.step_done()
            is_log_step = iteration % cfg.LOG_INTERVAL == 0
            if is_log_step:
                state['loss_sum'] = float(loss_sum)  # the one host sync, at log steps only
                self.log_step(epoch, iteration, loss_l, loss_c)
            if iteration != 0 and iteration % cfg.SAVE_INTERVAL == 0 and self.main:
                log('Saving state, iter:', iteration)
                atomic_save(self.model.state_dict(),
                            os.path.join(args.save_folder, f'sfd_{args.dataset}_{iteration}.pth'))
            reached_end = state['iteration'] >= self.total_iters
            if reached_end or self.stop.requested(ctx.device, sync_now=is_log_step):
                self.stopped = not reached_end  # --max_iter is the end asked for, a signal is not
                if state['batch_in_epoch'] < self.sampler.batches_per_epoch:
                    # The running epoch loss of every process: the checkpoint holds rank 0's state,
                    # so rank 0 carries the sums and the others restart theirs at a resume.
                    state['loss_sum'], state['loss_count'] = devices.all_reduce_sum(
                        [float(loss_sum), state['loss_count']], ctx.device)
                    state['loss_count'] = int(state['loss_count'])
                    self.save_checkpoint('stop requested' if self.stop.signal
                                         else f'reached --max_iter {args.max_iter}')
                    return False
                break
        state['loss_sum'] = float(loss_sum)
        return True

    def skip_nonfinite(self, iteration, loss_l, loss_c):
        """Count a skipped step (a non-finite loss, or an fp16 gradient overflow on the NPU); too
        many in a row stop the run with its last good state saved."""
        self.state['nonfinite_in_a_row'] += 1
        loss_l, loss_c = float(loss_l), float(loss_c)
        what = (f'gradient overflow at loss scale {self.ctx.overflow_scale:g}' if math.isfinite(loss_l + loss_c)
                else f'non-finite loss (loc {loss_l:.4g}, conf {loss_c:.4g})')
        log(f'iter:{iteration} {what}: step skipped ({self.state["nonfinite_in_a_row"]} in a row)')
        if self.state['nonfinite_in_a_row'] >= MAX_NONFINITE_IN_A_ROW:
            self.save_checkpoint(f'stopped after {MAX_NONFINITE_IN_A_ROW} skipped steps in a row')
            raise TrainingError(f'{MAX_NONFINITE_IN_A_ROW} steps in a row skipped for a non-finite loss or a '
                                f'gradient overflow: check the data and lower --lr (state saved to '
                                f'{self.checkpoint_path})')

    def log_step(self, epoch, iteration, loss_l, loss_c):
        """The original four log lines; with --log_speed, a fifth with speed, data wait and ETA."""
        state, meter = self.state, self.meter
        # Means over every process's batches, as validation reports it (one collective).
        loss_sum, loss_count, loss_c, loss_l = devices.all_reduce_sum(
            [state['loss_sum'], state['loss_count'], float(loss_c), float(loss_l)], self.ctx.device)
        tloss = loss_sum / max(loss_count, 1)
        loss_c, loss_l = loss_c / self.world, loss_l / self.world
        lr = self.optimizer.param_groups[0]['lr']
        log('Timer: %.4f' % meter.seconds_per_iteration())
        log('epoch:' + repr(epoch) + ' || iter:' + repr(iteration) + ' || Loss:%.4f' % tloss)
        log('->> conf loss:{:.4f} || loc loss:{:.4f}'.format(loss_c, loss_l))
        log('->>lr:{:.6f}'.format(lr))
        scale_change = self.ctx.loss_scale_change()  # NPU fp16: the loss scale, when it changed
        if scale_change:
            log(scale_change)
        speed = meter.images_per_second()
        if self.args.log_speed:
            log('->> speed:{:.1f} img/s || data wait:{:.4f}s/iter || eta:{}'.format(
                speed, meter.data_wait_per_iteration(), meter.eta(self.total_iters - state['iteration'])))
        if self.writer is not None:
            for name, value in (('loss', tloss), ('loss_conf', loss_c), ('loss_loc', loss_l),
                                ('lr', lr), ('images_per_s', speed)):
                self.writer.add_scalar(f'train/{name}', value, iteration)
        meter.reset()

    def ap_due(self, epoch):
        """Whether `epoch` is evaluated for AP: every --val_ap_interval epochs, and the last one."""
        last = epoch + 1 >= self.args.epochs or self.state['iteration'] >= self.total_iters
        return self.val_ap is not None and ((epoch + 1) % self.args.val_ap_interval == 0 or last)

    def validate(self, epoch):
        """Validation loss over the val list (sharded over processes), WIDER AP when due, the
        original log lines (and the AP line after them), and sfd_face.pth when the epoch is the
        best by --best_by. False when a stop signal cut it short (on any process)."""
        start = time.time()
        tloss = self.validation_loss()
        if tloss is None:
            return False
        seconds = time.time() - start
        aps = ap_seconds = None
        if self.ap_due(epoch):
            ap_start = time.time()
            aps = self.val_ap.evaluate(self.model, self.ctx, self.args.num_workers,
                                       should_stop=lambda: self.stop is not None and self.stop.signal is not None)
            if aps is None:
                return False
            ap_seconds = time.time() - ap_start
        log('Timer: %.4f' % seconds)
        log('test epoch:' + repr(epoch) + ' || Loss:%.4f' % tloss)
        saved = self.keep_best(epoch, tloss, aps)
        if aps is not None:
            log(format_ap_line(epoch, aps, len(self.val_ap.paths), ap_seconds))
        if self.writer is not None:
            self.writer.add_scalar('val/loss', tloss, self.state['iteration'])
            for setting, ap in (aps or {}).items():
                self.writer.add_scalar(f'val/ap_{setting}', ap, self.state['iteration'])
        self.validation = {'val_loss': tloss, 'ap': aps, 'ap_seconds': ap_seconds, 'best_saved': saved}
        return True

    def keep_best(self, epoch, tloss, aps):
        """Record the best loss and the best AP so far; write sfd_face.pth when this epoch is the
        best by --best_by (the original 'Saving best state' line). Returns whether it was written."""
        state = self.state
        better_loss = tloss < state['best_loss']
        if better_loss:
            state['best_loss'], state['best_loss_epoch'] = tloss, epoch
        better_ap = aps is not None and (state['best_ap'] is None or mean_ap(aps) > state['best_ap'])
        if better_ap:
            state['best_ap'], state['best_ap_epoch'], state['best_aps'] = mean_ap(aps), epoch, dict(aps)
        if not (better_ap if self.args.best_by == 'ap' else better_loss):
            return False
        log('Saving best state,epoch', epoch)
        if self.main:
            atomic_save(self.model.state_dict(), self.best_path)
        return True

    def write_metrics(self, epoch):
        """Append the epoch's row to metrics.jsonl (tools/plot_training.py draws it). A resumed run
        may write an epoch again; readers take its last row."""
        if not self.main:
            return
        row = {'epoch': epoch, 'iteration': self.state['iteration'], 'train_loss': self.state['train_loss'],
               'val_loss': None, 'ap': None, 'ap_seconds': None, 'best_saved': False,
               'best_by': self.args.best_by, 'lr': self.optimizer.param_groups[0]['lr'], 'time': time.time()}
        row.update(self.validation)
        try:
            with open(self.metrics_path, 'a', encoding='utf-8') as handle:
                handle.write(json.dumps(row) + '\n')
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise OutputDirError(f'{self.metrics_path}: cannot add the row of epoch {epoch} '
                                 f'({exc.strerror or exc}); the checkpoint of epoch {epoch - 1} is kept') from None

    @torch.no_grad()
    def validation_loss(self):
        """Mean validation loss per batch over every process, or None when a stop signal cut it
        short (on any process)."""
        args, ctx = self.args, self.ctx
        self.eval_net.eval()
        total = torch.zeros((), device=ctx.device)  # summed on the device, read once after the loop
        batches, cut_short = 0, False
        for images, targets in self.val_loader:
            if self.stop is not None and self.stop.signal is not None:
                cut_short = True  # no collective in this loop: the shards may differ by one batch
                break
            images, targets = to_device(images, targets, ctx.device, args.channels_last)
            with ctx.autocast():
                out = self.eval_net(images)
            loss_l, loss_c = self.criterion(out, targets)
            total += (loss_l + loss_c).detach()
            batches += 1
        total, batches, cut_short = devices.all_reduce_sum([float(total), batches, int(cut_short)], ctx.device)
        self.net.train()
        return None if cut_short else total / max(batches, 1)
