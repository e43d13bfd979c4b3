"""Run S3FD over a WIDER FACE split and write the predictions in the official layout.

    python wider_test.py --model weights/sfd_face.pth --dataset_dir DIR [--split val]
        [--out OUT] [--mode single|multiscale] [--device cpu|gpu|npu]
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
    voting; see utils/inference/detector.py), one image at a time. Every pass of either mode resizes
    and maps its boxes back as the reference port's ``tools/wider_test.py``:
    ``cv2.resize(img, None, fx=s, fy=s)``, boxes times the resized size over ``s``.
    ``--max_size N`` caps the longer side of every pass (a deviation for quick runs; the
    official rule alone is the default).

Prediction folder
    One run's predictions only, so that its score depends on nothing else. The default OUT is
    ``eval_output/<model file>-<dataset folder>-<split>_<mode>[_first<N>]-<6 hex digits>``, one
    per model file, dataset and test (the digits, from the absolute paths of the model and the
    dataset, tell apart models and datasets of the same name). A run takes the folder's lock
    (``OUT/.sfd_run.lock``; a second run on it is refused while the first lives), records
    itself in ``OUT/.wider_test_run.json`` (model, dataset, split, mode and the prediction
    files it writes), and, once its model has loaded, removes every prediction file of the
    run recorded there before, saying how many and whose. Prediction files that no run
    recorded (another tool's, an older wider_test.py's) are never removed: the run is refused
    until they are moved away. Other files in the folder are left alone.

Test size
    A detector finds the faces of the sizes it was trained on. The official test size suits
    a model trained at the default --input_size 640; a model trained at another size sees its
    faces at that size when the images are shrunk in proportion (--max_size). When the
    training size is known (a training checkpoint's options, or those of the checkpoint
    beside a best/periodic weights file train.py saved) and the test size is more than twice
    or less than half the one that matches it, a warning says so and gives --max_size.

An image that cannot be decoded is skipped, reported at the end, and gets no prediction
file, so its faces count as missed.
``--eval GT_DIR`` scores the predictions with the official protocol (wider_eval.py); with
``--num_images`` only the images run are scored.
"""
import argparse
import datetime
import hashlib
import json
import os
import statistics
import sys
import time

from data.config import MODEL_VARIANTS, cfg
from utils.cli import HelpFormatter, UserError, at_least, input_side, run_cli

# PyTorch, OpenCV and the model are imported inside the functions that use them, so that
# `--help` and usage errors answer at once. The input side limit of --max_size is the
# network's (data.config.MIN_INPUT_SIDE), checked when the option is given.

SPLITS = ('train', 'val', 'test')
RUN_RECORD = '.wider_test_run.json'  # in the prediction folder: the run that wrote it (see "Prediction folder")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description='S3FD detections on a WIDER FACE split, in the official '
                                                 'prediction layout.')
    parser.add_argument('--model', default='weights/sfd_face.pth',
                        help='weights: a state_dict or a training checkpoint (default weights/sfd_face.pth)')
    parser.add_argument('--dataset_dir', default=cfg.FACE.WIDER_DIR,
                        help=f'WIDER FACE root holding WIDER_<split>/images and wider_face_split '
                             f'(default cfg.FACE.WIDER_DIR = {cfg.FACE.WIDER_DIR})')
    parser.add_argument('--split', default='val', choices=SPLITS,
                        help='the split whose images are tested (the official ground truth is of val)')
    parser.add_argument('--out', default=None,
                        help='prediction directory, holding this run\'s predictions only (default: '
                             'eval_output/<model file>-<dataset folder>-<split>_<mode>[_first<N>]-<6 hex '
                             'digits of their paths>, one per model, dataset and test)')
    parser.add_argument('--mode', default='single', choices=('single', 'multiscale'),
                        help='single: one pass (1700x1200 budget); multiscale: the S3FD test with flip, '
                             'shrunk/enlarged passes and box voting')
    parser.add_argument('--device', default=None, choices=('cpu', 'gpu', 'npu'),
                        help='default: gpu when CUDA is available, else cpu')
    parser.add_argument('--device_id', type=int, default=0, help='GPU/NPU index')
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
    if args.out is None:
        args.out = default_out(args.model, args.dataset_dir, args.split, args.mode, args.num_images)
    return args


