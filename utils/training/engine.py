"""The training engine, as free functions: one step, one epoch, the validation loss, the log
block, the finite check, the speed meter and the learning-rate schedule. train.py's `main` calls
them in its epoch loop; nothing here writes a file (train.py decides what is saved and when).

Shapes: images [B, 3, S, S] (uint8 from the loader, made float32 minus the mean on the device),
targets a list of [n_i, 5] (x1, y1, x2, y2, label) normalised, on the host.
"""
import datetime
import math
import time

import torch
import torch.distributed as dist

from data.config import cfg
from utils import device as devices
from utils.files.weights import nonfinite_tensors
from utils.cli import UserError
from utils.transforms import subtract_mean

# Non-finite losses (or fp16 overflows) in a row after which a run stops.
MAX_NONFINITE_IN_A_ROW = 10
# Iterations this slow (seconds) show the speed line, with its ETA, without --log_speed.
SLOW_ITERATION = 5.0
# Weights larger than this have exploded. The largest S3FD weights are the L2Norm scales,
# initialised to 10, 8 and 5 (after the demo's 135 steps: 9.999, 7.999, 5.000; every other weight
# below 0.25), three orders of magnitude below; a run whose learning rate is far too high passes it
# within a few steps (seen: 4.5e14 after one epoch at --lr 0.5).
EXPLODED_WEIGHT = 1e4


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
    """Whether a step's loss is finite on every process, and whether any process asked to stop,
    read without draining the device's queue.

    `submit(loss, stop)` right after the forward; `ok()` after the backward has been queued, then
    `stop`. Under torchrun both flags travel in one all-reduce, [finite, going on] with MIN, which
    the step makes anyway: a stop signal to any process stops every one after the same step. On an
    accelerator (CUDA, NPU: any whose torch module has an Event) the flags travel to pinned host
    memory behind the forward, so waiting for them does not stall the queued backward.
    """

    def __init__(self, device):
        backend = torch.get_device_module(device.type) if device.type != 'cpu' else None
        self.event = backend.Event() if hasattr(backend, 'Event') else None
        self.flags = None
        self.stop = False
        if self.event is not None:
            self.host = torch.zeros(2, dtype=torch.int32).pin_memory()

    def submit(self, loss, stop=False):
        flags = torch.isfinite(loss.detach()).int().reshape(1)
        if dist.is_initialized():
            flags = torch.cat([flags, torch.full_like(flags, int(not stop))])  # a fill: no copy from the host
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        else:
            self.stop = stop
        if self.event is not None:
            self.host[:len(flags)].copy_(flags, non_blocking=True)
            self.event.record()
        else:
            self.flags = flags

    def ok(self):
        if self.event is not None:
            self.event.synchronize()
            flags = self.host
        else:
            flags = self.flags
        if len(flags) == 2 and dist.is_initialized():
            self.stop = not bool(flags[1])
        return bool(flags[0])


def training_step(net, criterion, optimizer, runtime, finite, images, targets, channels_last=False, stop=False):
    """One SGD step: forward under autocast, loss, backward and update unless the loss is not
    finite or (NPU fp16) the gradients overflowed. `runtime` is the Runtime (device, AMP,
    loss scaling), `finite` the FiniteCheck, `stop` whether this process was asked to stop (then
    `finite.stop` says whether any was). Returns (loss, loss_l, loss_c) detached and whether the
    update was applied."""
    images, targets = to_device(images, targets, runtime.device, channels_last)
    runtime.zero_grad(optimizer)
    with runtime.autocast():
        out = net(images)
    loss_l, loss_c = criterion(out, targets)
    loss = loss_l + loss_c
    finite.submit(loss, stop)
    runtime.backward(loss, optimizer)
    stepped = finite.ok()
    if stepped:
        stepped = runtime.step(optimizer)  # False: the gradients overflowed (NPU fp16), the step was skipped
    else:
        runtime.discard(optimizer)
    return loss.detach(), loss_l.detach(), loss_c.detach(), stepped


