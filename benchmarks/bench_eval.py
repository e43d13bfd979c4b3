"""Benchmark wider_eval.py on a full set of WIDER FACE val predictions, on one CPU core.

    python benchmarks/bench_eval.py [--gt GT_DIR] [--boxes-per-image 750] [--repeats 3]

Builds 3,226 prediction files from the real val ground truth (deterministic: jittered faces
with size-dependent recall and scores, some duplicates, false positives filling each image up
to --boxes-per-image, S3FD's TOP_K of 750 by default; 0 keeps only ~20-40 false positives per
image) in a temporary directory, then times, with OMP/MKL/OPENBLAS threads = 1 and the process
pinned to one core:
  * ``wider_eval.py -p DIR -g GT --json`` as a subprocess (wall time, interpreter start included);
  * in process: ground-truth loading, reading the prediction files, and the protocol itself
    (the official MATLAB arithmetic, and ``arithmetic='double'`` for comparison: ``ap_double``).
Prints one JSON object (best of --repeats for each figure). The files are read from the page
cache (they were just written). Skips, with a message, when the ground truth is absent.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from utils.cli import HelpFormatter  # noqa: E402
DEFAULT_GT = os.path.join(os.path.dirname(REPO), 'shared', 'widerface', 'eval_tools', 'ground_truth')
THREAD_VARS = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'NUMEXPR_NUM_THREADS')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description='Time wider_eval.py on a full val prediction set (one core).')
    parser.add_argument('--gt', default=DEFAULT_GT, help=f'official ground-truth directory (default {DEFAULT_GT})')
    parser.add_argument('--boxes-per-image', type=int, default=750,
                        help='fill every image with false positives up to this many boxes (0: no fill)')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per figure (best is reported)')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def pin_to_one_core():
    """One BLAS/OpenMP thread and one CPU for this process and its children; returns the CPU or None."""
    for var in THREAD_VARS:
        os.environ[var] = '1'
    if hasattr(os, 'sched_getaffinity'):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return cpu
    return None


def synthetic_detections(boxes, rng, fill_to):
    """Detector-like ``[n, 5]`` rows ``x, y, w, h, score`` for one image's faces ``boxes [n, 4]``."""
    import numpy as np
    n = len(boxes)
    size = np.sqrt(np.maximum(boxes[:, 2], 1) * np.maximum(boxes[:, 3], 1))
    ease = size / (size + 12.0)                       # small faces are found less often, scored lower
    found = rng.random(n) < 0.25 + 0.75 * ease
    det = boxes[found].copy()
    k = len(det)
    det[:, 0] += rng.normal(0, 0.08, k) * det[:, 2]
    det[:, 1] += rng.normal(0, 0.08, k) * det[:, 3]
    det[:, 2:4] *= np.exp(rng.normal(0, 0.1, (k, 2)))
    score = np.clip(0.2 + 0.78 * ease[found] * rng.random(k) ** 0.3, 0.05, 1.0)
    dup = rng.random(k) < 0.1
    dups = det[dup].copy()
    dups[:, :2] += rng.normal(0, 0.2, (len(dups), 2)) * dups[:, 2:4]
    dup_score = score[dup] * rng.uniform(0.3, 0.9, len(dups))
    extent = np.array([1024.0, max(768.0, float((boxes[:, 1] + boxes[:, 3]).max(initial=0)) + 20)])
    n_fp = max(fill_to - k - len(dups), 0) if fill_to else int(rng.integers(20, 41))
    side = np.exp(rng.uniform(np.log(4), np.log(200), n_fp))
    fp = np.column_stack([rng.random(n_fp) * (extent[0] - side), rng.random(n_fp) * (extent[1] - side),
                          side, side * rng.uniform(1.0, 1.4, n_fp)])
    fp_score = np.minimum(0.05 + rng.exponential(0.03, n_fp), 1.0)   # most false positives score low
    confident = rng.permutation(n_fp)[:rng.poisson(1.5)]              # a few score like faces
    fp_score[confident] = rng.uniform(0.1, 0.8, len(confident))
    rows = np.column_stack([np.concatenate([det, dups, fp]),
                            np.concatenate([score, dup_score, fp_score])])
    rows = rows[rng.permutation(len(rows))]           # files need not be sorted
    if fill_to and len(rows) > fill_to:
        rows = rows[np.argsort(-rows[:, 4], kind='stable')[:fill_to]]
    return rows


