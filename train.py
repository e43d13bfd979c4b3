"""Train S3FD on WIDER FACE.

    python train.py --device gpu                       # defaults of the original repository
    python train.py --device npu --amp apex            # Ascend, Apex O2 with loss scale 32
    python train.py --device gpu --resume weights/sfd_face_checkpoint.pth
    torchrun --standalone --nproc_per_node 8 train.py --device gpu   # DDP, batch per process
    python train.py --demo                             # synthetic WIDER, CPU, a few minutes

Log lines, checkpoint names and defaults follow the original script-based repository;
`weights/sfd_face_checkpoint.pth` holds everything needed to continue a run exactly.
"""
import argparse
import datetime
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from data.config import cfg
from data.factory import EpochBatchSampler, dataset_factory, make_loader
from data.widerface import DatasetError
from layers.modules.multibox_loss import MultiBoxLoss
from s3fd import build_s3fd, init_weights_from_scratch, init_weights_xavier
from tools._common import at_least
from utils import device as devices
from utils.augmentations import subtract_mean
from utils.checkpoint import (CheckpointError, atomic_save, checkpoint_variant, extract_state_dict,
                              load_file, load_weights)
from utils.fileio import OutputDirError, make_output_dir
from utils.inference import MIN_INPUT_SIDE

CHECKPOINT_VERSION = 1
# Options that define the order of a run's batches: a mid-epoch resume needs the same values.
ORDER_OPTIONS = ('batch_size', 'seed')
# Options a resume may change on purpose (e.g. a lower --lr after a divergence); a change is logged.
TUNABLE_OPTIONS = ('lr', 'momentum', 'weight_decay', 'gamma', 'input_size', 'epochs', 'max_iter',
                   'amp', 'amp_dtype', 'train_file', 'val_file')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='S3FD face detector training',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--dataset', default='face', choices=['face'], help='training dataset')
    parser.add_argument('--basenet', default='vgg16_reducedfc.pth',
                        help="pretrained VGG16 trunk, a file in --save_folder (or a path); "
                             "'none' trains from scratch")
    parser.add_argument('--batch_size', default=16, type=at_least(1), help='images per batch and per process')
    parser.add_argument('--resume', default=None, type=str,
                        help='checkpoint to continue from (sfd_face_checkpoint.pth for an exact resume)')
    parser.add_argument('--num_workers', default=4, type=at_least(0), help='data loading processes')
    parser.add_argument('--device', default='gpu', choices=['gpu', 'npu', 'cpu'], help='where to train')
    parser.add_argument('--device_id', default=0, type=int,
                        help='GPU/NPU index (under torchrun the local rank is used)')
    parser.add_argument('--lr', '--learning-rate', default=1e-3, type=at_least(0.0, float),
                        help='initial learning rate')
    parser.add_argument('--momentum', default=0.9, type=at_least(0.0, float), help='SGD momentum')
    parser.add_argument('--weight_decay', default=5e-4, type=at_least(0.0, float), help='SGD weight decay')
    parser.add_argument('--gamma', default=0.1, type=at_least(0.0, float),
                        help=f'LR factor at each of the iterations cfg.LR_STEPS={tuple(cfg.LR_STEPS)}')
    parser.add_argument('--save_folder', default='weights/', help='where checkpoints are written')
    parser.add_argument('--amp', default='auto', choices=['auto', 'apex', 'native', 'off'],
                        help='mixed precision: auto = native autocast on GPU, Apex O2 on NPU when '
                             'installed (else native), off on CPU')
    parser.add_argument('--amp_dtype', default='bf16', choices=['bf16', 'fp16'],
                        help='autocast dtype for --amp native (fp16 adds a GradScaler)')
    parser.add_argument('--loss_scale', default=32.0, type=float,
                        help='fixed loss scale of the Ascend recipe (Apex O2 / NPU GradScaler); a step whose '
                             'gradients overflow is skipped')
    parser.add_argument('--npu_jit_compile', action='store_true',
                        help='NPU: compile operators just in time (torch_npu\'s default before the 910B) instead '
                             'of running the precompiled ones (set_compile_mode(jit_compile=False))')
    parser.add_argument('--epochs', default=cfg.EPOCHES, type=int, help='epochs to train')
    parser.add_argument('--max_iter', default=cfg.MAX_STEPS, type=int,
                        help='stop after this many iterations in total, saving a checkpoint')
    parser.add_argument('--input_size', default=cfg.INPUT_SIZE, type=at_least(MIN_INPUT_SIDE),
                        help='training image side')
    parser.add_argument('--train_file', default=cfg.FACE.TRAIN_FILE, help='training list (prepare_wider_data.py)')
    parser.add_argument('--val_file', default=cfg.FACE.VAL_FILE, help='validation list')
    parser.add_argument('--seed', default=0, type=at_least(0, maximum=2**32 - 1), help='seed of initialisation, order and augmentation')
    parser.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                        help='channels-last memory format (default: on with --device gpu, where it trains '
                             '1.4x faster in bf16; off elsewhere)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the network (experimental: non-finite losses on torch 2.11 + CUDA, '
                             'see the README)')
    parser.add_argument('--log_speed', action='store_true',
                        help='add a fifth line to each log block: images/s, data wait per iteration and ETA '
                             '(off by default: the block stays the original four lines)')
    parser.add_argument('--tensorboard', default=None, metavar='DIR',
                        help='write TensorBoard scalars to DIR (needs the tensorboard package)')
    parser.add_argument('--demo', action='store_true',
                        help='generate a synthetic WIDER under data/demo/, train on it on the CPU for a '
                             'few minutes, validate and evaluate')
    return parser.parse_args(argv)