def default_out(model, dataset_dir, split, mode, num_images=None):
    """The default prediction folder of a test: ``eval_output/<model file name>-<dataset folder
    name>-<split>_<mode>[_first<N>]-<6 hex digits>``, the digits from the absolute paths of the
    model file and the dataset, so that two models or datasets of the same name (a demo's
    data/demo/weights/sfd_face.pth and weights/sfd_face.pth) never share a folder; a quick
    subset run (--num_images) never replaces a whole split's predictions."""
    model_path = os.path.normpath(os.path.abspath(model))
    data_path = os.path.normpath(os.path.abspath(dataset_dir))
    digits = hashlib.sha1(f'{model_path}\n{data_path}'.encode('utf-8')).hexdigest()[:6]
    model_name = os.path.splitext(os.path.basename(model_path))[0] or 'model'
    data_name = os.path.basename(data_path) or 'dataset'
    subset = f'_first{num_images}' if num_images else ''
    return os.path.join('eval_output', f'{model_name}-{data_name}-{split}_{mode}{subset}-{digits}')


# ----------------------------------------------------------------------------- image list

def _list_from_annotations(path):
    from data.widerface import AnnotationError, read_wider_annotations
    try:
        return [r.name for r in read_wider_annotations(path)]
    except AnnotationError as exc:
        raise UserError(str(exc)) from None


def _list_from_filelist(path):
    from data.widerface import AnnotationError, read_text_lines
    try:
        return [line.strip() for line in read_text_lines(path) if line.strip()]
    except AnnotationError as exc:
        raise UserError(str(exc)) from None


def _list_from_mat(path):
    from utils.evaluation.widerface_eval import WiderEvalError, list_split_images
    try:
        return [f'{event}/{name}.jpg' for event, name in list_split_images(path)]
    except WiderEvalError as exc:
        raise UserError(str(exc)) from None


def image_list(dataset_dir, split):
    """The images of a split.

    Returns ``(items, source)``: items a list of ``(event, name, path)`` with ``name`` the file
    name without extension (the evaluation key is ``(event, name)``) and ``path`` the image
    file; ``source`` the list file used. Raises UserError when the split is absent.
    """
    from data.widerface import annotation_path, image_root

    if not os.path.isdir(dataset_dir):
        raise UserError(f'dataset directory {dataset_dir} does not exist')
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
        raise UserError(f'{dataset_dir}: no image list for split {split!r} (looked for '
                             f'{", ".join(os.path.relpath(p, dataset_dir) for p, _ in candidates)})')
    images_dir = image_root(dataset_dir, split)
    if not os.path.isdir(images_dir):
        raise UserError(f'{images_dir}: no such directory (the images of split {split!r}; '
                             f'list read from {path})')
    if not names:
        raise UserError(f'{path}: lists no image')
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


def relative_prediction_path(event, name):
    """`prediction_path` relative to the folder, with '/' separators (as the run record keeps it)."""
    return f'{event}/{name}.txt' if event else f'{name}.txt'


def _looks_like_prediction(path):
    """Whether the file reads as a WIDER prediction file (wider_eval would score it): line 1 an
    image file name whose stem is the file's, line 2 a count."""
    try:
        with open(path, 'rb') as handle:
            head = handle.read(4096).decode('utf-8', 'replace').lstrip('\ufeff').splitlines()
    except OSError:
        return False
    stem = os.path.splitext(os.path.basename(path))[0]
    image = head[0].strip().replace('\\', '/').rsplit('/', 1)[-1] if head else ''
    return (len(head) >= 2 and os.path.splitext(image)[0] == stem and head[1].strip().isdigit())