def nonfinite_parameters(model):
    """Names of the parameters that hold a NaN or inf (one host synchronisation)."""
    return nonfinite_tensors(dict(model.named_parameters()))


def weights_diverged(model):
    """Why the model's weights cannot be trained on (some hold NaN/inf, or exceed EXPLODED_WEIGHT),
    as words for a message, or None (one host synchronisation)."""
    names, params = zip(*model.named_parameters())
    largest = torch.stack([p.detach().abs().amax().float() for p in params]).tolist()  # NaN propagates
    bad = [name for name, value in zip(names, largest) if not math.isfinite(value)]
    if bad:
        return f'{len(bad)} weight tensors hold NaN/inf ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})'
    largest = max(largest)
    if largest > EXPLODED_WEIGHT:
        return f'weights reach {largest:.3g} in magnitude (exploded: above {EXPLODED_WEIGHT:g})'
    return None


def epoch_diverged(model, loss):
    """Why an epoch just trained must not be kept: its weights are not sound (weights_diverged), or
    its loss (the validation loss, else the mean training loss; None when no step was finite) is
    not finite. None when it may be kept."""
    trouble = weights_diverged(model)
    if trouble is None and (loss is None or not math.isfinite(loss)):
        trouble = 'no finite training loss' if loss is None else f'its loss is {loss}'
    return trouble


# -- timing -------------------------------------------------------------------------------------


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


# -- one epoch -----------------------------------------------------------------------------------


class Diverged(UserError):
    """MAX_NONFINITE_IN_A_ROW steps in a row were skipped. `overflow`: the last one for an fp16
    gradient overflow (its loss was finite), else for a non-finite loss (the weights give one)."""

    def __init__(self, message, overflow):
        super().__init__(message)
        self.overflow = overflow


def skip_step(state, iteration, loss_l, loss_c, runtime):
    """Count a step not taken (a non-finite loss, or an fp16 gradient overflow on the NPU) and say
    so; Diverged when it is the MAX_NONFINITE_IN_A_ROW-th in a row."""
    state.nonfinite_in_a_row += 1
    loss_l, loss_c = float(loss_l), float(loss_c)
    overflow = math.isfinite(loss_l + loss_c)
    what = (f'gradient overflow at loss scale {runtime.overflow_scale:g}' if overflow
            else f'non-finite loss (loc {loss_l:.4g}, conf {loss_c:.4g})')
    log(f'iter:{iteration} {what}: step skipped ({state.nonfinite_in_a_row} in a row)')
    if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise Diverged(f'{MAX_NONFINITE_IN_A_ROW} steps in a row skipped for a non-finite loss or a gradient '
                       'overflow', overflow)


def train_one_epoch(net, criterion, optimizer, runtime, loader, state, args, channels_last, signals, meter, finite,
                    save_due=None, save=None, writer=None):
    """Train epoch `state.epoch` from its batch `state.batch_in_epoch` on, to the epoch's end, to
    --max_iter or to a stop signal, updating `state` in place. Returns the name of the signal that
    stopped it (on any process), else None. `args`: the options (--lr, --gamma, --epochs, --max_iter,
    --log_speed). After the step of iteration i, when `save_due(state, i)`,
    `save(state, i)` (train.py's saves inside an epoch; `state.loss_sum` is then exact).
    Raises Diverged after MAX_NONFINITE_IN_A_ROW skipped steps in a row."""
    sampler = loader.batch_sampler
    epoch = state.epoch
    sampler.set_epoch(epoch, state.batch_in_epoch)
    last = min(args.max_iter, state.iteration - state.batch_in_epoch + (args.epochs - epoch) * sampler.batches_per_epoch)
    running = torch.tensor(state.loss_sum, dtype=torch.float32, device=runtime.device)  # summed on the device
    meter.reset()
    for images, targets in loader:
        meter.batch_arrived()
        iteration = state.iteration
        set_learning_rate(optimizer, learning_rate(args, iteration))
        loss, loss_l, loss_c, stepped = training_step(net, criterion, optimizer, runtime, finite, images, targets,
                                                      channels_last, stop=signals.received is not None)
        if stepped:
            running += loss
            state.loss_count += 1
            state.nonfinite_in_a_row = 0
        else:
            skip_step(state, iteration, loss_l, loss_c, runtime)
        state.batch_in_epoch += 1
        state.iteration += 1
        meter.step_done()
        if iteration % cfg.LOG_INTERVAL == 0:
            state.loss_sum = float(running)  # the one host synchronisation, at log steps only
            log_block(state, epoch, iteration, loss_l, loss_c, optimizer, runtime, meter, last, args.log_speed, writer)
        if save_due is not None and save_due(state, iteration):
            state.loss_sum = float(running)
            save(state, iteration)
        if finite.stop or state.iteration >= args.max_iter:
            break
    state.loss_sum = float(running)
    if finite.stop:
        return signals.received or 'a stop signal to another process'
    return None


