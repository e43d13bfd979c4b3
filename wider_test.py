"""Run S3FD over a WIDER FACE split and write the predictions in the official layout.

    python wider_test.py --model weights/sfd_face.pth --dataset_dir DIR [--split val]
        [--out eval_output/s3fd_val_single] [--mode single|multiscale] [--device cpu|gpu|npu]
        [--device_id N] [--batch_size N] [--workers N] [--max_size N] [--thresh 0.05]
        [--variant reference|caffe] [--amp off|bf16|fp16] [--num_images N] [--eval GT_DIR]

Images
    ``DIR/WIDER_<split>/images/<event>/<name>.jpg``, listed by the first of these that exists:
    ``DIR/wider_face_split/wider_face_<split>_bbx_gt.txt`` (the official annotation file),
    ``DIR/wider_face_split/wider_face_<split>_filelist.txt`` (one path per line, the test split),
    ``DIR/wider_face_split/wider_face_<split>.mat``, ``DIR/eval_tools/ground_truth/wider_face_<split>.mat``.

Output
    ``OUT/<event>/<name>.txt``: line 1 the image file name, line 2 the number of boxes, then one
    ``x y w h score`` line per box (pixels, sorted by score). Boxes are clipped to the image;
    ``w = x2 - x1``: the network is trained on boxes ``[x, x + w]`` built from the annotations,
    so its ``x2 - x1`` estimates the annotated ``w`` itself, and the official tools then add the
    same ``+1`` to predictions and faces. (The reference port wrote ``x2 - x1 + 1``, which makes
    every prediction one pixel wider and taller than the face it found: a 10 px face detected
    exactly then scores IoU 0.84 instead of 1.)

Modes
    ``single``: one pass at ``min(1, sqrt(1700 * 1200 / (h * w)))``; same-size images are
    batched (``--batch_size``), which gives the same boxes as one image at a time.
    ``multiscale``: the S3FD test (original + mirror, a shrunk and enlarged passes, box
    voting; see utils/inference.py), one image at a time.
    ``--max_size N`` caps the longer side of every pass (a deviation for quick runs; the
    official rule alone is the default).

An image that cannot be decoded is skipped, reported at the end, and gets no prediction
file (a stale one from an earlier run is removed), so its faces count as missed.
``--eval GT_DIR`` scores the predictions with the official protocol (wider_eval.py); with
``--num_images`` only the images run are scored.
"""
import argparse
import os
import sys
import time

import cv2
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.config import cfg
from data.widerface import AnnotationError, annotation_path, image_root, read_text_lines, read_wider_annotations
from s3fd import VARIANTS
from tools._common import at_least, run_cli
from utils.checkpoint import load_model
from utils.fileio import DiskFullError, make_output_dir
from utils.image_io import ImageReadError, load_rgb
from utils.inference import (MIN_INPUT_SIDE, Detector, inference_device, resize_rgb, single_scale,
                             to_wider_rows)
from utils.widerface_eval import (WiderEvalError, evaluate, list_split_images,
                                  load_ground_truth, write_prediction_file)

SPLITS = ('train', 'val', 'test')