# -- small helpers -------------------------------------------------------------------------


def log(*parts):
    """Print on the main process only (torchrun starts one process per device)."""
    if devices.is_main_process():
        print(*parts, flush=True)


def fail(message):
    """One clear line on stderr and a non-zero exit, no traceback."""
    print(f'train.py: error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def learning_rate(args, iteration):
    """lr * gamma ** (number of cfg.LR_STEPS already reached)."""
    return args.lr * args.gamma ** lr_step_index(iteration)


def lr_step_index(iteration):
    return sum(iteration >= step for step in cfg.LR_STEPS)


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


def format_eta(seconds):
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


# -- model, data, checkpoints ----------------------------------------------------------------


def build_model(args):
    net = build_s3fd('train', cfg.NUM_CLASSES)
    if args.resume:
        return net  # weights come from the checkpoint
    if args.basenet.lower() == 'none':
        log('Training from scratch (--basenet none): Kaiming init for the VGG trunk')
        init_weights_from_scratch(net)
        return net
    path = args.basenet if os.path.dirname(args.basenet) else os.path.join(args.save_folder, args.basenet)
    if not os.path.isfile(path):
        fail(f'basenet {path} not found. Put the reduced-fc VGG16 (vgg16_reducedfc.pth) there, build it '
             f'from torchvision VGG16 weights with `python tools/make_basenet.py --src <vgg16.pth> '
             f'--dst {path}`, or train from scratch with --basenet none')
    log(f'Load base network {path}')
    try:
        state = extract_state_dict(load_file(path), path)
    except CheckpointError as e:
        fail(str(e))
    try:
        load_weights(net.vgg, state, path)
    except CheckpointError as e:
        fail(str(e) + _basenet_hint(state))
    log('Initializing weights...')
    init_weights_xavier([net.extras, net.loc, net.conf])
    return net


def _basenet_hint(state):
    """What a file that is not a basenet probably is, as advice for --basenet's error."""
    if any(k.startswith('features.') for k in state):
        return '. It looks like a torchvision VGG16: convert it with tools/make_basenet.py'
    if any(k.startswith(('loc.', 'conf.')) for k in state):
        return '. It looks like a whole S3FD model: continue from it with --resume'
    return ''


def build_loaders(args, ctx, rank, world):
    if args.val_file != cfg.FACE.VAL_FILE and not os.path.isfile(args.val_file):
        fail(f'--val_file {args.val_file}: no such file (without --val_file, a missing '
             f'{cfg.FACE.VAL_FILE} means training without validation)')
    try:
        train_set, val_set = dataset_factory(args.dataset, input_size=args.input_size, seed=args.seed,
                                             train_file=args.train_file, val_file=args.val_file,
                                             normalize=False)
    except (OSError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else repr(e))
    pin = ctx.pin_memory
    train_sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, rank, world)
    if train_sampler.batches_per_epoch == 0:
        fail(f'{args.train_file}: {len(train_set)} training images are fewer than one batch of '
             f'{args.batch_size} per process')
    train_loader = make_loader(train_set, train_sampler, args.num_workers, pin)
    val_loader = None
    if val_set is not None and len(val_set):
        val_sampler = EpochBatchSampler(len(val_set), args.batch_size, args.seed, rank, world,
                                        shuffle=False, drop_last=False)
        val_loader = make_loader(val_set, val_sampler, args.num_workers, pin)
    return train_loader, val_loader


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


