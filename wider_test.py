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
    voting; see utils/inference.py), one image at a time. Every pass of either mode resizes
    and maps its boxes back as the reference port's ``tools/wider_test.py``:
    ``cv2.resize(img, None, fx=s, fy=s)``, boxes times the resized size over ``s``.
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

from data.config import MODEL_VARIANTS, cfg
from utils.cli import UserError, at_least, input_side, run_cli

# PyTorch, OpenCV and the model are imported inside the functions that use them, so that
# `--help` and usage errors answer at once. The input side limit of --max_size is the
# network's (s3fd.MIN_INPUT_SIDE), checked when the option is given.

SPLITS = ('train', 'val', 'test')


class WiderTestError(UserError, RuntimeError):
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
    parser.add_argument('--device', default=None, choices=('cpu', 'gpu', 'npu'),
                        help='default: gpu when CUDA is available, else cpu')
    parser.add_argument('--device_id', type=int, default=0)
    parser.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'),
                        help='autocast the network in this precision (default off: float32)')
    parser.add_argument('--batch_size', type=at_least(1), default=1,
                        help='single mode: images of the same input size run together (default 1)')
    parser.add_argument('--workers', type=at_least(0), default=2,
                        help='image decoding processes (0: in the main one; default 2)')
    parser.add_argument('--max_size', type=input_side, default=None,
                        help='cap the longer input side of every pass at N px (quick runs; default: '
                             'only the official H*W <= 1700*1200 rule)')
    parser.add_argument('--thresh', type=float, default=cfg.CONF_THRESH,
                        help=f'keep detections with score >= this (default {cfg.CONF_THRESH})')
    parser.add_argument('--variant', default=None, choices=MODEL_VARIANTS,
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
    from data.widerface import AnnotationError, read_wider_annotations
    try:
        return [r.name for r in read_wider_annotations(path)]
    except AnnotationError as exc:
        raise WiderTestError(str(exc)) from None


def _list_from_filelist(path):
    from data.widerface import AnnotationError, read_text_lines
    try:
        return [line.strip() for line in read_text_lines(path) if line.strip()]
    except AnnotationError as exc:
        raise WiderTestError(str(exc)) from None


def _list_from_mat(path):
    from utils.widerface_eval import WiderEvalError, list_split_images
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
    from data.widerface import annotation_path, image_root

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


# ----------------------------------------------------------------------------- main

def run(detector, items, args):
    """Detect every image and write its prediction file; returns the skip messages."""
    from tqdm import tqdm

    from utils.batch_detect import detect_files
    from utils.fileio import DiskFullError
    from utils.inference import to_wider_rows
    from utils.widerface_eval import write_prediction_file

    skipped, written = [], 0
    bar = tqdm(total=len(items), unit='img', desc=f'{args.split} ({args.mode})', file=sys.stderr,
               dynamic_ncols=True)
    try:
        for index, dets, hw, error in detect_files(detector, [path for _, _, path in items], args.mode,
                                                   args.batch_size, args.workers):
            if error is not None:
                skipped.append(error)
                bar.write(f'skipped: {error}', file=sys.stderr)
            else:
                event, name, path = items[index]
                write_prediction_file(prediction_path(args.out, event, name), os.path.basename(path),
                                      to_wider_rows(dets, *hw))
                written += 1
            bar.update(1)
    except DiskFullError as exc:
        raise DiskFullError(f'{exc}; stopped after {written} of {len(items)} prediction files: free some '
                            f'space (or give another --out) and run again', exc.path, exc.needed, exc.free) from None
    finally:
        bar.close()
    return skipped


def main(args):
    """Run the test; returns ``{'easy', 'medium', 'hard'}`` APs with --eval, else None.

    Raises WiderTestError, CheckpointError, DeviceUnavailable or WiderEvalError (one-line
    messages) for bad input.
    """
    from utils.checkpoint import load_model
    from utils.fileio import make_output_dir
    from utils.inference import Detector, inference_device
    from utils.widerface_eval import evaluate, load_ground_truth

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
    return run_cli(main, parse_args, argv, prog='wider_test.py')


if __name__ == '__main__':
    sys.exit(cli())