class WiderTestError(RuntimeError):
    """Bad input of wider_test.py (dataset layout, arguments); the message is one line."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='S3FD detections on a WIDER FACE split, in the official '
                                                 'prediction layout.')
    parser.add_argument('--model', default='weights/sfd_face.pth',
                        help='weights: a state_dict or a training checkpoint (default weights/sfd_face.pth)')
    parser.add_argument('--dataset_dir', default=cfg.FACE.WIDER_DIR,
                        help=f'WIDER FACE root holding WIDER_<split>/images and wider_face_split '
                             f'(default cfg.FACE.WIDER_DIR = {cfg.FACE.WIDER_DIR})')
    parser.add_argument('--split', default='val', choices=SPLITS)
    parser.add_argument('--out', default=None,
                        help='prediction directory (default eval_output/s3fd_<split>_<mode>, with '
                             '_first<N> added under --num_images N)')
    parser.add_argument('--mode', default='single', choices=('single', 'multiscale'),
                        help='single: one pass (1700x1200 budget); multiscale: the S3FD test with flip, '
                             'shrunk/enlarged passes and box voting')
    parser.add_argument('--device', default='gpu' if torch.cuda.is_available() else 'cpu',
                        choices=('cpu', 'gpu', 'npu'))
    parser.add_argument('--device_id', type=int, default=0)
    parser.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'),
                        help='autocast the network in this precision (default off: float32)')
    parser.add_argument('--batch_size', type=at_least(1), default=1,
                        help='single mode: images of the same input size run together (default 1)')
    parser.add_argument('--workers', type=at_least(0), default=2,
                        help='image decoding processes (0: in the main one; default 2)')
    parser.add_argument('--max_size', type=at_least(MIN_INPUT_SIDE), default=None,
                        help='cap the longer input side of every pass at N px (quick runs; default: '
                             'only the official H*W <= 1700*1200 rule)')
    parser.add_argument('--thresh', type=float, default=cfg.CONF_THRESH,
                        help=f'keep detections with score >= this (default {cfg.CONF_THRESH})')
    parser.add_argument('--variant', default=None, choices=VARIANTS,
                        help='network variant (default: from the checkpoint, else cfg.MODEL_VARIANT)')
    parser.add_argument('--num_images', type=at_least(1), default=None,
                        help='only the first N images of the list (a quick subset)')
    parser.add_argument('--eval', metavar='GT_DIR', default=None,
                        help='then score the predictions against the official ground truth in GT_DIR')
    args = parser.parse_args(argv)
    if args.out is None:  # a quick subset run never replaces a whole split's predictions
        subset = f'_first{args.num_images}' if args.num_images else ''
        args.out = os.path.join('eval_output', f's3fd_{args.split}_{args.mode}{subset}')
    return args


# ----------------------------------------------------------------------------- image list

def _list_from_annotations(path):
    try:
        return [r.name for r in read_wider_annotations(path)]
    except AnnotationError as exc:
        raise WiderTestError(str(exc)) from None


def _list_from_filelist(path):
    try:
        return [line.strip() for line in read_text_lines(path) if line.strip()]
    except AnnotationError as exc:
        raise WiderTestError(str(exc)) from None


def _list_from_mat(path):
    try:
        return [f'{event}/{name}.jpg' for event, name in list_split_images(path)]
    except WiderEvalError as exc:
        raise WiderTestError(str(exc)) from None


def image_list(dataset_dir, split):
    """The images of a split.

    Returns ``(items, source)``: items a list of ``(event, name, path)`` with ``name`` the file
    name without extension (the evaluation key is ``(event, name)``) and ``path`` the image
    file; ``source`` the list file used. Raises WiderTestError when the split is absent.
    """
    if not os.path.isdir(dataset_dir):
        raise WiderTestError(f'dataset directory {dataset_dir} does not exist')
    split_dir = os.path.join(dataset_dir, 'wider_face_split')
    candidates = [
        (annotation_path(dataset_dir, split), _list_from_annotations),
        (os.path.join(split_dir, f'wider_face_{split}_filelist.txt'), _list_from_filelist),
        (os.path.join(split_dir, f'wider_face_{split}.mat'), _list_from_mat),
        (os.path.join(dataset_dir, 'eval_tools', 'ground_truth', f'wider_face_{split}.mat'), _list_from_mat),
    ]
    for path, reader in candidates:
        if os.path.isfile(path):
            names = reader(path)
            break
    else:
        raise WiderTestError(f'{dataset_dir}: no image list for split {split!r} (looked for '
                             f'{", ".join(os.path.relpath(p, dataset_dir) for p, _ in candidates)})')
    images_dir = image_root(dataset_dir, split)
    if not os.path.isdir(images_dir):
        raise WiderTestError(f'{images_dir}: no such directory (the images of split {split!r}; '
                             f'list read from {path})')
    if not names:
        raise WiderTestError(f'{path}: lists no image')
    items = []
    for rel in names:
        rel = rel.replace('\\', '/').strip('/')
        event = rel.split('/', 1)[0] if '/' in rel else ''
        name = os.path.splitext(os.path.basename(rel))[0]
        items.append((event, name, os.path.join(images_dir, *rel.split('/'))))
    return items, path


def prediction_path(out_dir, event, name):
    """Where the prediction file of image `name` of `event` goes (the official layout)."""
    return os.path.join(out_dir, event, name + '.txt')


def remove_predictions(out_dir, items):
    """Delete the prediction files of `items` already in `out_dir` (an earlier or interrupted
    run); returns how many. Only the files this split's images would get are touched, so
    that a folder never mixes two runs' predictions and nothing else in it is deleted."""
    removed = 0
    for event, name, _ in items:
        try:
            os.remove(prediction_path(out_dir, event, name))
        except FileNotFoundError:
            continue
        removed += 1
    return removed


# ----------------------------------------------------------------------------- loading

class _Images(Dataset):
    """Decodes (and in single mode resizes) the images; errors come back as messages."""

    def __init__(self, items, resize, max_size):
        self.items = items
        self.resize = resize
        self.max_size = max_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path = self.items[index][2]
        try:
            rgb = load_rgb(path)
        except ImageReadError as exc:
            return index, None, None, str(exc)
        hw = rgb.shape[:2]
        if self.resize:
            rgb = resize_rgb(rgb, single_scale(*hw, max_size=self.max_size))
        return index, rgb, hw, None


def _as_is(sample):
    return sample


# ----------------------------------------------------------------------------- main

