"""Train S3FD on WIDER FACE.

    python train.py --device gpu                       # defaults of the original repository
    python train.py --device npu --amp apex            # Ascend, Apex O2 with loss scale 32
    python train.py --device gpu --resume weights/sfd_face_checkpoint.pth
    torchrun --standalone --nproc_per_node 8 train.py --device gpu   # DDP, batch per process
    python train.py --demo                             # synthetic WIDER, CPU, a few minutes

Log lines, checkpoint names and defaults follow the original script-based repository;
`weights/sfd_face_checkpoint.pth` holds everything needed to continue a run exactly. The
loop itself is utils/engine.py; this script builds what it needs from the options.

PyTorch is imported inside the functions that use it, so that `--help` and usage errors
answer at once.
"""
import argparse
import os
import sys
import time

from data.config import cfg
from utils.cli import UserError, at_least, input_side, loss_scale, run_cli


class TrainSetupError(UserError, RuntimeError):
    """The run cannot start as asked (a missing file, too few images); one line for the user."""


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
    parser.add_argument('--loss_scale', default=None, type=loss_scale, metavar='SCALE|dynamic',
                        help='loss scale of the NPU fp16 recipes (Apex O2 / NPU GradScaler): a number is a static '
                             'scale (default 32, the Ascend recipe\'s; with --resume, the checkpoint\'s mode and '
                             'scale), dynamic the library\'s dynamic scaling; a step whose gradients overflow is '
                             'skipped either way')
    parser.add_argument('--combine_ddp', action='store_true',
                        help="NPU with Apex under torchrun: Apex's combine_ddp exchanges the combined gradients "
                             'itself, instead of DistributedDataParallel (the Ascend recipe\'s data parallelism)')
    parser.add_argument('--npu_jit_compile', action='store_true',
                        help="NPU: compile operators just in time (torch_npu's default before the 910B) instead "
                             'of running the precompiled ones (set_compile_mode(jit_compile=False))')
    parser.add_argument('--epochs', default=cfg.EPOCHES, type=int, help='epochs to train')
    parser.add_argument('--max_iter', default=cfg.MAX_STEPS, type=int,
                        help='stop after this many iterations in total, saving a checkpoint')
    parser.add_argument('--input_size', default=cfg.INPUT_SIZE, type=input_side, help='training image side')
    parser.add_argument('--train_file', default=cfg.FACE.TRAIN_FILE, help='training list (prepare_wider_data.py)')
    parser.add_argument('--val_file', default=cfg.FACE.VAL_FILE, help='validation list')
    parser.add_argument('--seed', default=0, type=at_least(0, maximum=2**32 - 1),
                        help='seed of initialisation, order and augmentation')
    parser.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                        help='channels-last memory format (default: on with --device gpu, where it trains '
                             '1.4x faster in bf16; off elsewhere)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the network (experimental: non-finite losses on torch 2.11 + CUDA, '
                             'see docs/performance.md)')
    parser.add_argument('--log_speed', action='store_true',
                        help='add a fifth line to each log block: images/s, data wait per iteration and ETA '
                             '(off by default: the block stays the original four lines)')
    parser.add_argument('--val_ap', action='store_true',
                        help='after each validation, the WIDER AP of the single-scale test on the validation '
                             'images (Easy/Medium/Hard with the official ground truth, else one AP over all '
                             'listed faces): one more log line, TensorBoard scalars, metrics.jsonl')
    parser.add_argument('--val_ap_interval', default=1, type=at_least(1),
                        help='evaluate AP every N epochs (and after the last one)')
    parser.add_argument('--val_ap_images', default=None, type=at_least(1),
                        help='AP on the first N validation images only (a quick subset)')
    parser.add_argument('--val_ap_max_size', default=None, type=input_side,
                        help='cap the longer side of the AP test input at N px (default: the official '
                             'H*W <= 1700*1200 rule, as wider_test.py)')
    parser.add_argument('--eval_gt', default=None, metavar='DIR',
                        help='official ground-truth folder for --val_ap (default: <WIDER>/eval_tools/'
                             'ground_truth beside the listed images, when it is there)')
    parser.add_argument('--best_by', default='loss', choices=['loss', 'ap'],
                        help="what sfd_face.pth holds: the epoch of the lowest validation loss (the "
                             "original repository's rule) or of the highest mean AP (turns --val_ap on)")
    parser.add_argument('--tensorboard', default=None, metavar='DIR',
                        help='write TensorBoard scalars to DIR (needs the tensorboard package)')
    parser.add_argument('--demo', action='store_true',
                        help='generate a synthetic WIDER under data/demo/, train on it on the CPU for a '
                             'few minutes, validate and evaluate (quickstart.py)')
    return parser.parse_args(argv)


# -- building the pieces -------------------------------------------------------------------------