def close_epoch(state, device):
    """The epoch's training is done: its mean training loss over every process, and the position
    moved to the next epoch, the trained one waiting for its validation."""
    loss_sum, loss_count = devices.all_reduce_sum([state.loss_sum, state.loss_count], device)
    state.train_loss = loss_sum / loss_count if loss_count else None
    state.unvalidated_epoch = state.epoch
    state.epoch, state.batch_in_epoch, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0


def log_block(state, epoch, iteration, loss_l, loss_c, optimizer, runtime, meter, last_iteration, log_speed,
              writer=None):
    """The original four log lines (the running epoch loss, this step's conf and loc losses, the
    learning rate), as means over every process; the loss scale when it changed (NPU fp16); with
    --log_speed, or when an iteration takes SLOW_ITERATION seconds or more, the speed, data wait
    and ETA."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum, loss_count, loss_c, loss_l = devices.all_reduce_sum(
        [state.loss_sum, state.loss_count, float(loss_c), float(loss_l)], loss_c.device)
    tloss = loss_sum / max(loss_count, 1)
    loss_c, loss_l = loss_c / world, loss_l / world
    lr = optimizer.param_groups[0]['lr']
    log('Timer: %.4f' % meter.seconds_per_iteration())
    log('epoch:' + repr(epoch) + ' || iter:' + repr(iteration) + ' || Loss:%.4f' % tloss)
    log('->> conf loss:{:.4f} || loc loss:{:.4f}'.format(loss_c, loss_l))
    log('->>lr:{:.6f}'.format(lr))
    scale_change = runtime.loss_scale_change()
    if scale_change:
        log(scale_change)
    speed = meter.images_per_second()
    if log_speed or meter.seconds_per_iteration() >= SLOW_ITERATION:
        log('->> speed:{:.1f} img/s || data wait:{:.4f}s/iter || eta:{}'.format(
            speed, meter.data_wait_per_iteration(), meter.eta(last_iteration - state.iteration)))
    if writer is not None:
        for name, value in (('loss', tloss), ('loss_conf', loss_c), ('loss_loc', loss_l), ('lr', lr),
                            ('images_per_s', speed)):
            writer.add_scalar(f'train/{name}', value, iteration)
    meter.reset()


@torch.no_grad()
def validation_loss(net, criterion, runtime, loader, channels_last, signals):
    """Mean validation loss per batch over every process, or None when a stop signal cut it short
    (on any process). `net` must not be DDP-wrapped: processes validate different numbers of
    batches and must not meet in a collective until the end."""
    training = net.training
    net.eval()
    total = torch.zeros((), device=runtime.device)  # summed on the device, read once after the loop
    batches, cut_short = 0, False
    for images, targets in loader:
        if signals.received is not None:
            cut_short = True
            break
        images, targets = to_device(images, targets, runtime.device, channels_last)
        with runtime.autocast():
            out = net(images)
        loss_l, loss_c = criterion(out, targets)
        total += (loss_l + loss_c).detach()
        batches += 1
    net.train(training)
    total, batches, cut_short = devices.all_reduce_sum([float(total), batches, int(cut_short)], runtime.device)
    return None if cut_short else total / max(batches, 1)
