"""Benchmark single-scale S3FD inference: images/s and per-image latency, post-processing included.

    python benchmarks/bench_infer.py [--device cpu|gpu|npu] [--device_id N] [--model weights/sfd_face.pth]
        [--width 640 --height 480] [--batch_sizes 1,16] [--iters N] [--warmup N]
        [--amp off|bf16|fp16] [--channels_last] [--compile [--compile_mode reduce-overhead]]
        [--nms_mode auto|prefix|full]
        [--threads N] [--image PATH]

Each timed step is what wider_test.py does per batch once the images are decoded and resized,
``utils.inference.detector.Detector.detect_resized``: uint8 images -> device, mean subtraction, the
test-phase network with Detect (softmax, threshold 0.05, top 5000, NMS 0.3, top 750), and the
conversion to pixel boxes on the host (whose copy to the host waits for the device). The image is the real WIDER val image of ../shared resized to WIDTHxHEIGHT (a
synthetic scene when it is absent) repeated across the batch. Without --model the weights
are random (from-scratch initialisation): every prior then scores near 0.5, so Detect runs
NMS on the full 5,000 candidates - the worst case of the post-processing.

Prints one JSON object: per batch size the median and 90th-percentile batch latency, the
per-image latency (batch latency / batch size) and images/s (batch size / median latency).
"""
import argparse
import json
import os
import statistics
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from data.config import MODEL_VARIANTS  # noqa: E402

REAL_IMAGE = os.path.join(os.path.dirname(REPO), 'shared', 'widerface', 'WIDER_val', 'images', '0--Parade',
                          '0_Parade_marchingband_1_465.jpg')
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description='S3FD single-scale inference benchmark (one JSON object).')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'gpu', 'npu'))
    parser.add_argument('--device_id', type=int, default=0)
    parser.add_argument('--model', default=None, help='weights to load (default: random initialisation)')
    parser.add_argument('--variant', default=None, choices=MODEL_VARIANTS)
    parser.add_argument('--image', default=None,
                        help=f'image to resize and repeat (default {REAL_IMAGE}, else a synthetic scene)')
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--batch_sizes', default='1,16', help='comma-separated batch sizes (default 1,16)')
    parser.add_argument('--iters', type=int, default=None, help='timed steps per batch size (default: 3 on '
                        'cpu, 30 on an accelerator)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps first (default: 1 on cpu, 5 '
                        'on an accelerator; 3 more with --compile)')
    parser.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'), help='autocast precision')
    parser.add_argument('--channels_last', action='store_true', help='channels-last model (the input always is)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the network')
    parser.add_argument('--compile_mode', default=None,
                        choices=('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
                        help="torch.compile mode (implies --compile); 'reduce-overhead' replays the network "
                             'as CUDA graphs')
    parser.add_argument('--nms_mode', default='auto', choices=('auto', 'prefix', 'full'),
                        help="Detect's NMS mode (auto: prefix on cpu, full on accelerators)")
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads on cpu')
    args = parser.parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(',') if b.strip()]
    except ValueError:
        parser.error(f'--batch_sizes must be integers separated by commas, not {args.batch_sizes!r}')
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error('--batch_sizes needs positive integers')
    return args


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.config import cfg  # noqa: E402
from s3fd import build_s3fd, init_weights_from_scratch  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.files.weights import load_model  # noqa: E402
from utils.files.image_io import load_rgb  # noqa: E402
from utils.inference.detector import Detector, inference_device  # noqa: E402


def bench_image(path, width, height):
    """RGB uint8 [height, width, 3] and a description of where it came from."""
    if path or os.path.isfile(REAL_IMAGE):
        path = path or REAL_IMAGE
        rgb = load_rgb(path)
        source = os.path.relpath(path, REPO) if path == REAL_IMAGE else path
    else:
        from data.synthetic import render_image
        bgr, _ = render_image(0, 'val', 0, crowd_prob=1.0)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        source = 'synthetic scene (data.synthetic.render_image)'
    original = f'{rgb.shape[1]}x{rgb.shape[0]}'
    if rgb.shape[:2] != (height, width):
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    return rgb, f'{source} ({original}, resized to {width}x{height})'


def build_network(args, device):
    if args.model:
        net = load_model(args.model, 'test', device, args.variant)
        weights = args.model
    else:
        torch.manual_seed(0)
        net = build_s3fd('test', variant=args.variant)
        init_weights_from_scratch(net)
        net.to(device).eval()
        weights = 'random (from-scratch initialisation)'
    net.detect.nms_mode = None if args.nms_mode == 'auto' else args.nms_mode
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args.compile:
        net = torch.compile(net, mode=args.compile_mode)
    return net, weights


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = inference_device(args.device, args.device_id, args.amp, fixed_size=True)
    on_cpu = runtime.type == 'cpu'
    iters = args.iters or (3 if on_cpu else 30)
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 5) + (3 if args.compile else 0)
    rgb, source = bench_image(args.image, args.width, args.height)
    net, weights = build_network(args, runtime.device)
    detector = Detector(net, runtime.device, thresh=cfg.CONF_THRESH, autocast=runtime.autocast)

    results = {}
    for batch_size in args.batch_sizes:
        images = [rgb] * batch_size
        for _ in range(warmup):
            detector.detect_resized(images, 1.0)
        times, boxes = [], 0
        for _ in range(iters):
            runtime.synchronize()
            start = time.perf_counter()
            dets = detector.detect_resized(images, 1.0)
            times.append(time.perf_counter() - start)
            boxes = sum(len(d) for d in dets) / batch_size
        median = statistics.median(times)
        p90 = float(np.percentile(times, 90))
        results[str(batch_size)] = {
            'images_per_s': round(batch_size / median, 3),
            'ms_per_image': round(1000 * median / batch_size, 2),
            'batch_latency_ms_median': round(1000 * median, 2),
            'batch_latency_ms_p90': round(1000 * p90, 2),
            'boxes_per_image': round(boxes, 1),
            'iters': iters,
        }
    report = {
        'benchmark': 'S3FD single-scale inference (to pixel boxes)',
        'device': str(runtime.device),
        'device_name': torch.cuda.get_device_name(runtime.device) if runtime.type == 'cuda' else None,
        'precision': runtime.describe().split('| ')[-1],
        'channels_last': args.channels_last, 'compile': args.compile, 'compile_mode': args.compile_mode,
        'nms_mode': args.nms_mode,
        'threads': torch.get_num_threads() if on_cpu else None,
        'input': f'{args.width}x{args.height}', 'image': source, 'weights': weights,
        'warmup': warmup, 'torch': torch.__version__,
        'results': results,
    }
    print(json.dumps(report))
    return report


if __name__ == '__main__':
    sys.exit(run_cli(main, parse_args, prog='bench_infer.py'))
