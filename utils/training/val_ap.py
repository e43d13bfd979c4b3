"""WIDER AP of the model being trained (train.py --val_ap): the single-scale test of
wider_test.py on the validation list's images, scored in memory with the official protocol
of wider_eval.py (utils/evaluation/widerface_eval.py).

Ground truth
    The official val .mat files (``--eval_gt DIR``, or found at ``<WIDER>/eval_tools/ground_truth``
    beside the images the list names, ``<WIDER>/WIDER_val/images/<event>/<name>.jpg``):
    Easy / Medium / Hard AP with the official rules (faces outside a setting are ignored).
    Without them: one AP, 'all', over every face of the list (the faces prepare_wider_data.py
    kept), by the same protocol in float64 (the int32 arithmetic of the official tools belongs
    to the .mat boxes).

Under torchrun each process detects its share of the images and every process scores the
gathered detections, so all of them hold the same APs.
"""
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from data.config import cfg
from utils.cli import UserError
from utils.evaluation.widerface_eval import (SETTINGS, GroundTruth, evaluate_detections, format_prediction_file,
                                  load_ground_truth, parse_prediction_bytes)


def image_key(path):
    """``(event, name)`` of a WIDER image path ``.../<event>/<name>.jpg``: the key of the .mat files."""
    return os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]


def find_ground_truth(image_path):
    """``<WIDER>/eval_tools/ground_truth`` for an image ``<WIDER>/WIDER_val/images/<event>/<name>.jpg``
    when that folder holds the official val .mat files, else None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(image_path)))))
    gt_dir = os.path.join(root, 'eval_tools', 'ground_truth')
    return gt_dir if os.path.isfile(os.path.join(gt_dir, 'wider_face_val.mat')) else None


def list_ground_truth(keys, boxes):
    """A GroundTruth with one setting, 'all', in which every face of the list counts.

    keys: ``(event, name)`` per image; boxes: per image float ``[n, >=4]`` ``(x1, y1, x2, y2)``
    pixels (read_face_list's rows)."""
    xywh = [np.column_stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]]).astype(np.float64)
            if len(b) else np.zeros((0, 4)) for b in boxes]
    counts = np.array([len(b) for b in xywh], dtype=np.int64)
    events = list(dict.fromkeys(event for event, _ in keys))
    return GroundTruth(events=events, images=list(keys), boxes=xywh,
                       face_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                       counted={'all': np.ones(int(counts.sum()), dtype=bool)}, listed={'all': counts})


class ValAP:
    """Set up once per run: the images, their ground truth and the settings to report.

    Args:
        val_file: the validation list (prepare_wider_data.py's format).
        gt_dir: the official ground-truth folder, or None to look beside the images.
        max_images: only the first N images of the list (a quick subset), or None.
        max_size: cap of the longer side of the detection input (like wider_test.py --max_size).
        log: print function of the main process.
    Raises UserError when an explicit gt_dir does not cover the list's images.
    """

    def __init__(self, val_file, gt_dir=None, max_images=None, max_size=None, log=print):
        from data.widerface import read_face_list

        paths, boxes = read_face_list(val_file)
        if max_images is not None:
            paths, boxes = paths[:max_images], boxes[:max_images]
        self.paths, self.max_size = paths, max_size
        keys = [image_key(p) for p in paths]
        if len(set(keys)) != len(keys):
            raise UserError(f'{val_file}: an image is listed twice (or two events share an image name): '
                             'AP needs one entry per image')
        explicit = gt_dir is not None
        gt_dir = gt_dir or find_ground_truth(paths[0])
        self.gt, self.source = None, None
        if gt_dir is not None:
            gt = load_ground_truth(gt_dir)
            known = set(gt.images)
            missing = [k for k in keys if k not in known]
            if not missing:
                self.gt, self.arithmetic = gt.subset_images(keys), 'matlab'
                self.source = f'Easy/Medium/Hard with the official ground truth in {gt_dir}'
            elif explicit:
                raise UserError(f'--eval_gt {gt_dir}: {len(missing)} of the {len(keys)} images of {val_file} '
                                 f'are not in its wider_face_val.mat (first: {"/".join(missing[0])})')
            else:
                log(f'val AP: {gt_dir} does not cover {len(missing)} of the {len(keys)} images of {val_file}; '
                    'scoring every listed face instead')
        if self.gt is None:
            self.gt, self.arithmetic = list_ground_truth(keys, boxes), 'double'
            self.source = f'one AP over the {int(sum(len(b) for b in boxes))} faces of {val_file}'
        self.keys = keys
        self.settings = list(self.gt.counted)

    def describe(self):
        size = f', longer side at most {self.max_size} px' if self.max_size else ''
        return f'{len(self.paths)} images, single-scale{size}; {self.source}'

    @torch.no_grad()
    def evaluate(self, model, runtime, workers=0, should_stop=None):
        """APs of `model` (the bare S3FD, in train or test phase; it is restored as it was).

        Returns ``{setting: AP}``, or None when `should_stop()` became true on any process
        (the detection loop stops at the next image). Every process must call this."""
        from utils.inference.batch_detect import detect_files
        from utils.inference.detector import Detector, to_wider_rows

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = list(range(rank, len(self.paths), world))
        phase, training = model.phase, model.training
        model.phase = 'test'
        model.eval()
        detector = Detector(model, runtime.device, thresh=cfg.CONF_THRESH, max_size=self.max_size,
                            autocast=runtime.autocast)
        rows, cut_short = {}, False
        try:
            for index, dets, hw, error in detect_files(detector, [self.paths[i] for i in mine], 'single',
                                                       workers=workers, option='--num_workers'):
                if error is not None:
                    rows[mine[index]] = None  # unreadable: no detections, its faces still count
                else:
                    rows[mine[index]] = as_written(to_wider_rows(dets, *hw))
                if should_stop is not None and should_stop():
                    cut_short = True
                    break
        finally:
            model.phase = phase
            model.train(training)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, (rows, cut_short))
            rows = {k: v for part, _ in gathered for k, v in part.items()}
            cut_short = any(stop for _, stop in gathered)
        if cut_short:
            return None
        dets = {self.keys[i]: r for i, r in rows.items() if r is not None}
        aps, _ = evaluate_detections(dets, self.gt, warn=lambda message: None, arithmetic=self.arithmetic)
        return {setting: float(aps[setting]) for setting in self.settings}


def as_written(rows):
    """Prediction rows as wider_test.py writes them and wider_eval.py reads them back (one decimal
    for coordinates, five for scores), so that the AP here equals theirs for the same weights."""
    return parse_prediction_bytes(format_prediction_file('image', rows).encode(), '<val AP>')


def mean_ap(aps):
    """The one number `--best_by ap` compares: the mean over the reported settings."""
    return float(sum(aps.values()) / len(aps)) if aps else math.nan


def format_ap_line(epoch, aps, images, seconds):
    """The log line after validation, e.g. 'val AP epoch:5 || Easy:0.8123 Medium:0.7912 Hard:0.5234
    || 3226 images, 42.1s'."""
    order = [s for s in SETTINGS if s in aps] + [s for s in aps if s not in SETTINGS]
    values = ' '.join(f'{s.capitalize()}:{aps[s]:.4f}' for s in order)
    return f'val AP epoch:{epoch} || {values} || {images} images, {seconds:.1f}s'