def run(detector, items, args):
    """Detect every image and write its prediction file; returns the skip messages."""
    single = args.mode == 'single'
    if args.workers > 0:
        # The worker processes decode in parallel already; a forked worker whose parent used
        # OpenCV's thread pool can deadlock inside OpenCV, so the parent runs it single-threaded.
        cv2.setNumThreads(1)
    loader = DataLoader(_Images(items, single, args.max_size), batch_size=None, shuffle=False,
                        num_workers=args.workers, collate_fn=_as_is)
    skipped = []
    pending = {}  # input size -> [(index, resized image, original hw)], oldest size first
    max_pending = 4 * args.batch_size
    bar = tqdm(total=len(items), unit='img', desc=f'{args.split} ({args.mode})', file=sys.stderr,
               dynamic_ncols=True)

    written = [0]

    def write(index, dets, hw):
        event, name, path = items[index]
        try:
            write_prediction_file(prediction_path(args.out, event, name), os.path.basename(path),
                                  to_wider_rows(dets, *hw))
        except DiskFullError as exc:
            bar.close()
            raise DiskFullError(f'{exc}; stopped after {written[0]} of {len(items)} prediction files: '
                                f'free some space (or give another --out) and run again',
                                exc.path, exc.needed, exc.free) from None
        written[0] += 1
        bar.update(1)

    def flush(key):
        group = pending.pop(key)
        dets = detector.detect_resized([g[1] for g in group], [g[2] for g in group])
        for (index, _, hw), d in zip(group, dets):
            write(index, d, hw)

    for index, rgb, hw, error in loader:
        if error is not None:
            skipped.append(error)
            bar.write(f'skipped: {error}', file=sys.stderr)
            bar.update(1)
            continue
        if not single:
            write(index, detector.multi_scale_detect(rgb), hw)
            continue
        key = rgb.shape
        pending.setdefault(key, []).append((index, rgb, hw))
        if len(pending[key]) >= args.batch_size:
            flush(key)
        elif sum(len(g) for g in pending.values()) >= max_pending:
            flush(next(iter(pending)))
    while pending:
        flush(next(iter(pending)))
    bar.close()
    return skipped


def main(args):
    """Run the test; returns ``{'easy', 'medium', 'hard'}`` APs with --eval, else None.

    Raises WiderTestError, CheckpointError, DeviceUnavailable or WiderEvalError (one-line
    messages) for bad input.
    """
    items, source = image_list(args.dataset_dir, args.split)
    split_items = items
    if args.num_images is not None:
        items = items[:args.num_images]
    gt = load_ground_truth(args.eval) if args.eval else None   # fail before the long run
    make_output_dir(args.out, '--out')
    ctx = inference_device(args.device, args.device_id, args.amp)
    net = load_model(args.model, 'test', ctx.device, args.variant)
    detector = Detector(net, ctx.device, thresh=args.thresh, max_size=args.max_size, autocast=ctx.autocast)
    print(f'wider_test: {len(items)} {args.split} images from {source}; model {args.model}; '
          f'{ctx.describe()}; mode {args.mode}'
          + (f'; longer side capped at {args.max_size}' if args.max_size else ''), flush=True)
    # Only now that the model has loaded: a mistyped --model must not cost the old predictions.
    removed = remove_predictions(args.out, split_items)
    if removed:
        print(f'wider_test: removed {removed} prediction files of an earlier run from {args.out}, so that '
              f'it holds this run\'s only', flush=True)
    start = time.perf_counter()
    skipped = run(detector, items, args)
    elapsed = time.perf_counter() - start
    done = len(items) - len(skipped)
    print(f'{done} images in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.2f} images/s); '
          f'predictions in {args.out}')
    if skipped:
        print(f'warning: skipped {len(skipped)} unreadable image(s) (no prediction file: their faces '
              f'count as missed):', file=sys.stderr)
        for message in skipped[:10]:
            print(f'  {message}', file=sys.stderr)
        if len(skipped) > 10:
            print(f'  ... and {len(skipped) - 10} more', file=sys.stderr)
    if done == 0:
        raise WiderTestError(f'none of the {len(items)} images could be read')
    if gt is None:
        default_gt = os.path.join(args.dataset_dir, 'eval_tools', 'ground_truth')
        gt_hint = default_gt if os.path.isdir(default_gt) else 'GT_DIR'
        print(f'Evaluate with: python wider_eval.py -p {args.out} -g {gt_hint}')
        return None
    from wider_eval import format_results
    if args.num_images is not None:
        gt = gt.subset_images([(event, name) for event, name, _ in items])
        print(f'scoring the {len(gt.images)} images run (--num_images), not the whole split')
    aps = evaluate(args.out, gt, warn=lambda m: print(f'warning: {m}', file=sys.stderr))
    print(format_results(aps))
    return aps


def cli(argv=None):
    """Command-line entry: one-line errors and exit status 1 instead of tracebacks."""
    return run_cli(main, parse_args, argv, errors=(WiderTestError, WiderEvalError))


if __name__ == '__main__':
    sys.exit(cli())
