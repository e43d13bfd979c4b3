"""Training-step throughput of S3FD: forward, loss with matching, backward, SGD update.

    python benchmarks/bench_train.py --device gpu --batch_size 16 --input_size 640 --amp native
    python benchmarks/bench_train.py --device gpu --data loader --num_workers 16 --channels_last --compile
    python benchmarks/bench_train.py --device cpu --batch_size 2 --input_size 320 --steps 3

--data synthetic: batches made once and kept on the device (the model's speed alone);
--data loader: the real DataLoader over synthetic WIDER JPEGs with the training augmentation
(the whole pipeline; the few generated images are listed again up to --epoch_size entries,
as many as WIDER train, since the workers' refill at every epoch start would otherwise
dominate). Prints one JSON object: images_per_s, step_time_s, peak_mem_gb, peak_fraction
(achieved FLOP/s over the device's dense peak at that precision; null when the device is not
in the table) and valid (false when a step had a non-finite loss and skipped its update).
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import add_step_arguments, device_spec  # noqa: E402
from utils.cli import HelpFormatter, loss_scale  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_step_arguments(p, amp_choices=('auto', 'apex', 'native', 'off'), amp_default='auto')
    p.add_argument('--loss_scale', default=32.0, type=loss_scale, help="NPU fp16: a static scale or 'dynamic'")
    p.add_argument('--channels_last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the network (not the data path)')
    p.add_argument('--sgd', default='default', choices=['default', 'foreach', 'fused'],
                   help="PyTorch SGD kernel ('default': foreach on CUDA)")
    p.add_argument('--lr', default=1e-3, type=float,
                   help="SGD learning rate (train.py's default; from scratch at 640 it can diverge, see valid)")
    p.add_argument('--steps', default=20, type=int, help='timed steps')
    p.add_argument('--warmup', default=5, type=int, help='untimed steps first')
    p.add_argument('--data', default='synthetic', choices=['synthetic', 'loader'])
    p.add_argument('--num_workers', default=8, type=int, help='loader workers (--data loader)')
    p.add_argument('--images', default=256, type=int, help='synthetic WIDER images (--data loader)')
    p.add_argument('--epoch_size', default=12880, type=int,
                   help='list entries per epoch (--data loader): the images are listed again until the list '
                        'is this long (default: WIDER train), so that the refill of the workers at every epoch '
                        'start weighs what it weighs on WIDER')
    p.add_argument('--data_dir', default=None, help='reuse/keep the synthetic WIDER here (--data loader)')
    return p.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import torch  # noqa: E402

from data.config import cfg  # noqa: E402
from layers.modules.multibox_loss import MultiBoxLoss  # noqa: E402
from s3fd import build_s3fd, init_weights_from_scratch  # noqa: E402
from benchmarks.bench_layers import random_faces  # noqa: E402
from utils.training.engine import FiniteCheck, training_step  # noqa: E402
from utils import device as devices  # noqa: E402
from utils.files.fileio import atomic_write_text  # noqa: E402

def train_flops_per_image(input_size):
    """Multiply-adds of every convolution at this input size, x2 for FLOPs, x3 for
    forward + backward (gradients w.r.t. inputs and weights)."""
    net = build_s3fd('train')
    macs = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        macs.append(output.numel() * k)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, input_size, input_size))
    for h in handles:
        h.remove()
    return 3 * 2 * sum(macs)


def prepare_training(net, runtime, lr, channels_last=False, compile_net=False, sgd_impl=None, compile_mode=None):
    """`net` on runtime's device (channels-last, compiled on request) with its SGD (train.py's
    momentum and weight decay), loss and finiteness check: (net, optimizer, criterion, finite)."""
    net = net.to(runtime.device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = runtime.make_optimizer(net.parameters(), lr, 0.9, 5e-4, sgd_impl)
    net, optimizer = runtime.initialize(net, optimizer)
    if compile_net:
        net = torch.compile(net, mode=compile_mode)
    return net, optimizer, MultiBoxLoss(cfg), FiniteCheck(runtime.device)


def device_peak(runtime, precision):
    if runtime.type != 'cuda':
        return None
    return (device_spec(torch.cuda.get_device_name(runtime.device)) or {}).get(precision)


def synthetic_batches(args, count, gen):
    """Smooth random images (pixel-like scale, mean subtracted) with 1-40 faces of 8-300 px
    each; targets stay on the host as the loader delivers them."""
    batches = []
    for _ in range(count):
        coarse = torch.randn(args.batch_size, 3, max(1, args.input_size // 16), max(1, args.input_size // 16),
                             generator=gen)
        images = torch.nn.functional.interpolate(coarse, size=(args.input_size, args.input_size),
                                                 mode='bilinear', align_corners=False) * 60
        targets = [random_faces(gen, n, args.input_size)
                   for n in torch.randint(1, 41, (args.batch_size,), generator=gen).tolist()]
        batches.append((images, targets))
    return batches


def loader_batches(args, runtime):
    from data.factory import EpochBatchSampler, make_loader
    from data.synthetic import generate
    from data.widerface import WIDERDetection
    from data.widerface import annotation_path, image_root
    from prepare_wider_data import convert_split

    base = args.data_dir or os.path.join(tempfile.gettempdir(), 's3fd_bench_wider')
    root = os.path.join(base, f'train{args.images}')  # one folder per image count: reused, never clashing
    generate(root, args.images, 0, seed=0)
    lines, _ = convert_split(annotation_path(root, 'train'), image_root(root, 'train'))
    repeats = max(1, -(-args.epoch_size // max(1, len(lines))))
    list_file = os.path.join(base, f'face_train{args.images}_x{repeats}.txt')
    atomic_write_text(list_file, '\n'.join(lines * repeats) + '\n')
    dataset = WIDERDetection(list_file, 'train', input_size=args.input_size,
                             normalize=False)  # as train.py: uint8 to the device
    sampler = EpochBatchSampler(len(dataset), args.batch_size, seed=0)
    loader = make_loader(dataset, sampler, args.num_workers, pin_memory=runtime.pin_memory)

    def forever():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    return forever()


def main(args):
    try:
        runtime = devices.setup_device(args.device, args.device_id, args.amp, args.amp_dtype, args.loss_scale)
    except devices.DeviceUnavailable as e:
        sys.exit(f'bench_train.py: error: {e}')
    if args.data == 'loader':
        runtime.share_cpu(args.num_workers)
    torch.manual_seed(0)
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    net, optimizer, criterion, finite = prepare_training(net, runtime, args.lr, args.channels_last, args.compile,
                                                         None if args.sgd == 'default' else args.sgd)

    if args.data == 'synthetic':
        made = synthetic_batches(args, 4, torch.Generator().manual_seed(0))
        made = [(images.to(runtime.device), targets) for images, targets in made]
        source = (made[i % len(made)] for i in range(10 ** 9))
    else:
        source = loader_batches(args, runtime)

    def run(steps):
        losses, skipped = [], 0
        wait = 0.0
        for _ in range(steps):
            t = time.perf_counter()
            images, targets = next(source)
            wait += time.perf_counter() - t
            loss, _, _, stepped = training_step(net, criterion, optimizer, runtime, finite, images, targets,
                                                args.channels_last)
            losses.append(loss)
            skipped += not stepped
        return losses, wait, skipped

    _, _, skipped_warmup = run(args.warmup)
    runtime.synchronize()
    if runtime.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(runtime.device)
    start = time.perf_counter()
    losses, wait, skipped = run(args.steps)
    runtime.synchronize()
    elapsed = time.perf_counter() - start

    step_time = elapsed / args.steps
    images_per_s = args.batch_size / step_time
    precision = 'fp32' if runtime.amp == 'off' else ('fp16' if runtime.amp == 'apex' else
                                                 str(runtime.amp_dtype).replace('torch.bfloat', 'bf').replace('torch.float', 'fp'))
    flops = train_flops_per_image(args.input_size)
    peak = device_peak(runtime, precision)
    print(json.dumps({
        'device': runtime.describe(), 'device_name': torch.cuda.get_device_name(runtime.device) if runtime.type == 'cuda' else runtime.type,
        'batch_size': args.batch_size, 'input_size': args.input_size, 'precision': precision,
        'channels_last': args.channels_last, 'compile': args.compile, 'sgd': args.sgd, 'data': args.data,
        'num_workers': args.num_workers if args.data == 'loader' else None,
        'steps': args.steps, 'step_time_s': round(step_time, 4), 'images_per_s': round(images_per_s, 2),
        'data_wait_s_per_step': round(wait / args.steps, 4),
        'train_tflop_per_image': round(flops / 1e12, 4),
        'achieved_tflops': round(flops * images_per_s / 1e12, 2),
        'peak_tflops': peak,
        'peak_fraction': round(flops * images_per_s / 1e12 / peak, 4) if peak else None,
        'peak_mem_gb': round(runtime.max_memory_gb(), 2) if runtime.max_memory_gb() is not None else None,
        'lr': args.lr, 'final_loss': round(float(losses[-1]), 4),
        # A step whose loss is not finite skips the update (and its cost): such a run's speed
        # is not a training speed.
        'nonfinite_steps': skipped_warmup + skipped,
        'valid': skipped_warmup + skipped == 0,
    }))


if __name__ == '__main__':
    main(parse_args())