def build_model(args, log):
    """S3FD in the train phase: the basenet loaded into its VGG trunk and the new layers
    Xavier-initialised, or Kaiming from scratch with --basenet none; left as built when
    resuming (the weights come from the checkpoint)."""
    from s3fd import build_s3fd, init_weights_from_scratch, init_weights_xavier
    from utils.checkpoint import CheckpointError, extract_state_dict, load_file, load_weights

    net = build_s3fd('train', cfg.NUM_CLASSES)
    if args.resume:
        return net
    if args.basenet.lower() == 'none':
        log('Training from scratch (--basenet none): Kaiming init for the VGG trunk')
        init_weights_from_scratch(net)
        return net
    path = args.basenet if os.path.dirname(args.basenet) else os.path.join(args.save_folder, args.basenet)
    if not os.path.isfile(path):
        raise TrainSetupError(
            f'basenet {path} not found. Put the reduced-fc VGG16 (vgg16_reducedfc.pth) there, build it '
            f'from torchvision VGG16 weights with `python tools/make_basenet.py --src <vgg16.pth> '
            f'--dst {path}`, or train from scratch with --basenet none')
    log(f'Load base network {path}')
    state = extract_state_dict(load_file(path), path)
    try:
        load_weights(net.vgg, state, path)
    except CheckpointError as e:
        raise CheckpointError(str(e) + _basenet_hint(state)) from None
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
    """(train loader, val loader or None): each process takes its shard of every batch list."""
    from data.factory import EpochBatchSampler, dataset_factory, make_loader

    if args.val_file != cfg.FACE.VAL_FILE and not os.path.exists(args.val_file):  # a directory: dataset_factory refuses it
        raise TrainSetupError(f'--val_file {args.val_file}: no such file (without --val_file, a missing '
                              f'{cfg.FACE.VAL_FILE} means training without validation)')
    try:
        train_set, val_set = dataset_factory(args.dataset, input_size=args.input_size, seed=args.seed,
                                             train_file=args.train_file, val_file=args.val_file,
                                             normalize=False)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise TrainSetupError(str(e).splitlines()[0] if str(e) else repr(e)) from None
    pin = ctx.pin_memory
    train_sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, rank, world)
    if train_sampler.batches_per_epoch == 0:
        raise TrainSetupError(f'{args.train_file}: {len(train_set)} training images are fewer than one batch '
                              f'of {args.batch_size} per process')
    train_loader = make_loader(train_set, train_sampler, args.num_workers, pin)
    val_loader = None
    if val_set is not None and len(val_set):
        val_sampler = EpochBatchSampler(len(val_set), args.batch_size, args.seed, rank, world,
                                        shuffle=False, drop_last=False)
        val_loader = make_loader(val_set, val_sampler, args.num_workers, pin)
    return train_loader, val_loader


def build_val_ap(args, val_loader, log):
    """The AP evaluation of --val_ap / --best_by ap, or None."""
    if args.best_by == 'ap':
        args.val_ap = True
    if not args.val_ap:
        return None
    if val_loader is None:
        raise TrainSetupError(f'--val_ap needs validation images: {args.val_file} is missing or lists none')
    from utils.val_ap import ValAP

    val_ap = ValAP(args.val_file, args.eval_gt, args.val_ap_images, args.val_ap_max_size, log)
    log(f'val AP: {val_ap.describe()}' + (f', every {args.val_ap_interval} epochs' if args.val_ap_interval > 1 else ''))
    return val_ap


def open_tensorboard(path, log):
    """A SummaryWriter on the main process, or None (no --tensorboard, or not installed)."""
    from utils import device as devices

    if not path or not devices.is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log('--tensorboard: the tensorboard package is not installed (pip install tensorboard); '
            'continuing without it')
        return None
    return SummaryWriter(path)


# -- the run -------------------------------------------------------------------------------------


def claim_save_folder(args, ctx, log):
    """The save folder for this run alone: made, its lock taken and the temporary files of
    killed saves removed, on the process that saves (under torchrun, rank 0). Returns the lock
    (None on the other processes), which the caller releases. When the folder is refused, every
    process stops: rank 0 with the one-line error, the others quietly."""
    from utils import device as devices
    from utils.fileio import OutputDirError, format_bytes, make_output_dir
    from utils import runguard

    lock = refused = None
    if devices.is_main_process():
        checkpoint = os.path.join(args.save_folder, f'sfd_{args.dataset}_checkpoint.pth')
        try:
            make_output_dir(args.save_folder, '--save_folder')
            lock, removed, freed = runguard.claim_save_folder(
                args.save_folder, args.dataset, '--save_folder',
                advice=f'wait for it to end (then --resume {checkpoint} continues it) or give another --save_folder')
        except OutputDirError as error:
            refused = error
    if devices.all_reduce_sum([float(refused is not None)], ctx.device)[0]:
        if refused is not None:
            raise refused
        raise SystemExit(2)  # rank 0 prints why
    if lock is not None and lock.warning:
        print(lock.warning, file=sys.stderr, flush=True)
    if lock is not None and removed:
        log(f'Removed {removed} temporary file(s) of interrupted saves from {args.save_folder} ({format_bytes(freed)})')
    return lock