def write_prediction_set(gt, out_dir, fill_to, seed):
    """Write one prediction file per val image; returns the total number of boxes."""
    import numpy as np
    from utils.evaluation.widerface_eval import format_prediction_file
    rng = np.random.default_rng(seed)
    total = 0
    for (event, name), boxes in zip(gt.images, gt.boxes):
        rows = synthetic_detections(boxes, rng, fill_to)
        os.makedirs(os.path.join(out_dir, event), exist_ok=True)
        with open(os.path.join(out_dir, event, name + '.txt'), 'w', encoding='utf-8') as f:
            f.write(format_prediction_file(f'{event}/{name}.jpg', rows))
        total += len(rows)
    return total


def best_time(fn, repeats):
    best, result = float('inf'), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(args):
    if not all(os.path.isfile(os.path.join(args.gt, f)) for f in
               ('wider_face_val.mat', 'wider_easy_val.mat', 'wider_medium_val.mat', 'wider_hard_val.mat')):
        message = f'skipped: the official val ground truth is not in {args.gt} (pass --gt DIR)'
        print(message, file=sys.stderr)
        print(json.dumps({'skipped': message}))
        return 0
    cpu = pin_to_one_core()
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from utils.evaluation.widerface_eval import evaluate_detections, load_ground_truth, read_predictions
    gt = load_ground_truth(args.gt)
    with tempfile.TemporaryDirectory(prefix='bench_eval_') as pred_dir:
        start = time.perf_counter()
        n_boxes = write_prediction_set(gt, pred_dir, args.boxes_per_image, args.seed)
        write_s = time.perf_counter() - start
        size_mb = sum(e.stat().st_size for ev in os.scandir(pred_dir) for e in os.scandir(ev.path)) / 2 ** 20
        gt_s, _ = best_time(lambda: load_ground_truth(args.gt), args.repeats)
        read_s, (dets, stats) = best_time(lambda: read_predictions(pred_dir, gt), args.repeats)
        eval_s, (aps, _) = best_time(lambda: evaluate_detections(dets, gt), args.repeats)
        double_s, (aps_double, _) = best_time(lambda: evaluate_detections(dets, gt, arithmetic='double'),
                                              args.repeats)
        command = [sys.executable, os.path.join(REPO, 'wider_eval.py'), '-p', pred_dir, '-g', args.gt, '--json']

        def run_cli():
            proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                raise SystemExit(f'wider_eval.py failed: {proc.stderr.strip()}')
            return json.loads(proc.stdout)

        cli_s, cli_aps = best_time(run_cli, args.repeats)
    print(json.dumps({
        'benchmark': 'wider_eval.py on WIDER FACE val predictions',
        'images': stats['images'], 'prediction_files': stats['matched'], 'boxes': n_boxes,
        'boxes_per_image_fill': args.boxes_per_image, 'files_mb': round(size_mb, 1),
        'threads': 1, 'cpu': cpu, 'repeats': args.repeats,
        'cli_wall_s': round(cli_s, 3),
        'load_gt_s': round(gt_s, 3), 'read_predictions_s': round(read_s, 3), 'protocol_s': round(eval_s, 3),
        'in_process_total_s': round(gt_s + read_s + eval_s, 3),
        'write_predictions_s': round(write_s, 2),
        'protocol_double_s': round(double_s, 3),
        'ap': {k: round(v, 6) for k, v in aps.items()},
        'ap_double': {k: round(v, 6) for k, v in aps_double.items()},
        'ap_cli_matches': all(abs(cli_aps[k] - aps[k]) < 1e-12 for k in aps),
    }))
    return 0


if __name__ == '__main__':
    sys.exit(main(parse_args()))
