"""Train S3FD on WIDER FACE.

    python train.py --device gpu                       # defaults of the original repository
    python train.py --device npu --amp apex            # Ascend, Apex O2 with loss scale 32
    python train.py --device gpu --resume weights/sfd_face_checkpoint.pth
    torchrun --standalone --nproc_per_node 8 train.py --device gpu   # DDP, batch per process
    python train.py --demo                             # synthetic WIDER, CPU, a few minutes

Log lines, checkpoint names and defaults follow the original script-based repository;
`weights/sfd_face_checkpoint.pth` holds everything needed to continue a run exactly. `main`
shows the whole run: set-up, a fresh or resumed state, the epoch loop. The step, one epoch and
the validation loss are utils/training/engine.py; the checkpoint's format and the resume are
utils/training/checkpoint.py; the save folder's files and rules utils/training/save_folder.py.

PyTorch is imported inside the functions that use it, so that `--help` and usage errors
answer at once.
"""
import argparse
import os
import sys
import time

from data.config import cfg
from utils.cli import HelpFormatter, UserError, at_least, input_side, loss_scale, run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='S3FD face detector training',
                                     formatter_class=HelpFormatter)
    parser.add_argument('--dataset', default='face', choices=['face'], help='training dataset')
    parser.add_argument('--basenet', default='vgg16_reducedfc.pth',
                        help="pretrained VGG16 trunk, a file in --save_folder (or a path); "
                             "'none' trains from scratch")
    parser.add_argument('--batch_size', default=16, type=at_least(1), help='images per batch and per process')
    parser.add_argument('--resume', default=None, type=str,
                        help="checkpoint to continue from (sfd_face_checkpoint.pth for an exact resume); 'auto': "
                             "the save folder's checkpoint when there is one, else a new run (a command a "
                             'scheduler can re-run as often as it likes)')
    parser.add_argument('--overwrite', action='store_true',
                        help="start a new run in a --save_folder that holds another run's checkpoint or best "
                             'weights, removing its files (without it such a run is refused)')
    parser.add_argument('--checkpoint_interval', default=500, type=at_least(0),
                        help='also write the full, resumable checkpoint every N iterations inside an epoch (0: at '
                             'epoch ends only); see docs/training.md#long-runs-on-a-cluster')
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
    parser.add_argument('--epochs', default=cfg.EPOCHES, type=at_least(1), help='epochs to train')
    parser.add_argument('--max_iter', default=cfg.MAX_STEPS, type=at_least(1),
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


def build_model(args, log, resuming=False):
    """S3FD in the train phase: the basenet loaded into its VGG trunk and the new layers
    Xavier-initialised, or Kaiming from scratch with --basenet none; left as built when
    `resuming` (the weights come from the checkpoint)."""
    from s3fd import build_s3fd, init_weights_from_scratch, init_weights_xavier
    from utils.files.weights import CheckpointError, extract_state_dict, load_file, load_weights

    net = build_s3fd('train', cfg.NUM_CLASSES)
    if resuming:
        return net
    if args.basenet.lower() == 'none':
        log('Training from scratch (--basenet none): Kaiming init for the VGG trunk')
        init_weights_from_scratch(net)
        return net
    path = args.basenet if os.path.dirname(args.basenet) else os.path.join(args.save_folder, args.basenet)
    if not os.path.isfile(path):
        raise UserError(
            f'basenet {path} not found. Build the reduced-fc VGG16 from torchvision\'s ImageNet VGG16 with '
            f'`python tools/make_basenet.py --src torchvision --dst {path}` (downloads vgg16-397923af.pth once '
            f'into torch\'s cache; --src takes a local copy too), or train from scratch with --basenet none')
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


def build_loaders(args, runtime, rank, world):
    """(train loader, val loader or None): each process takes its shard of every batch list."""
    from data.factory import EpochBatchSampler, dataset_factory, make_loader

    if args.val_file != cfg.FACE.VAL_FILE and not os.path.exists(args.val_file):  # a directory: dataset_factory refuses it
        raise UserError(f'--val_file {args.val_file}: no such file (without --val_file, a missing '
                              f'{cfg.FACE.VAL_FILE} means training without validation)')
    try:
        train_set, val_set = dataset_factory(args.dataset, input_size=args.input_size, seed=args.seed,
                                             train_file=args.train_file, val_file=args.val_file,
                                             normalize=False)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e).splitlines()[0] if str(e) else repr(e)) from None
    pin = runtime.pin_memory
    train_sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, rank, world)
    if train_sampler.batches_per_epoch == 0:
        raise UserError(f'{args.train_file}: {len(train_set)} training images are fewer than one batch '
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
    if not (args.val_ap or args.best_by == 'ap'):
        return None
    if val_loader is None:
        raise UserError(f'--val_ap needs validation images: {args.val_file} is missing or lists none')
    from utils.training.val_ap import ValAP

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


def claim_save_folder(folder, args, runtime, log):
    """The save folder for this run alone, taken by the process that saves (under torchrun, rank 0):
    made, its lock taken, the temporary files of killed saves removed, and for a new run, no other
    run's results in it (refused, or removed with --overwrite). When it is refused every process
    stops: rank 0 with the one-line error, the others quietly. Returns the checkpoint to resume
    from: --resume's, or with --resume auto the folder's own when there is one; None for a new run."""
    from utils import device as devices
    from utils.files.fileio import OutputDirError, format_bytes

    refused = removed = freed = None
    found = False
    try:
        removed, freed = folder.claim(advice='wait for it to end (then --resume auto continues it) or give another '
                                             '--save_folder')
        found = folder.writer and args.resume == 'auto' and os.path.isfile(folder.checkpoint)
        if folder.writer and (args.resume is None or (args.resume == 'auto' and not found)):
            make_room_for_a_new_run(folder, args.overwrite, log)
    except OutputDirError as error:
        refused = error
    refused_anywhere, found = devices.all_reduce_sum([float(refused is not None), float(found)], runtime.device)
    if refused_anywhere:
        if refused is not None:
            raise refused
        raise SystemExit(2)  # rank 0 prints why
    if folder.lock is not None and folder.lock.warning:
        print(folder.lock.warning, file=sys.stderr, flush=True)
    if removed:
        log(f'Removed {removed} temporary file(s) of interrupted saves from {folder.path} ({format_bytes(freed)})')
    if args.resume != 'auto':
        return args.resume
    log(f'--resume auto: continuing from {folder.checkpoint}' if found else
        f'--resume auto: no checkpoint in {folder.path}, starting a new run')
    return folder.checkpoint if found else None


def make_room_for_a_new_run(folder, overwrite, log):
    """A new run never silently replaces another's results: where one left its checkpoint, best
    weights or other files, refuse (OutputDirError naming what is there and the ways on), or with
    --overwrite remove them, naming them."""
    from utils.files.fileio import OutputDirError

    names = folder.run_files()
    if not names:
        return
    if not overwrite:
        what = folder.previous_run() or 'files of another run: ' + ', '.join(names)
        raise OutputDirError(f'{folder.option} {folder.path} holds another run ({what}); a new run would replace '
                             'it: continue it with --resume auto, give another --save_folder, or start over with '
                             '--overwrite (removes its files)')
    log(f'--overwrite: removed the earlier run\'s files from {folder.path}: {", ".join(folder.remove_run())}')


def save_checkpoint(folder, model, optimizer, runtime, args, state, world, reason=None):
    """The full checkpoint, by the process that saves; under torchrun it holds every process's
    running epoch loss (a collective: every process calls this at the same step). Refused, one
    line, when the weights have diverged: the last checkpoint is kept. Returns its path."""
    import dataclasses

    from utils import device as devices
    from utils.training import checkpoint, engine

    trouble = engine.weights_diverged(model)  # the same on every process
    if trouble:
        raise UserError(f'{trouble}: a gradient went non-finite. Not saved over {folder.checkpoint}: its last state '
                        'is kept to resume from (with a lower --lr)')
    if state.mid_epoch and world > 1:  # every process's running epoch loss, and their totals
        parts = devices.all_gather_floats([state.loss_sum, state.loss_count], runtime.device)
        loss_sum, loss_count = devices.all_reduce_sum([state.loss_sum, state.loss_count], runtime.device)
        state = dataclasses.replace(state, loss_sum=loss_sum, loss_count=int(loss_count), process_losses=parts)
    if folder.writer:
        checkpoint.save_checkpoint(folder.checkpoint, model, optimizer, runtime, args, state, world)
    if reason:
        engine.log(f'{reason}: checkpoint saved to {folder.checkpoint} (iteration {state.iteration})')
    return folder.checkpoint


def main(args, signals=None):
    """Train as the options say. Returns (state, stop): the TrainState reached, and the name of the
    signal that stopped the run before its end (its checkpoint saved), else None. Raises a UserError
    (one line for the user) for bad input, a damaged checkpoint or a diverged run."""
    import torch

    from layers.modules.multibox_loss import MultiBoxLoss
    from utils import device as devices
    from utils.files.weights import tensor_bytes
    from utils.training import engine
    from utils.training.checkpoint import TrainState, resume
    from utils.training.engine import log
    from utils.training.save_folder import SaveFolder
    from utils.training.stop import StopSignals, stopped_message
    from utils.training.val_ap import format_ap_line

    signals = (signals or StopSignals()).install()  # until training starts, a signal ends the run at once
    folder = net = eval_net = writer = None
    finished = False
    try:
        # -- set-up: the device and its processes, the save folder, data, model, optimizer --------
        rank, world, local_rank = devices.distributed_env()
        runtime = devices.setup_device(args.device, local_rank if world > 1 else args.device_id, args.amp,
                                       args.amp_dtype, args.loss_scale, args.npu_jit_compile, args.combine_ddp)
        devices.init_distributed(runtime.type)
        folder = SaveFolder(args.save_folder, args.dataset, writer=devices.is_main_process(),
                            checkpoint_interval=args.checkpoint_interval)
        resume_from = claim_save_folder(folder, args, runtime, log)
        channels_last = runtime.type == 'cuda' if args.channels_last is None else args.channels_last
        runtime.share_cpu(args.num_workers, world)
        torch.manual_seed(args.seed)
        log(f'Device: {runtime.describe()}' + (f' | {world} processes, batch {args.batch_size} each' if world > 1 else ''))
        for note in runtime.notes:  # what the device set-up chose on its own (e.g. --amp auto without Apex)
            log(note)
        train_loader, val_loader = build_loaders(args, runtime, rank, world)
        per_epoch = train_loader.batch_sampler.batches_per_epoch
        model = build_model(args, log, resuming=bool(resume_from)).to(runtime.device)  # the bare S3FD: its state_dict has the plain names
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = runtime.make_optimizer(model.parameters(), args.lr, args.momentum, args.weight_decay)
        net, optimizer = runtime.initialize(model, optimizer)

        # -- a fresh state, or the checkpoint's (after initialize: Apex reads its scalers only then) --
        state = TrainState()
        if resume_from:
            state = resume(resume_from, model, optimizer, runtime, args, per_epoch, world, log)
        last_good = (resume_from, state.iteration) if resume_from else None  # a checkpoint to go back to

        if args.compile:
            net = torch.compile(net)
        eval_net = net  # validation runs without DDP: processes validate different numbers of batches
        net = runtime.wrap_distributed(net, world)  # DDP under torchrun, unless Apex's combine_ddp exchanges gradients
        criterion = MultiBoxLoss(cfg, args.dataset)
        val_ap = build_val_ap(args, val_loader, log)
        writer = open_tensorboard(args.tensorboard, log)
        log(f'Loading dataset: {len(train_loader.dataset)} training images, '
            f'{len(val_loader.dataset) if val_loader else 0} validation images, {per_epoch} iterations per epoch')
        weights_bytes = tensor_bytes(model.state_dict())
        finite, meter = engine.FiniteCheck(runtime.device), engine.SpeedMeter(args.batch_size * world)

        def save_due(state, iteration):  # inside an epoch: checked after every step
            return any(folder.saves_due(iteration, state.iteration, state.batch_in_epoch == per_epoch))

        def save(state, iteration):
            nonlocal last_good
            weights, full = folder.saves_due(iteration, state.iteration, state.batch_in_epoch == per_epoch)
            if weights:  # the original repository's numbered weights, every cfg.SAVE_INTERVAL iterations
                log('Saving state, iter:', iteration)
                folder.save_weights(model.state_dict(), folder.numbered(iteration))
            if full:  # --checkpoint_interval
                last_good = (save_checkpoint(folder, model, optimizer, runtime, args, state, world,
                                             f'every {args.checkpoint_interval} iterations'), state.iteration)

        # -- the epoch loop --------------------------------------------------------------------------
        start, stop = time.time(), None
        signals.training()
        net.train()
        log(f'Training from epoch {state.epoch}, iteration {state.iteration}: a log block every {cfg.LOG_INTERVAL} '
            'iterations, the first after the first step')
        while state.unvalidated_epoch is not None or (state.epoch < args.epochs and state.iteration < args.max_iter):
            if state.unvalidated_epoch is None:  # (else a stop cut the validation of this trained epoch short)
                first = state.iteration
                folder.check_space(weights_bytes, first, min(first + per_epoch - state.batch_in_epoch, args.max_iter),
                                   state.epoch, with_best=val_loader is not None)
                try:
                    stop = engine.train_one_epoch(net, criterion, optimizer, runtime, train_loader, state, args,
                                                  channels_last, signals, meter, finite, save_due, save, writer)
                except engine.Diverged as diverged:
                    raise stop_diverged(diverged, folder, model, optimizer, runtime, args, state, world, last_good)
                if state.batch_in_epoch < per_epoch:  # a stop signal or --max_iter inside the epoch
                    break
                engine.close_epoch(state, runtime.device)
            epoch = state.unvalidated_epoch
            row = {'epoch': epoch, 'iteration': state.iteration, 'train_loss': state.train_loss, 'val_loss': None,
                   'ap': None, 'ap_seconds': None, 'best_saved': False, 'best_by': args.best_by,
                   'lr': optimizer.param_groups[0]['lr']}
            if val_loader is not None:
                measured = validate(epoch, eval_net, model, criterion, runtime, val_loader, val_ap, args, state,
                                    channels_last, signals)
                if measured is None:  # a stop signal came during the validation
                    stop = signals.received or 'a stop signal to another process'
                    break
                row.update(measured)
            trouble = engine.epoch_diverged(model, row['val_loss'] if val_loader is not None else state.train_loss)
            if trouble:  # never kept: the last good checkpoint and best weights stay
                folder.append_metrics(dict(row, time=time.time(), diverged=trouble))
                raise UserError(f'epoch {epoch} diverged: {trouble}. Not saved over {folder.checkpoint}: '
                                + go_back(last_good, args))
            if val_loader is not None:  # keeping the best
                better_loss, better_ap = state.record_validation(epoch, row['val_loss'], row['ap'])
                if better_ap if args.best_by == 'ap' else better_loss:
                    log('Saving best state,epoch', epoch)
                    folder.save_weights(model.state_dict(), folder.best)
                    row['best_saved'] = True
                if row['ap'] is not None:
                    log(format_ap_line(epoch, row['ap'], len(val_ap.paths), row['ap_seconds']))
                if writer is not None:
                    writer.add_scalar('val/loss', row['val_loss'], state.iteration)
                    for setting, ap in (row['ap'] or {}).items():
                        writer.add_scalar(f'val/ap_{setting}', ap, state.iteration)
            state.unvalidated_epoch = None
            folder.append_metrics(dict(row, time=time.time()))
            last_good = (save_checkpoint(folder, model, optimizer, runtime, args, state, world), state.iteration)
            if signals.requested_now(runtime.device):  # every process stops
                stop = signals.received or 'a stop signal to another process'
                log(f'{stop}: checkpoint saved to {folder.checkpoint}')
                break

        # -- the end: a checkpoint of an unfinished epoch, the last line ------------------------------
        if state.mid_epoch:
            save_checkpoint(folder, model, optimizer, runtime, args, state, world,
                            reason='stop requested' if stop else f'reached --max_iter {args.max_iter}')
        elif state.unvalidated_epoch is not None:
            save_checkpoint(folder, model, optimizer, runtime, args, state, world,
                            reason=f'{stop} during validation: epoch {state.unvalidated_epoch} is trained, a resume '
                                   'validates it first')
        if stop:
            log(stopped_message(state.iteration, folder.checkpoint, stop))
        elif state.best_loss_epoch is None:  # no validation ran: say so, and what the folder holds
            why = (f'--max_iter {args.max_iter} ended the run inside epoch {state.epoch}' if state.mid_epoch
                   else f'{args.val_file} is missing or lists no image')
            log(f'Finished: iteration {state.iteration}, epoch {state.epoch}, {time.time() - start:.1f}s; no validation '
                f'ran ({why}), so there is no {os.path.basename(folder.best)}: {folder.path} holds '
                f'{", ".join(folder.run_files()) or "nothing of this run"}')
        else:
            best_ap = f', best val AP {state.best_ap:.4f} (epoch {state.best_ap_epoch})' if state.best_ap is not None else ''
            log(f'Finished: iteration {state.iteration}, epoch {state.epoch}, best validation loss '
                f'{state.best_loss:.4f}{best_ap}, {time.time() - start:.1f}s; weights in {args.save_folder}')
        finished = True
    finally:
        signals.close()
        if writer is not None:
            writer.close()
        net = eval_net = None  # DDP's reducer holds the process group: let it go first (see cleanup_distributed)
        devices.cleanup_distributed(synchronize=finished)
        if folder is not None:
            folder.release()
    return state, stop


def validate(epoch, net, model, criterion, runtime, loader, val_ap, args, state, channels_last, signals):
    """The validation loss of the trained `epoch` and, when due, its WIDER AP (every
    --val_ap_interval epochs and the last), with the original log lines. Returns {'val_loss',
    'ap', 'ap_seconds'}, or None when a stop signal cut it short. `net` runs the loss (not
    DDP-wrapped), `model` is the bare S3FD the AP test runs."""
    from utils.training import engine

    start = time.time()
    val_loss = engine.validation_loss(net, criterion, runtime, loader, channels_last, signals)
    if val_loss is None:
        return None
    seconds, aps, ap_seconds = time.time() - start, None, None
    if val_ap is not None and ((epoch + 1) % args.val_ap_interval == 0 or epoch + 1 >= args.epochs
                               or state.iteration >= args.max_iter):
        aps = val_ap.evaluate(model, runtime, args.num_workers, should_stop=lambda: signals.received)
        if aps is None:
            return None
        ap_seconds = time.time() - start - seconds
    engine.log('Timer: %.4f' % seconds)
    engine.log('test epoch:' + repr(epoch) + ' || Loss:%.4f' % val_loss)
    return {'val_loss': val_loss, 'ap': aps, 'ap_seconds': ap_seconds}


def stop_diverged(diverged, folder, model, optimizer, runtime, args, state, world, last_good):
    """The error that ends a run after MAX_NONFINITE_IN_A_ROW skipped steps in a row. Its state is
    saved when its weights are sound (e.g. fp16 overflows at a fixed loss scale), so that a resume
    can continue from it; otherwise the last checkpoint stays and the message names it."""
    from utils.training import engine

    trouble = engine.weights_diverged(model)
    if trouble is None:
        path = save_checkpoint(folder, model, optimizer, runtime, args, state, world,
                               reason=f'stopped after {engine.MAX_NONFINITE_IN_A_ROW} skipped steps in a row')
        return UserError(f'{diverged}: check the data and lower --lr (state saved to {path})')
    return UserError(f'{diverged}; {trouble}. Not saved over {folder.checkpoint}: ' + go_back(last_good, args))


def go_back(last_good, args):
    """What to resume after a divergence: the last checkpoint this run saved or resumed from."""
    if last_good is None:
        return 'no checkpoint of this run was saved: start again with a lower --lr'
    path, iteration = last_good
    return f'resume {path} (iteration {iteration}) with a lower --lr, e.g. --resume {path} --lr {args.lr / 10:g}'


def cli(argv=None):
    """Command-line entry; returns the exit status (utils/training/stop.py): 0 when the run reached
    its end; 75 when a stop signal ended it early, its checkpoint saved, or during start-up, with
    nothing new to save (a scheduler requeues it); 2 with one line `train.py: error: ...`."""
    from utils.training.stop import EXIT_STOPPED, StopSignals  # light: no PyTorch

    signals = StopSignals('train.py').install()  # before PyTorch loads: a Ctrl-C in the first seconds is one line too
    args = parse_args(argv)
    if args.demo:
        import quickstart
        return quickstart.cli(argv, signals)
    outcome = {}
    status = run_cli(lambda a: outcome.update(zip(('state', 'stop'), main(a, signals))), lambda _: args,
                     prog='train.py', status=2)
    return EXIT_STOPPED if status == 0 and outcome.get('stop') else status


if __name__ == '__main__':
    sys.exit(cli())