def main(args):
    """Train as the options say; returns the loop state (see utils.engine.new_state) and sets
    args.stopped (a stop signal ended the run before its end, the checkpoint saved). Raises a
    UserError with a one-line message for bad input."""
    from utils import device as devices

    if args.demo:
        import quickstart
        quickstart.prepare_demo(args)
    rank, world, local_rank = devices.distributed_env()
    ctx = devices.setup_device(args.device, local_rank if world > 1 else args.device_id,
                               args.amp, args.amp_dtype, args.loss_scale, args.npu_jit_compile, args.combine_ddp)
    devices.init_distributed(ctx.type)
    from utils.engine import log
    lock = claim_save_folder(args, ctx, log)
    try:
        state = train(args, ctx, rank, world)
    finally:
        if lock is not None:
            lock.release()
    if args.demo:
        quickstart.finish_demo(args, state)
    return state


def train(args, ctx, rank, world):
    """The run, in a save folder of its own: data, model, optimizer, engine."""
    import torch

    from layers.modules.multibox_loss import MultiBoxLoss
    from utils import device as devices
    from utils.engine import Trainer, log, new_state, resume
    from utils.runguard import stopped_message

    if args.channels_last is None:
        args.channels_last = ctx.type == 'cuda'
    ctx.share_cpu(args.num_workers, world)
    torch.manual_seed(args.seed)
    log(f'Device: {ctx.describe()}' + (f' | {world} processes, batch {args.batch_size} each' if world > 1 else ''))
    for note in ctx.notes:
        log(note)

    train_loader, val_loader = build_loaders(args, ctx, rank, world)
    net = build_model(args, log).to(ctx.device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = ctx.make_optimizer(net.parameters(), args.lr, args.momentum, args.weight_decay)
    model = net  # the bare module: its state_dict has the plain key names
    net, optimizer = ctx.initialize(net, optimizer)
    state = new_state()
    if args.resume:  # after ctx.initialize: Apex reads its loss scalers only then
        state = resume(args.resume, model, optimizer, ctx, train_loader.batch_sampler.batches_per_epoch,
                       args, world)
    if args.compile:
        net = torch.compile(net)
    net = ctx.wrap_distributed(net, world)  # DDP under torchrun, unless Apex's combine_ddp exchanges the gradients
    criterion = MultiBoxLoss(cfg, args.dataset)
    val_ap = build_val_ap(args, val_loader, log)
    writer = open_tensorboard(args.tensorboard, log)
    log(f'Loading dataset: {len(train_loader.dataset)} training images, '
        f'{len(val_loader.dataset) if val_loader else 0} validation images, '
        f'{train_loader.batch_sampler.batches_per_epoch} iterations per epoch')
    start, finished = time.time(), False
    trainer = Trainer(args, ctx, net, model, criterion, optimizer, train_loader, val_loader, state, writer, val_ap)
    try:
        trainer.run()
        args.stopped = trainer.stopped
        best_ap = (f', best val AP {state["best_ap"]:.4f} (epoch {state["best_ap_epoch"]})'
                   if state['best_ap'] is not None else '')
        # Before the process group goes: the main process prints.
        if trainer.stopped:
            log(stopped_message(state['iteration'], trainer.checkpoint_path, trainer.stop.signal))
        else:
            log(f'Finished: iteration {state["iteration"]}, epoch {state["epoch"]}, '
                f'best validation loss {state["best_loss"]:.4f}{best_ap}, {time.time() - start:.1f}s; '
                f'weights in {args.save_folder}')
        finished = True
    finally:
        if writer is not None:
            writer.close()
        net = trainer = None  # DDP's reducer holds the process group: let it go first (see cleanup_distributed)
        devices.cleanup_distributed(synchronize=finished)
    return state


def cli(argv=None):
    """Command-line entry. Exit status: 0 when the run reached its end; EXIT_STOPPED (75,
    sysexits' EX_TEMPFAIL) when a stop signal ended it early with a resumable checkpoint saved,
    for a scheduler to requeue; 2 with one line `train.py: error: ...` for a UserError."""
    from utils.runguard import EXIT_STOPPED  # light: no PyTorch

    args = parse_args(argv)
    status = run_cli(main, lambda _: args, prog='train.py', status=2)
    return EXIT_STOPPED if status == 0 and getattr(args, 'stopped', False) else status


if __name__ == '__main__':
    sys.exit(cli())
