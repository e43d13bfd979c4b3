"""Data-pipeline throughput on one CPU core: decode + augmentation + to-tensor of WIDERDetection.

    python benchmarks/bench_data.py [--num 300] [--synthetic 40] [--wider_dir ../shared/widerface]

Prints one JSON object: training-mode samples per second on the real WIDER val image of
`--wider_dir` (listed `--num` times, so every sample draws its own augmentation), on a
synthetic WIDER made by data/synthetic.py (when available), plus validation-mode speed and
the decode time alone. The target is >= 120 training samples/s on the real image.

It measures the path train.py (and benchmarks/bench_train.py) trains with: WIDERDetection with
`normalize=False`, i.e. uint8 [3, S, S] samples whose mean is subtracted later, on the device
(the JSON's "sample" field says so). The float32 `to_tensor` path (normalize=True) is not timed.
"""
import argparse
import json
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description='Benchmark the WIDER FACE data pipeline on one core.')
    parser.add_argument('--wider_dir', default=os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'widerface'),
                        help='folder holding the real val annotation file and image (default: %(default)s)')
    parser.add_argument('--num', type=int, default=300, help='timed training samples per dataset')
    parser.add_argument('--synthetic', type=int, default=40,
                        help='synthetic training images to generate (0: skip the synthetic run)')
    parser.add_argument('--input_size', type=int, default=640)
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import cv2  # noqa: E402
import torch  # noqa: E402

from data.widerface import WIDERDetection  # noqa: E402
from data.widerface import annotation_path, image_root  # noqa: E402
from prepare_wider_data import convert_split, write_atomic  # noqa: E402
from utils.files.image_io import load_rgb  # noqa: E402

REAL_NAME = '0--Parade/0_Parade_marchingband_1_465.jpg'
TARGET = 120.0
NORMALIZE = False  # as train.py: uint8 samples, the mean subtracted on the device


def _time_samples(dataset, indices):
    dataset[indices[0]]  # warm-up (allocations, caches)
    start = time.perf_counter()
    faces = 0
    for index in indices:
        _, target = dataset[index]
        faces += len(target)
    seconds = time.perf_counter() - start
    return {'samples': len(indices), 'seconds': round(seconds, 3),
            'samples_per_s': round(len(indices) / seconds, 1),
            'ms_per_sample': round(1000 * seconds / len(indices), 2),
            'mean_faces_per_sample': round(faces / len(indices), 2)}


def bench_real(args, tmp):
    ann_file = annotation_path(args.wider_dir, 'val')
    images_dir = image_root(os.path.abspath(args.wider_dir), 'val')
    image = os.path.join(images_dir, REAL_NAME)
    if not (os.path.isfile(ann_file) and os.path.isfile(image)):
        return {'skipped': f'real WIDER files not found under {args.wider_dir}'}
    # The image's line exactly as prepare_wider_data.py writes it, listed --num times.
    lines, _ = convert_split(ann_file, images_dir)
    line = next(text for text in lines if text.startswith(image + ' '))
    list_file = os.path.join(tmp, 'real.txt')
    write_atomic(list_file, [line] * args.num)
    train = WIDERDetection(list_file, 'train', input_size=args.input_size, seed=args.seed, normalize=NORMALIZE)
    val = WIDERDetection(list_file, 'val', input_size=args.input_size, normalize=NORMALIZE)
    result = {'image': image, 'size': list(load_rgb(image).shape[1::-1]), 'faces': len(train.pull_anno(0))}
    result['train'] = _time_samples(train, [(0, i) for i in range(args.num)])
    result['val'] = _time_samples(val, list(range(min(args.num, 100))))
    start = time.perf_counter()
    for _ in range(50):
        load_rgb(image)
    result['decode_ms'] = round(1000 * (time.perf_counter() - start) / 50, 2)
    return result


def bench_synthetic(args, tmp):
    if args.synthetic <= 0:
        return {'skipped': '--synthetic 0'}
    try:
        from data.synthetic import generate
    except ImportError as exc:
        return {'skipped': f'data/synthetic.py not available ({exc})'}
    root = os.path.join(tmp, 'synthetic')
    generate(root, args.synthetic, 0, seed=args.seed)
    lines, stats = convert_split(annotation_path(root, 'train'), image_root(root, 'train'))
    list_file = os.path.join(tmp, 'synthetic.txt')
    write_atomic(list_file, lines)
    train = WIDERDetection(list_file, 'train', input_size=args.input_size, seed=args.seed, normalize=NORMALIZE)
    indices = [(0, i % len(train)) for i in range(args.num)]
    return {'images': len(train), 'faces': stats['faces'], 'train': _time_samples(train, indices)}


def main(args):
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        report = {'threads': 1, 'input_size': args.input_size, 'target_samples_per_s': TARGET,
                  'sample': 'uint8 [3, S, S], normalize=False (as train.py)',
                  'real': bench_real(args, tmp), 'synthetic': bench_synthetic(args, tmp)}
    real_train = report['real'].get('train')
    if real_train:
        report['meets_target'] = real_train['samples_per_s'] >= TARGET
    print(json.dumps(report))
    return report


if __name__ == '__main__':
    main(parse_args())