def folder_predictions(out_dir, known=()):
    """The prediction files in `out_dir` that wider_eval.py would read: `.txt` files in the folder
    and in its subfolders (events) that are in `known` (relative paths) or look like prediction
    files; relative paths, '/'-separated, sorted."""
    found = []
    try:
        entries = sorted(os.scandir(out_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.is_dir():  # as wider_eval.py reads an event folder
            candidates = [(f'{entry.name}/{name}', os.path.join(entry.path, name))
                          for name in sorted(os.listdir(entry.path)) if name.endswith('.txt')]
        else:
            candidates = [(entry.name, entry.path)] if entry.name.endswith('.txt') else []
        found += [rel for rel, path in candidates if rel in known or _looks_like_prediction(path)]
    return found


def read_run_record(out_dir):
    """The record of the run that last wrote `out_dir` (RUN_RECORD), or None."""
    try:
        with open(os.path.join(out_dir, RUN_RECORD), encoding='utf-8') as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get('files'), list):
        return None
    return record


def describe_run(record):
    """'model M on D, split val, mode single, started 2025-01-02T03:04:05+00:00[; it did not finish]'."""
    text = (f'model {record.get("model", "?")} on {record.get("dataset_dir", "?")}, split {record.get("split", "?")}, '
            f'mode {record.get("mode", "?")}, started {record.get("started", "?")}')
    return text + ('' if record.get('finished') else '; it did not finish')


def claim_out_dir(out_dir):
    """Take `out_dir` for this run: its lock, then a look at what is in it. Returns `(lock,
    record, earlier)`: the record of the run that wrote it before (or None) and the prediction
    files of that run still there. Raises UserError, the lock released, when another run
    holds the folder, or when it holds prediction files that no run recorded (they would be
    scored with this run's and are not this script's to delete)."""
    from utils.files.folder_lock import LOCK_NAME, FolderInUseError, FolderLock, describe_owner

    lock = FolderLock(out_dir, '--out')
    try:
        lock.acquire()
    except FolderInUseError:
        try:
            with open(os.path.join(out_dir, LOCK_NAME), encoding='utf-8') as handle:
                owner = describe_owner(json.load(handle))
        except (OSError, ValueError):
            owner = describe_owner(None)
        raise UserError(f'--out {out_dir}: in use by another wider_test.py run ({owner}); two runs in '
                             f'one folder would mix their predictions: wait for it to end, or give another '
                             f'--out') from None
    if lock.warning:
        print(lock.warning, file=sys.stderr, flush=True)
    record = read_run_record(out_dir)
    recorded = set(record['files']) if record else set()
    present = folder_predictions(out_dir, recorded)
    unrecorded = [rel for rel in present if rel not in recorded]
    if unrecorded:
        lock.release()
        raise UserError(f'--out {out_dir}: holds {len(unrecorded)} prediction file(s) that no wider_test.py '
                             f'run recorded there (e.g. {os.path.join(out_dir, *unrecorded[0].split("/"))}; '
                             f'another tool\'s, or an older wider_test.py\'s): they would be scored with this '
                             f'run\'s, and are not this script\'s to delete: move them away or give another --out')
    return lock, record, [rel for rel in present if rel in recorded]


def remove_earlier_run(out_dir, earlier):
    """Delete the prediction files `earlier` (relative paths) from `out_dir`, and the event
    folders they leave empty; returns how many files."""
    removed, folders = 0, set()
    for rel in earlier:
        path = os.path.join(out_dir, *rel.split('/'))
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed += 1
        if '/' in rel:
            folders.add(os.path.dirname(path))
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            pass  # other files are in it: not ours
    return removed


def write_run_record(out_dir, args, items, started, finished=None, written=None, skipped=None):
    """Record this run in `out_dir` (RUN_RECORD, written atomically): what it tests and every
    prediction file it may write, so that the next run in the folder removes exactly those."""
    from utils.files.fileio import atomic_write_text

    record = {'written_by': 'wider_test.py', 'model': os.path.abspath(args.model),
              'dataset_dir': os.path.abspath(args.dataset_dir), 'split': args.split, 'mode': args.mode,
              'max_size': args.max_size, 'num_images': args.num_images, 'started': started, 'finished': finished,
              'written': written, 'skipped': skipped,
              'files': [relative_prediction_path(event, name) for event, name, _ in items]}
    atomic_write_text(os.path.join(out_dir, RUN_RECORD), json.dumps(record, indent=1) + '\n')


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


# ----------------------------------------------------------------------------- test size

SIZE_TOLERANCE = 2.0  # one anchor octave: S3FD's anchors (16 ... 512 px) double from one layer to the next
SIZE_SAMPLE = 20  # images whose sizes stand for the split's


def training_input_size(model_path):
    """`(input_size, source)`: the --input_size the weights were trained at and the file whose
    training options say so, or None when nothing says. A training checkpoint keeps train.py's
    options under 'args'; a weights file train.py wrote (sfd_face.pth, the best epoch, or
    sfd_face_<iteration>.pth) holds weights only, and the options of its run are in the
    checkpoint beside it (sfd_face_checkpoint.pth). Files are only mapped (mmap), not read
    whole."""
    import torch

    from utils.training.save_folder import SaveFolder

    for path in (model_path, SaveFolder.checkpoint_beside(model_path)):
        if path is None:
            continue
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception:  # absent, or not a zip checkpoint: nothing to learn from it
            continue
        options = obj.get('args') if isinstance(obj, dict) else None
        size = options.get('input_size') if isinstance(options, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size, path
    return None


def official_test_side(items):
    """The longer side, in pixels, at which the official single-scale rule (H*W <= 1700*1200)
    runs the split's images: the median over the first SIZE_SAMPLE readable ones (sizes read
    from the file headers), or None."""
    from PIL import Image

    from utils.inference.detector import single_scale

    sides = []
    for _, _, path in items[:SIZE_SAMPLE]:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError):
            continue
        sides.append(max(height, width) * single_scale(height, width))
    return statistics.median(sides) if sides else None


def size_mismatch_warning(trained, official_side, max_size, model):
    """The warning line when the test runs the images far from the size that matches the
    training size, else None. `trained` is training_input_size's `(size, source)`.

    Training at cfg.INPUT_SIZE (640) goes with the official test size; training at S, with the
    images shrunk by S / 640, i.e. a longer side of official_side * S / 640 (faces keep the
    sizes they had in training). The test runs at min(official_side, max_size); a factor of
    more than SIZE_TOLERANCE either way moves every face past a whole anchor size."""
    if trained is None or not official_side:
        return None
    size, source = trained
    matching = official_side * size / cfg.INPUT_SIZE
    tested = min(official_side, max_size) if max_size else official_side
    factor = tested / matching
    if 1 / SIZE_TOLERANCE <= factor <= SIZE_TOLERANCE:
        return None
    if factor > 1:
        advice = f'{"use" if max_size else "add"} --max_size {round(matching)}'
    elif not max_size:
        return None  # the official size is the largest this test runs: nothing to advise
    elif matching >= official_side:
        advice = 'drop --max_size'
    else:
        advice = f'raise --max_size to {round(matching)}'
    return (f'warning: {model} was trained at --input_size {size} (training options in {source}); this test runs '
            f'the images at a longer side of about {round(tested)} px, {factor:.2g}x the {round(matching)} px '
            f'that matches that training (training at {cfg.INPUT_SIZE} matches the official {round(official_side)} '
            f'px), and finds few faces of sizes it never saw: {advice}')


# ----------------------------------------------------------------------------- main

def run(detector, items, args):
    """Detect every image and write its prediction file; returns the skip messages."""
    from tqdm import tqdm

    from utils.inference.batch_detect import detect_files
    from utils.files.fileio import DiskFullError
    from utils.inference.detector import to_wider_rows
    from utils.evaluation.widerface_eval import write_prediction_file

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

    Raises UserError, CheckpointError, DeviceUnavailable or WiderEvalError (one-line
    messages) for bad input.
    """
    from utils.files.fileio import make_output_dir

    items, source = image_list(args.dataset_dir, args.split)
    if args.num_images is not None:
        items = items[:args.num_images]
    from utils.evaluation.widerface_eval import load_ground_truth
    gt = load_ground_truth(args.eval) if args.eval else None   # fail before the long run
    make_output_dir(args.out, '--out')
    lock, record, earlier = claim_out_dir(args.out)
    try:
        return test_into_folder(args, items, source, gt, record, earlier)
    finally:
        lock.release()


def test_into_folder(args, items, source, gt, record, earlier):
    """The test itself, in a prediction folder this process holds (see main): the earlier run's
    files removed once the model has loaded, this run recorded, detections, then the score."""
    from utils.files.weights import load_model
    from utils.files.fileio import DiskFullError
    from utils.inference.detector import Detector, inference_device
    from utils.evaluation.widerface_eval import evaluate

    runtime = inference_device(args.device, args.device_id, args.amp)
    net = load_model(args.model, 'test', runtime.device, args.variant)
    detector = Detector(net, runtime.device, thresh=args.thresh, max_size=args.max_size, autocast=runtime.autocast)
    print(f'wider_test: {len(items)} {args.split} images from {source}; model {args.model}; '
          f'{runtime.describe()}; mode {args.mode}'
          + (f'; longer side capped at {args.max_size}' if args.max_size else ''), flush=True)
    warning = size_mismatch_warning(training_input_size(args.model), official_test_side(items), args.max_size,
                                args.model)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # Only now that the model has loaded: a mistyped --model must not cost the old predictions.
    removed = remove_earlier_run(args.out, earlier)
    if removed:
        print(f'wider_test: removed the {removed} prediction files of the earlier run in {args.out} '
              f'({describe_run(record)}), so that it holds this run\'s only', flush=True)
    started = _now()
    try:
        write_run_record(args.out, args, items, started)
    except DiskFullError as exc:
        raise DiskFullError(f'{exc}; no prediction written yet: free some space (or give another --out) and run '
                            f'again', exc.path, exc.needed, exc.free) from None
    start = time.perf_counter()
    skipped = run(detector, items, args)
    elapsed = time.perf_counter() - start
    done = len(items) - len(skipped)
    write_run_record(args.out, args, items, started, _now(), done, len(skipped))
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
        raise UserError(f'none of the {len(items)} images could be read')
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