def nonfinite_parameters(model):
    """Names of the parameters that hold a NaN or inf (one host synchronisation)."""
    named = list(model.named_parameters())
    flags = torch.stack([~torch.isfinite(p.detach()).all() for _, p in named]).tolist()
    return [name for (name, _), bad in zip(named, flags) if bad]


def _plain(value):
    """cfg as builtin containers (weights_only loading accepts nothing else)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
            fail(f'{path} stopped mid-epoch ({ckpt["state"]["batch_in_epoch"]} batches into epoch '
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
    try:
        ckpt = load_file(path)
        variant = checkpoint_variant(ckpt)
        if variant is not None and variant != cfg.MODEL_VARIANT:
            fail(f'{path} holds a {variant!r} model, this run builds {cfg.MODEL_VARIANT!r} '
                 '(cfg.MODEL_VARIANT)')
        load_weights(model, extract_state_dict(ckpt, path), path)
    except CheckpointError as e:
        fail(str(e))
    check_resume_options(path, ckpt, args, world_size)
    if 'state' not in ckpt or 'optimizer' not in ckpt:
        # Weights only (the original repository's checkpoint, or a plain state_dict).
        epoch = int(ckpt.get('epoch', -1)) + 1 if isinstance(ckpt.get('epoch'), int) else 0
        log(f'{path} holds weights only: optimizer state and position are not restored; '
            f'starting at epoch {epoch}')
        return new_state(epoch=epoch, iteration=epoch * batches_per_epoch)
    try:
        # Loss scaler first: under Apex O2 it makes the fp32 master weights, which the optimizer's
        # state then fits in fp32.
        ctx.load_state_dict(ckpt.get('amp', {}), optimizer)
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        fail(f'{path}: optimizer state does not fit this model ({e})')
    for param, param_state in optimizer.state.items():
        buffer = param_state.get('momentum_buffer') if isinstance(param_state, dict) else None
        if isinstance(buffer, torch.Tensor) and buffer.shape != param.shape:
            fail(f'{path}: optimizer state does not fit this model (a momentum buffer of shape '
                 f'{tuple(buffer.shape)} for a parameter of shape {tuple(param.shape)})')
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
    return state


def new_state(epoch=0, iteration=0):
    """The training loop's position. 'epoch' is the current epoch, 'batch_in_epoch' the batches
    of it already done, 'loss_sum'/'loss_count' the running epoch loss of the log line,
    'unvalidated_epoch' an epoch trained whose validation was cut short by a stop (else None)."""
    return {'epoch': epoch, 'iteration': iteration, 'batch_in_epoch': 0, 'best_loss': math.inf,
            'loss_sum': 0.0, 'loss_count': 0, 'nonfinite_in_a_row': 0, 'unvalidated_epoch': None}


# -- the loop ------------------------------------------------------------------------------------


def to_device(images, targets, device, channels_last=False):
    """Images to the device, uint8 ones (the loader's) made float32 minus the mean there,
    channels-last on request; targets stay on the host: the loss reads the face sizes there."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:  # one pass: float32, mean and layout together
        images = subtract_mean(images, cfg.img_mean, memory_format)
    return images.contiguous(memory_format=memory_format), targets


def training_step(net, criterion, optimizer, ctx, finite, images, targets, channels_last=False):
    """One SGD step: forward under autocast, loss, backward and update unless the loss is not
    finite. Returns (loss, loss_l, loss_c) detached and whether the update was applied."""
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


class Trainer:
    """The training loop: one object holds what every step needs.

    net is what runs the forward (possibly compiled / DDP-wrapped), model the bare S3FD whose
    state_dict is saved with the plain key names. Validation runs the network without the DDP
    wrapper: processes validate different numbers of batches and must not meet in a collective.
    """

    def __init__(self, args, ctx, net, model, criterion, optimizer, train_loader, val_loader, state, writer):
        self.args, self.ctx = args, ctx
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
        self.finite = FiniteCheck(ctx.device)
        self.stop = None  # StopRequest while run() is active
        self.window = None  # [start, data wait, iterations since the last log], set per epoch

    def run(self):
        self.stop = StopRequest()
        self.net.train()
        try:
            pending = self.state['unvalidated_epoch']  # a stop came during its validation
            if pending is not None and not self.finish_epoch(pending):
                return
            while self.state['epoch'] < self.args.epochs and self.state['iteration'] < self.total_iters:
                epoch = self.state['epoch']
                if not self.train_one_epoch(epoch):
                    return  # stopped mid-epoch; the checkpoint is saved
                self.state.update(epoch=epoch + 1, batch_in_epoch=0, loss_sum=0.0, loss_count=0,
                                  unvalidated_epoch=epoch)
                if not self.finish_epoch(epoch):
                    return
        finally:
            self.stop.close()

    def finish_epoch(self, epoch):
        """Validate the trained `epoch` and save the epoch-end checkpoint; False when the run stops
        (a stop during validation saves the checkpoint at once, marked for a resume to validate)."""
        if self.val_loader is not None and self.validate(epoch) is None:
            self.save_checkpoint(f'{self.stop.signal or "stop requested"} during validation: '
                                 f'epoch {epoch} is trained, a resume validates it first')
            return False
        self.state['unvalidated_epoch'] = None
        self.save_checkpoint()
        if self.stop.requested(self.ctx.device, sync_now=True):  # every process stops
            log(f'{self.stop.signal or "stop requested"}: checkpoint saved to {self.checkpoint_path}')
            return False
        return True

    def save_checkpoint(self, reason=None):
        bad = nonfinite_parameters(self.model)  # the same on every process
        if bad:
            fail(f'{len(bad)} weight tensors hold NaN/inf ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}): '
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
        self.window = [time.time(), 0.0, 0]  # start, data wait, iterations since the last log
        fetch_start = time.time()
        for images, targets in self.train_loader:
            self.window[1] += time.time() - fetch_start
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
            self.window[2] += 1
            is_log_step = iteration % cfg.LOG_INTERVAL == 0
            if is_log_step:
                state['loss_sum'] = float(loss_sum)  # the one host sync, at log steps only
                self.log_step(epoch, iteration, loss_l, loss_c)
            if iteration != 0 and iteration % cfg.SAVE_INTERVAL == 0 and self.main:
                log('Saving state, iter:', iteration)
                atomic_save(self.model.state_dict(),
                            os.path.join(args.save_folder, f'sfd_{args.dataset}_{iteration}.pth'))
            if state['iteration'] >= self.total_iters or self.stop.requested(ctx.device, sync_now=is_log_step):
                if state['batch_in_epoch'] < self.sampler.batches_per_epoch:
                    state['loss_sum'] = float(loss_sum)
                    self.save_checkpoint('stop requested' if self.stop.signal
                                         else f'reached --max_iter {args.max_iter}')
                    return False
                break
            fetch_start = time.time()
        state['loss_sum'] = float(loss_sum)
        return True

    def skip_nonfinite(self, iteration, loss_l, loss_c):
        self.state['nonfinite_in_a_row'] += 1
        loss_l, loss_c = float(loss_l), float(loss_c)
        what = (f'gradient overflow at loss scale {self.ctx.loss_scale:g}' if math.isfinite(loss_l + loss_c)
                else f'non-finite loss (loc {loss_l:.4g}, conf {loss_c:.4g})')
        log(f'iter:{iteration} {what}: step skipped ({self.state["nonfinite_in_a_row"]} in a row)')
        if self.state['nonfinite_in_a_row'] >= 10:
            self.save_checkpoint('stopped after 10 skipped steps in a row')
            fail('10 steps in a row skipped for a non-finite loss or gradient overflow: check the data and '
                 f'lower --lr (state saved to {self.checkpoint_path})')

    def log_step(self, epoch, iteration, loss_l, loss_c):
        """The original four log lines; with --log_speed, a fifth with speed, data wait and ETA."""
        state = self.state
        start, data_wait, iters = self.window
        elapsed = time.time() - start
        # Means over every process's batches, as validation reports it (one collective).
        loss_sum, loss_count, loss_c, loss_l = devices.all_reduce_sum(
            [state['loss_sum'], state['loss_count'], float(loss_c), float(loss_l)], self.ctx.device)
        tloss = loss_sum / max(loss_count, 1)
        loss_c, loss_l = loss_c / self.world, loss_l / self.world
        lr = self.optimizer.param_groups[0]['lr']
        log('Timer: %.4f' % ((elapsed - data_wait) / iters))
        log('epoch:' + repr(epoch) + ' || iter:' + repr(iteration) + ' || Loss:%.4f' % tloss)
        log('->> conf loss:{:.4f} || loc loss:{:.4f}'.format(loss_c, loss_l))
        log('->>lr:{:.6f}'.format(lr))
        speed = iters * self.args.batch_size * self.world / max(elapsed, 1e-9)
        if self.args.log_speed:
            eta = (self.total_iters - state['iteration']) * elapsed / iters
            log('->> speed:{:.1f} img/s || data wait:{:.4f}s/iter || eta:{}'.format(
                speed, data_wait / iters, format_eta(eta)))
        if self.writer is not None:
            for name, value in (('loss', tloss), ('loss_conf', loss_c), ('loss_loc', loss_l),
                                ('lr', lr), ('images_per_s', speed)):
                self.writer.add_scalar(f'train/{name}', value, iteration)
        self.window = [time.time(), 0.0, 0]

    @torch.no_grad()
    def validate(self, epoch):
        """Validation loss over the val list (sharded over processes), best-checkpoint saving.
        Returns the mean loss per batch, or None when a stop signal cut it short (on any process)."""
        args, ctx, state = self.args, self.ctx, self.state
        self.eval_net.eval()
        start = time.time()
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
        if cut_short:
            return None
        tloss = total / max(batches, 1)
        log('Timer: %.4f' % (time.time() - start))
        log('test epoch:' + repr(epoch) + ' || Loss:%.4f' % tloss)
        if self.writer is not None:
            self.writer.add_scalar('val/loss', tloss, state['iteration'])
        if tloss < state['best_loss']:
            log('Saving best state,epoch', epoch)
            if self.main:
                atomic_save(self.model.state_dict(), os.path.join(args.save_folder, f'sfd_{args.dataset}.pth'))
        state['best_loss'] = min(state['best_loss'], tloss)
        return tloss


def open_tensorboard(path):
    if not path or not devices.is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log('--tensorboard: the tensorboard package is not installed (pip install tensorboard); '
            'continuing without it')
        return None
    return SummaryWriter(path)


def main(args):
    if args.demo:
        from utils.demo import prepare_demo
        prepare_demo(args)
    rank, world, local_rank = devices.distributed_env()
    try:
        ctx = devices.setup_device(args.device, local_rank if world > 1 else args.device_id,
                                   args.amp, args.amp_dtype, args.loss_scale, args.npu_jit_compile)
    except devices.DeviceUnavailable as e:
        fail(str(e))
    devices.init_distributed(ctx.type)
    if args.channels_last is None:
        args.channels_last = ctx.type == 'cuda'
    ctx.share_cpu(args.num_workers, world)
    torch.manual_seed(args.seed)
    if devices.is_main_process():
        try:
            make_output_dir(args.save_folder, '--save_folder')
        except OutputDirError as e:
            fail(str(e))
    log(f'Device: {ctx.describe()}' + (f' | {world} processes, batch {args.batch_size} each' if world > 1 else ''))

    train_loader, val_loader = build_loaders(args, ctx, rank, world)
    net = build_model(args).to(ctx.device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = ctx.make_optimizer(net.parameters(), args.lr, args.momentum, args.weight_decay)
    model = net  # the bare module: its state_dict has the plain key names
    net, optimizer = ctx.initialize(net, optimizer)
    state = new_state()
    if args.resume:
        state = resume(args.resume, model, optimizer, ctx, train_loader.batch_sampler.batches_per_epoch,
                       args, world)
    if args.compile:
        net = torch.compile(net)
    if world > 1:
        ids = [ctx.device.index] if ctx.type in ('cuda', 'npu') else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    criterion = MultiBoxLoss(cfg, args.dataset)
    writer = open_tensorboard(args.tensorboard)
    log(f'Loading dataset: {len(train_loader.dataset)} training images, '
        f'{len(val_loader.dataset) if val_loader else 0} validation images, '
        f'{train_loader.batch_sampler.batches_per_epoch} iterations per epoch')
    start, finished = time.time(), False
    try:
        try:
            Trainer(args, ctx, net, model, criterion, optimizer, train_loader, val_loader, state, writer).run()
        except DatasetError as e:  # raised in a loader worker, it arrives with the worker's traceback
            fail(str(e).strip().splitlines()[-1].split('DatasetError: ', 1)[-1])
        log(f'Finished: iteration {state["iteration"]}, epoch {state["epoch"]}, '
            f'best validation loss {state["best_loss"]:.4f}, {time.time() - start:.1f}s; '
            f'weights in {args.save_folder}')  # before the process group goes: main process only
        finished = True
    finally:
        if writer is not None:
            writer.close()
        net = None  # DDP's reducer holds the process group: let it go first (see cleanup_distributed)
        devices.cleanup_distributed(synchronize=finished)
    if args.demo:
        from utils.demo import finish_demo
        finish_demo(args, state)
    return state


if __name__ == '__main__':
    main(parse_args())
