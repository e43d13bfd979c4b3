"""The official WIDER FACE evaluation protocol, vectorised in NumPy, and its file readers.

This module reproduces the MATLAB ``eval_tools`` of WIDER FACE (``wider_eval.m`` with
``read_pred``, ``norm_score``, ``evaluation``, ``image_evaluation``, ``image_pr_info``,
``dataset_pr_info``, ``boxoverlap`` and ``VOCap``), with MATLAB's class rules: the faces of
the .mat files are int32, so ``boxoverlap`` runs in int32, and the score span starts from
single-precision values, so ``norm_score`` runs in single precision (``arithmetic='matlab'``,
the default). ``arithmetic='double'`` runs the same steps in float64, which is what the
established Python port (WiderFace-Evaluation) computes; its APs differ from the official
ones by about 0.1 points for detector-like predictions, and by more where the boxes on tiny
faces are off by a fraction of a pixel. Nothing here is a CLI; ``wider_eval.py`` and ``wider_test.py``
call it.

Ground truth (``load_ground_truth``)
    ``wider_face_val.mat`` holds ``event_list`` (61 events), ``file_list`` (image names per
    event, without ``.jpg``) and ``face_bbx_list`` (per image ``[n, 4]`` boxes ``x, y, w, h`` in
    pixels). ``wider_{easy,medium,hard}_val.mat`` hold ``gt_list``: per image the 1-based
    indices of the faces that count in that setting. The other faces of the image are
    "ignored" faces of that setting. The number of faces of a setting is the total length
    of its ``gt_list`` (7,211 / 13,319 / 31,958 for easy / medium / hard on val).

Predictions (``read_prediction_file``, ``read_predictions``)
    ``PRED_DIR/<event>/<image name>.txt``: line 1 the image name (a path is allowed; only its
    last component counts and a ``.jpg`` *suffix* is removed - not the character set that
    ``str.rstrip('.jpg')`` would strip; it must name the file's image), line 2 the number of
    boxes, then one ``x y w h score`` line per box (pixels, any whitespace between numbers,
    blank lines skipped). A count that disagrees with the box lines is an error here (MATLAB
    reads ``count`` lines and ignores the rest, the Python port ignores the count). Like the
    MATLAB ``read_pred`` the files are looked up from the ground-truth image list, so files
    of other images are never read; a missing file means "no detections" for that image
    (its faces still count).
    The rows of a file need not be sorted: each image's predictions are sorted here by score,
    descending, with a stable sort (MATLAB ``sort(..., 'descend')`` keeps the file order of
    equal scores).

Protocol (``evaluate_detections``), IoU threshold 0.5, 1000 score thresholds:

1. Score normalisation (``norm_score``): over every prediction read (every image of the
   ground-truth list, with or without faces), ``s' = (s - lo) / (hi - lo)`` with
   ``lo = min(realmax('single'), min s)`` and ``hi = max(realmin('single'), max s)``. For scores
   in ``[0, 1]`` this is plain min-max normalisation, computed in single precision ('matlab':
   ``lo``, ``hi`` and the quotient are single, the result compared with the float64
   thresholds) or in float64 ('double'). (The Python port starts from
   ``lo = 1, hi = 0`` instead, which only differs when every score is above 1 or below 0.)
   When all scores are equal the official code divides 0 by 0 and scores AP 0; here every
   score becomes 1.0 instead (one operating point) - the only deliberate scoring deviation.
2. Images with no ground-truth face or no prediction are skipped entirely: their faces
   still count (step 6) but predictions on an image without faces are never proposals.
3. Matching (``image_evaluation``), per image, predictions in score order: each prediction
   takes the face of highest IoU among *all* faces of the image (first face on ties). IoU
   uses the MATLAB convention ``x2 = x + w``, ``y2 = y + h`` and pixel-inclusive ``+1`` widths:
   ``iw = min(x2) - max(x1) + 1``, area ``(x2 - x1 + 1) * (y2 - y1 + 1)``, IoU 0 when
   ``iw <= 0`` or ``ih <= 0``. With an int32 face ('matlab') the prediction's corners are
   rounded (half away from zero) for ``iw`` and ``ih``, the union is
   ``round(face area + prediction area) - intersection`` and the IoU itself is rounded to 0
   or 1: a prediction takes the *first* face (in annotation order) at IoU ``>= 0.5``, not
   the closest one. If that best IoU is ``>= 0.5``:
   a face that does not count -> the prediction is *ignored* (not a proposal);
   a counted face hit for the first time -> true positive;
   a counted face already hit -> false positive (a duplicate).
   A best IoU below 0.5 -> false positive. Faces are never removed once matched, so a
   duplicate does not move to the second-best face.
4. Per threshold ``t_i = 1 - i/1000``, ``i = 1..1000`` (0.999 down to 0.0) (``image_pr_info``):
   the image keeps the predictions with normalised score ``>= t_i`` (a prefix of its sorted
   list); ``proposals`` = kept predictions that are not ignored, ``TP`` = counted faces hit
   by a kept prediction (the official ``pred_recall``).
5. Both are summed over images (``dataset_pr_info``): ``precision_i = TP_i / proposals_i``,
   ``recall_i = TP_i / num_faces``. Where ``proposals_i == 0`` the official value is 0/0; it
   is reported as 0 here - such points have recall 0 and never change the AP.
6. ``num_faces`` is the total length of the setting's ``gt_list`` over all images of the list.
7. AP (``VOCap``): all-point interpolated envelope, ``mrec = [0, recall, 1]``,
   ``mpre = [0, precision, 0]``, ``mpre[k] = max(mpre[k:])``, ``AP = sum((mrec[k] - mrec[k-1]) * mpre[k])``
   over the ``k`` where recall changes.

Two hard faces of the val ground truth can never be matched: one box annotated twice in the
same image (step 3 gives both predictions to the first copy) and one box of width -2 (its
IoU with itself is 0). Perfect predictions therefore score hard AP 31956/31958 at best;
easy and medium reach 1.0.

Because step 3 never depends on earlier matches other than "was this face hit before", the
whole dataset is processed as flat arrays: one IoU matrix per image (the only per-image
loop), then the first hit of every face, and the 1000-threshold sums as a cumulative
histogram of each prediction's first threshold. The IoU and the normalisation follow the
MATLAB code operation by operation, in its classes ('matlab') or in float64 ('double'), so
decisions at exactly IoU 0.5 or exactly on a threshold are those of the code emulated.
"""
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np

from utils.cli import UserError
from utils.files.fileio import atomic_path, atomic_write_text

SETTINGS = ('easy', 'medium', 'hard')
FACE_MAT = 'wider_face_val.mat'
SETTING_MATS = {s: f'wider_{s}_val.mat' for s in SETTINGS}
IOU_THRESH = 0.5
# 'matlab': the official tools as MATLAB runs them (int32 faces, single-precision scores);
# 'double': the same steps in float64, which is what the WiderFace-Evaluation Python port computes.
ARITHMETICS = ('matlab', 'double')
THRESH_NUM = 1000
# Thresholds 1 - i/1000 for i = 1..1000, computed exactly as the MATLAB loop does.
THRESHOLDS = 1.0 - np.arange(1, THRESH_NUM + 1, dtype=np.float64) / THRESH_NUM
_THRESHOLDS_ASCENDING = THRESHOLDS[::-1].copy()
_FLT_MIN = float(np.finfo(np.float32).tiny)   # MATLAB realmin('single')
_FLT_MAX = float(np.finfo(np.float32).max)    # MATLAB realmax('single')
_FORMAT_HINT = 'expected line 1 the image name, line 2 the box count, then "x y w h score" lines'


class WiderEvalError(UserError, ValueError):
    """Bad evaluation input (ground truth or predictions); the message names the file."""


class WiderEvalWarning(UserWarning):
    """Input that is scored but probably not what the user meant (e.g. missing prediction files)."""


@dataclass
class GroundTruth:
    """The WIDER FACE val ground truth in flat arrays.

    Attributes:
        events: event names in .mat order (61 on val), e.g. ``'0--Parade'``.
        images: ``(event, image name)`` per image in .mat order; names have no ``.jpg``.
        boxes: per image a float64 ``[n_i, 4]`` array of faces ``x, y, w, h`` in pixels,
            exactly as stored in ``face_bbx_list`` (top-left corner, width, height).
        face_offsets: int64 ``[len(images) + 1]``; the faces of image ``i`` have global ids
            ``face_offsets[i] .. face_offsets[i + 1] - 1``.
        counted: per setting a bool ``[num_faces_total]`` mask of the faces in ``gt_list``.
        listed: per setting int64 ``[len(images)]``, the length of each image's ``gt_list``.
    """
    events: list
    images: list
    boxes: list
    face_offsets: np.ndarray
    counted: dict
    listed: dict

    @property
    def num_faces(self):
        """Per setting the total length of ``gt_list``: the recall denominator."""
        return {s: int(v.sum()) for s, v in self.listed.items()}

    def subset(self, events):
        """A GroundTruth restricted to the images of ``events`` (names, kept in .mat order)."""
        wanted = set(events)
        unknown = wanted.difference(self.events)
        if unknown:
            raise WiderEvalError(f'unknown event(s) {sorted(unknown)}')
        return self._select([i for i, (event, _) in enumerate(self.images) if event in wanted])

    def subset_images(self, keys):
        """A GroundTruth restricted to the images ``keys`` ((event, name) pairs), in .mat order."""
        wanted = set(keys)
        return self._select([i for i, key in enumerate(self.images) if key in wanted])

    def _select(self, keep):
        """The GroundTruth of the images at indices ``keep`` (ascending)."""
        boxes = [self.boxes[i] for i in keep]
        counts = np.array([len(b) for b in boxes], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        faces = (np.concatenate([np.arange(self.face_offsets[i], self.face_offsets[i + 1]) for i in keep])
                 if keep else np.zeros(0, dtype=np.int64))
        kept_events = {self.images[i][0] for i in keep}
        return GroundTruth(events=[e for e in self.events if e in kept_events],
                           images=[self.images[i] for i in keep], boxes=boxes, face_offsets=offsets,
                           counted={s: m[faces] for s, m in self.counted.items()},
                           listed={s: v[keep] for s, v in self.listed.items()})


# ----------------------------------------------------------------------------- ground truth

def _loadmat(path, keys):
    """Load ``keys`` of a MATLAB file with a one-line error naming the file."""
    from scipy.io import loadmat
    try:
        mat = loadmat(path, variable_names=list(keys))
    except Exception as exc:  # scipy raises several types for a damaged or foreign file
        raise WiderEvalError(f'{path}: cannot read it as a MATLAB file ({type(exc).__name__}: {exc})') from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise WiderEvalError(f'{path}: no variable {", ".join(missing)} (not a WIDER FACE ground-truth file?)')
    return mat


def _cells(value):
    """A MATLAB cell array as loaded by scipy (object ndarray, any shape) -> flat list."""
    return list(np.asarray(value, dtype=object).ravel())


def _cell_string(value, path):
    arr = np.asarray(value).ravel()
    if arr.size != 1 or not isinstance(arr[0], str):
        raise WiderEvalError(f'{path}: expected a string in a name list, got {arr!r}')
    return str(arr[0])


def _image_list(mat, path):
    """``(event names, [(event, name), ...], per-event image counts)`` from the ``event_list``
    and ``file_list`` of a loaded WIDER .mat file (``path`` names it in errors)."""
    events = [_cell_string(e, path) for e in _cells(mat['event_list'])]
    per_event = _cells(mat['file_list'])
    if len(per_event) != len(events):
        raise WiderEvalError(f'{path}: {len(events)} events but {len(per_event)} file lists')
    images, counts = [], []
    for event, files in zip(events, per_event):
        names = [_cell_string(f, path) for f in _cells(files)]
        images.extend((event, name) for name in names)
        counts.append(len(names))
    return events, images, counts


def list_split_images(path):
    """List the images of a split from its .mat file.

    Args:
        path: a WIDER .mat file holding ``event_list`` and ``file_list`` (``wider_face_val.mat``,
            or ``wider_face_train.mat`` / ``wider_face_test.mat`` of ``wider_face_split``), or a
            directory holding ``wider_face_val.mat``.
    Returns:
        list of ``(event, image name)`` in .mat order; the image file is
        ``<images dir>/<event>/<image name>.jpg``.
    """
    if os.path.isdir(path):
        path = os.path.join(path, FACE_MAT)
    if not os.path.isfile(path):
        raise WiderEvalError(f'{path}: no such .mat file')
    return _image_list(_loadmat(path, ('event_list', 'file_list')), path)[1]


def load_ground_truth(gt_dir):
    """Load the official val ground truth from the directory of the four .mat files.

    Args:
        gt_dir: directory with ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat``
            (``eval_tools/ground_truth`` of the official evaluation tools).
    Returns:
        GroundTruth. Raises WiderEvalError naming the missing or malformed file.
    """
    if os.path.isfile(gt_dir):
        raise WiderEvalError(f'{gt_dir} is a file: give the directory that holds it and the other '
                             f'ground-truth files ({os.path.dirname(gt_dir) or "."})')
    if not os.path.isdir(gt_dir):
        raise WiderEvalError(f'ground-truth directory {gt_dir} does not exist')
    needed = [FACE_MAT] + [SETTING_MATS[s] for s in SETTINGS]
    missing = [f for f in needed if not os.path.isfile(os.path.join(gt_dir, f))]
    if missing:
        raise WiderEvalError(f'ground-truth directory {gt_dir} lacks {", ".join(missing)} (the official '
                             f'eval_tools/ground_truth holds wider_face_val.mat and '
                             f'wider_{{easy,medium,hard}}_val.mat)')
    face_path = os.path.join(gt_dir, FACE_MAT)
    mat = _loadmat(face_path, ('event_list', 'file_list', 'face_bbx_list'))
    events, images, counts = _image_list(mat, face_path)
    per_event = _cells(mat['face_bbx_list'])
    if [len(_cells(b)) for b in per_event] != counts:
        raise WiderEvalError(f'{face_path}: face_bbx_list does not have one entry per image of file_list')
    boxes = []
    for event_boxes in per_event:
        for b in _cells(event_boxes):
            b = np.asarray(b, dtype=np.float64)
            if b.size % 4 or (b.size and b.shape[-1] != 4):
                raise WiderEvalError(f'{face_path}: a face_bbx_list entry has shape {b.shape}, expected [n, 4]')
            boxes.append(b.reshape(-1, 4))
    sizes = np.array([len(b) for b in boxes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    counted, listed = {}, {}
    for setting in SETTINGS:
        path = os.path.join(gt_dir, SETTING_MATS[setting])
        per_event = _cells(_loadmat(path, ('gt_list',))['gt_list'])
        if [len(_cells(k)) for k in per_event] != counts:
            raise WiderEvalError(f'{path}: gt_list does not match the images of {FACE_MAT} '
                                 f'(different split or a damaged file)')
        mask = np.zeros(int(offsets[-1]), dtype=bool)
        lengths = np.zeros(len(images), dtype=np.int64)
        for i, keep in enumerate(k for event_keep in per_event for k in _cells(event_keep)):
            keep = np.asarray(keep).ravel().astype(np.int64)
            if keep.size and (keep.min() < 1 or keep.max() > sizes[i]):
                event, name = images[i]
                raise WiderEvalError(f'{path}: gt_list of {event}/{name} has face index {int(keep.max())} '
                                     f'outside 1..{int(sizes[i])}')
            mask[offsets[i] + keep - 1] = True
            lengths[i] = keep.size
        counted[setting] = mask
        listed[setting] = lengths
    return GroundTruth(events=events, images=images, boxes=boxes, face_offsets=offsets,
                       counted=counted, listed=listed)


# ----------------------------------------------------------------------------- predictions

def image_name_from_line(line):
    """Image name of a prediction file's first line: last path component, ``.jpg`` suffix removed."""
    name = line.strip().replace('\\', '/').rsplit('/', 1)[-1]
    return name[:-len('.jpg')] if name.endswith('.jpg') else name


def _parse_box_lines_slowly(body, path, count):
    """Line-by-line parse of the box lines (after line 2); raises naming the first bad line."""
    rows = []
    for k, raw in enumerate(body.split(b'\n')):
        text = raw.strip()
        if not text:
            continue
        where = f'{path}, line {k + 3}'
        shown = text[:80].decode('utf-8', 'replace')
        parts = text.split()
        if len(parts) != 5:
            raise WiderEvalError(f'{where}: expected 5 numbers "x y w h score", got {len(parts)}: {shown!r}')
        try:
            if any(b'_' in p for p in parts):  # float() accepts 1_0; the official readers do not
                raise ValueError
            values = [float(p) for p in parts]
        except ValueError:
            raise WiderEvalError(f'{where}: not a number in {shown!r}') from None
        if not np.isfinite(values).all():
            raise WiderEvalError(f'{where}: non-finite value in {shown!r}')
        rows.append(values)
    if len(rows) != count:
        raise WiderEvalError(f'{path}, line 2: says {count} boxes but the file has {len(rows)} box lines')
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def parse_prediction_bytes(data, path, expected_name=None):
    """Parse the bytes of one prediction file (see ``read_prediction_file``)."""
    if data.startswith(b'\xef\xbb\xbf'):  # a UTF-8 byte-order mark (Windows editors write one):
        data = data[3:]                   # not part of the image name, as for the list readers
    if not data.strip():
        raise WiderEvalError(f'{path}: empty file ({_FORMAT_HINT})')
    end1 = data.find(b'\n')
    if end1 < 0:
        raise WiderEvalError(f'{path}, line 2: missing box count ({_FORMAT_HINT})')
    end2 = data.find(b'\n', end1 + 1)
    line1 = data[:end1]
    line2 = data[end1 + 1:] if end2 < 0 else data[end1 + 1:end2]
    body = b'' if end2 < 0 else data[end2 + 1:]
    if expected_name is not None:
        name = image_name_from_line(line1.decode('utf-8', 'replace'))
        if name != expected_name:
            raise WiderEvalError(f'{path}, line 1: names image {name!r} but the file is for {expected_name!r}')
    try:
        count = int(line2.strip())
    except ValueError:
        shown = line2.strip()[:80].decode('utf-8', 'replace')
        raise WiderEvalError(f'{path}, line 2: expected the number of boxes, got {shown!r}') from None
    if count < 0:
        raise WiderEvalError(f'{path}, line 2: negative box count {count}')
    if count == 0:
        if body.strip():
            raise WiderEvalError(f'{path}, line 2: says 0 boxes but box lines follow')
        return np.zeros((0, 5), dtype=np.float64)
    # Fast path (numpy >= 1.23 loadtxt is a C parser, same values as float()); anything unusual
    # (blank lines, a bad token, a wrong count) goes to the line-by-line parser for the message.
    lines = body.count(b'\n') + (0 if body.endswith(b'\n') else 1)
    if lines == count:
        try:
            boxes = np.loadtxt(io.BytesIO(body), dtype=np.float64, comments=None, ndmin=2)
        except ValueError:
            boxes = None
        if boxes is not None and boxes.shape == (count, 5) and np.isfinite(boxes).all():
            return boxes
    return _parse_box_lines_slowly(body, path, count)


def read_prediction_file(path, expected_name=None):
    """Read one WIDER prediction file.

    Args:
        path: the ``.txt`` file (line 1 image name, line 2 count, then ``x y w h score`` lines;
            a leading UTF-8 byte-order mark is dropped).
        expected_name: if given, line 1 must name this image (after dropping a directory part
            and a ``.jpg`` suffix).
    Returns:
        float64 ``[count, 5]`` rows ``x, y, w, h, score`` in file order (pixels, top-left corner).
    Raises:
        WiderEvalError naming the file and line for anything unreadable.
    """
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as exc:
        raise WiderEvalError(f'{path}: cannot read ({exc.strerror or exc})') from None
    return parse_prediction_bytes(data, path, expected_name)


def format_prediction_file(image_name, dets):
    """Text of a prediction file: ``dets`` float ``[n, 5]`` rows ``x, y, w, h, score`` (pixels)."""
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 5)
    rows = ('%.1f %.1f %.1f %.1f %.5f\n' * len(dets)) % tuple(dets.ravel().tolist())
    return f'{image_name}\n{len(dets)}\n{rows}'


def write_prediction_file(path, image_name, dets):
    """Atomically write one prediction file in the official layout (see ``format_prediction_file``).

    ``image_name`` is written on line 1 as given (e.g. ``'0_Parade_marchingband_1_465.jpg'``).
    """
    atomic_write_text(path, format_prediction_file(image_name, dets))


def _warn(warn, message):
    if warn is None:
        warnings.warn(message, WiderEvalWarning, stacklevel=3)
    else:
        warn(message)


def read_predictions(pred_dir, gt, warn=None):
    """Read the prediction files of every ground-truth image.

    Args:
        pred_dir: directory with ``<event>/<image name>.txt`` files.
        gt: GroundTruth.
        warn: callable taking a one-line message (default: ``warnings.warn`` with WiderEvalWarning).
    Returns:
        ``(dets, stats)``: ``dets`` a list aligned with ``gt.images`` of float64 ``[n, 5]`` arrays
        (``x, y, w, h, score``, file order) or None for a missing file; ``stats`` a dict with
        ``images``, ``matched``, ``missing`` and ``unmatched_files`` (``.txt`` files in
        ``pred_dir`` or its event folders that belong to no ground-truth image).
    Raises:
        WiderEvalError if the directory is absent or holds no prediction file, if no file matches
        an image of the ground truth (wrong split or layout), or for an unreadable file.
        A partial match is scored and reported through ``warn`` with the counts.
    """
    if not os.path.isdir(pred_dir):
        what = 'is a file, not a directory' if os.path.isfile(pred_dir) else 'does not exist'
        raise WiderEvalError(f'prediction directory {pred_dir} {what}')
    present, n_files = {}, 0
    try:
        with os.scandir(pred_dir) as it:
            for entry in it:
                if entry.is_dir():
                    names = {f[:-4] for f in os.listdir(entry.path) if f.endswith('.txt')}
                    present[entry.name] = names
                    n_files += len(names)
                elif entry.name.endswith('.txt'):
                    n_files += 1
    except OSError as exc:
        raise WiderEvalError(f'cannot list {exc.filename or pred_dir}: {exc.strerror or exc}') from None
    example = os.path.join(pred_dir, *gt.images[0]) + '.txt' if gt.images else '<event>/<image>.txt'
    if n_files == 0:
        raise WiderEvalError(f'prediction directory {pred_dir} holds no prediction files '
                             f'(expected <event>/<image name>.txt, e.g. {example})')
    dets = [None] * len(gt.images)
    matched = 0
    for i, (event, name) in enumerate(gt.images):
        if name in present.get(event, ()):
            dets[i] = read_prediction_file(os.path.join(pred_dir, event, name + '.txt'), expected_name=name)
            matched += 1
    n_images = len(gt.images)
    missing, unmatched = n_images - matched, n_files - matched
    if matched == 0:
        raise WiderEvalError(f'none of the {n_images} ground-truth images has a prediction file in {pred_dir} '
                             f'(0 matched, {n_images} missing; its {n_files} .txt files belong to no image of '
                             f'this split): wrong split or layout? expected e.g. {example}')
    if missing or unmatched:
        _warn(warn, f'{matched} of {n_images} images have a prediction file in {pred_dir}; {missing} without one '
                    f'are scored as no detections; {unmatched} files match no ground-truth image and are ignored')
    _warn_odd_boxes(dets, gt, pred_dir, warn)
    return dets, dict(images=n_images, matched=matched, missing=missing, unmatched_files=unmatched)


def _warn_odd_boxes(dets, gt, pred_dir, warn):
    """Say so, with counts and a file to look at, when predictions hold boxes without extent or
    negative scores: they are scored as the official tool scores them, which a user should know."""
    for what, odd, meaning in (
            ('a width or height <= 0', lambda d: (d[:, 2] <= 0) | (d[:, 3] <= 0),
             'as detections that match no face, a false positive each (the official arithmetic)'),
            ('a negative score', lambda d: d[:, 4] < 0,
             'as they are: scores are min-max normalised over all predictions, so only their order counts')):
        counts = [int(odd(d).sum()) if d is not None and len(d) else 0 for d in dets]
        if sum(counts):
            first = next(i for i, n in enumerate(counts) if n)
            example = os.path.join(pred_dir, *gt.images[first]) + '.txt'
            _warn(warn, f'{sum(counts)} boxes in {sum(1 for n in counts if n)} files have {what} (e.g. {example}); '
                        f'scored {meaning}')


# ----------------------------------------------------------------------------- protocol

def _int32(x):
    """MATLAB's conversion of doubles to int32: round half away from zero, saturate, NaN -> 0.
    Returns a new float64 array holding the integers."""
    x = np.asarray(x, dtype=np.float64)
    magnitude = np.abs(x)
    out = magnitude + 0.5
    np.floor(out, out=out)
    # floor(|x| + 0.5) is one too high for the doubles just below a half where |x| + 0.5
    # rounds up to the next whole number (0.49999999999999994 -> 1).
    with np.errstate(invalid='ignore'):
        out[out - 0.5 > magnitude] -= 1
    np.copysign(out, x, out=out)
    out[np.isnan(out)] = 0
    return np.clip(out, -2.0 ** 31, 2.0 ** 31 - 1, out=out)


def iou_matrix(pred, gt, arithmetic='matlab'):
    """Official WIDER IoU between predictions and faces (MATLAB ``boxoverlap``).

    Args:
        pred: float64 ``[P, 4]`` boxes ``x, y, w, h``; gt: float64 ``[G, 4]`` boxes ``x, y, w, h``
            (whole numbers: the int32 ``face_bbx_list``).
        arithmetic: 'matlab' or 'double' (see ``ARITHMETICS``).
    Returns:
        float64 ``[P, G]``, 0 where the boxes do not overlap. Corners ``x2 = x + w``,
        ``y2 = y + h``, pixel-inclusive ``+1`` widths. 'matlab': what ``boxoverlap`` computes
        with an int32 face: the prediction's corners rounded for the intersection, the union
        ``round(face area + prediction area) - intersection``, and the ratio itself rounded, so
        1 where the IoU is ``>= 0.5`` and 0 below. 'double': the IoU in float64, in the MATLAB
        order of operations.
    """
    if arithmetic not in ARITHMETICS:
        raise ValueError(f'arithmetic must be one of {ARITHMETICS}, not {arithmetic!r}')
    px1, py1 = pred[:, 0:1], pred[:, 1:2]
    px2, py2 = px1 + pred[:, 2:3], py1 + pred[:, 3:4]
    gx1, gy1 = gt[:, 0], gt[:, 1]
    gx2, gy2 = gx1 + gt[:, 2], gy1 + gt[:, 3]
    if arithmetic == 'matlab':
        # Every operation with an int32 operand gives int32 in MATLAB (rounded, saturated).
        # The widths, heights and intersection are sums and products of whole numbers bounded
        # by the face, exact in float64 and far from the int32 limits; the rest is rounded.
        rx1, ry1, rx2, ry2 = _int32(px1), _int32(py1), _int32(px2), _int32(py2)
        iw = np.minimum(rx2, gx2)
        iw -= np.maximum(rx1, gx1)
        iw += 1
        ih = np.minimum(ry2, gy2)
        ih -= np.maximum(ry1, gy1)
        ih += 1
        inter = iw * ih
        face_area = (gx2 - gx1 + 1) * (gy2 - gy1 + 1)
        union = _int32(face_area + (px2 - px1 + 1) * (py2 - py1 + 1))
        union -= inter
        with np.errstate(divide='ignore', invalid='ignore'):
            inter /= union
        overlap = _int32(inter)   # int32 division: 0/0 -> 0, x/0 -> intmax
        overlap[(iw <= 0) | (ih <= 0)] = 0
        return overlap
    iw = np.minimum(px2, gx2)
    iw -= np.maximum(px1, gx1)
    iw += 1
    np.maximum(iw, 0, out=iw)   # the official sets IoU 0 where iw <= 0; 0 * ih / union is that 0
    ih = np.minimum(py2, gy2)
    ih -= np.maximum(py1, gy1)
    ih += 1
    np.maximum(ih, 0, out=ih)
    inter = iw
    inter *= ih
    union = (gx2 - gx1 + 1) * (gy2 - gy1 + 1) + (px2 - px1 + 1) * (py2 - py1 + 1)
    union -= inter
    with np.errstate(divide='ignore', invalid='ignore'):
        inter /= union
    return inter


def _score_span(lo, hi, arithmetic):
    """(lo, hi) as ``norm_score`` holds them: single precision ('matlab') or float64."""
    if arithmetic == 'matlab':
        return np.float32(lo), np.float32(hi)
    return np.float64(lo), np.float64(hi)


def normalise_scores(scores, lo, hi, arithmetic='matlab'):
    """MATLAB ``norm_score``: ``(s - lo) / (hi - lo)``, returned as float64. 'matlab' computes
    it in single precision, as MATLAB does once ``lo`` and ``hi`` (started from
    ``realmax``/``realmin('single')``) are single; 'double' in float64. All-equal scores
    (hi == lo in that precision) become 1.0."""
    lo, hi = _score_span(lo, hi, arithmetic)
    if hi == lo:
        return np.ones(len(scores), dtype=np.float64)
    return ((np.asarray(scores).astype(lo.dtype) - lo) / (hi - lo)).astype(np.float64)


def voc_ap(recall, precision):
    """VOC all-point interpolated AP (MATLAB ``VOCap``) of 1-D recall / precision arrays."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    k = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[k] - mrec[k - 1]) * mpre[k]))


def _match_all(dets, gt, arithmetic):
    """Per prediction of images with faces: raw score, best IoU, global id of the best face.

    Predictions are in per-image score order (stable, descending), images in .mat order.
    Also returns the (lo, hi) of the official normalisation over every prediction, or None.
    """
    lo, hi, seen = _FLT_MAX, _FLT_MIN, False
    scores, best_ious, best_faces = [], [], []
    for i, d in enumerate(dets):
        if d is None or len(d) == 0:
            continue
        d = np.asarray(d, dtype=np.float64)
        if d.ndim != 2 or d.shape[1] != 5:
            event, name = gt.images[i]
            raise WiderEvalError(f'detections for {event}/{name} have shape {d.shape}, expected [n, 5]')
        s = d[:, 4]
        lo, hi, seen = min(lo, float(s.min())), max(hi, float(s.max())), True
        g = gt.boxes[i]
        if len(g) == 0:
            continue
        order = np.argsort(-s, kind='stable')
        d = d[order]
        iou = iou_matrix(d[:, :4], g, arithmetic)
        best = iou.argmax(axis=1)
        scores.append(d[:, 4])
        best_ious.append(iou[np.arange(len(d)), best])
        best_faces.append(best + gt.face_offsets[i])
    if not scores:
        empty = np.zeros(0)
        return empty, empty, np.zeros(0, dtype=np.int64), ((lo, hi) if seen else None)
    return np.concatenate(scores), np.concatenate(best_ious), np.concatenate(best_faces), (lo, hi)


def evaluate_detections(dets, gt, warn=None, arithmetic='matlab'):
    """Score detections with the official protocol (see the module docstring).

    Args:
        dets: list aligned with ``gt.images`` of float ``[n, 5]`` arrays ``x, y, w, h, score``
            (pixels, any row order) or None, or a dict ``(event, name) -> array`` (absent = none).
        gt: GroundTruth.
        warn: callable for one-line warnings (default ``warnings.warn``, WiderEvalWarning).
        arithmetic: 'matlab' (the official tools' numbers) or 'double' (the Python port's).
    Returns:
        ``(aps, curves)``: ``aps`` dict setting -> AP (float); ``curves`` dict setting -> dict with
        float64 ``[1000]`` arrays ``precision``, ``recall``, ``thresholds`` (0.999 .. 0.0), int64
        ``[1000]`` ``tp`` and ``proposals``, and int ``num_faces``.
    """
    if isinstance(dets, dict):
        dets = [dets.get(key) for key in gt.images]
    elif len(dets) != len(gt.images):
        raise WiderEvalError(f'{len(dets)} detection arrays for {len(gt.images)} ground-truth images')
    if arithmetic not in ARITHMETICS:
        raise ValueError(f'arithmetic must be one of {ARITHMETICS}, not {arithmetic!r}')
    raw, best_iou, best_face, span = _match_all(dets, gt, arithmetic)
    if span is not None and np.equal(*_score_span(*span, arithmetic)):
        _warn(warn, 'every prediction has the same score: scored as one operating point '
                    '(the official tools divide 0 by 0 here and report AP 0)')
    norm = normalise_scores(raw, *span, arithmetic) if span is not None else raw
    # First threshold index (0-based) at which each prediction is kept: t_j <= score for j >= start.
    start = THRESH_NUM - np.searchsorted(_THRESHOLDS_ASCENDING, norm, side='right')
    hit = best_iou >= IOU_THRESH
    hit_ids = np.flatnonzero(hit)
    _, first = np.unique(best_face[hit_ids], return_index=True)
    first_hit = np.zeros(len(raw), dtype=bool)
    first_hit[hit_ids[first]] = True
    aps, curves = {}, {}
    face_totals = gt.num_faces
    for setting in gt.counted:  # easy, medium, hard (or the settings of a GroundTruth built otherwise)
        counted = gt.counted[setting][best_face]
        proposal = ~(hit & ~counted)
        tp = first_hit & counted
        proposals = np.cumsum(np.bincount(start[proposal], minlength=THRESH_NUM + 1)[:THRESH_NUM])
        tps = np.cumsum(np.bincount(start[tp], minlength=THRESH_NUM + 1)[:THRESH_NUM])
        with np.errstate(divide='ignore', invalid='ignore'):
            precision = np.where(proposals > 0, tps / np.maximum(proposals, 1), 0.0)
        num_faces = face_totals[setting]
        recall = tps / num_faces if num_faces else np.zeros(THRESH_NUM)
        aps[setting] = voc_ap(recall, precision)
        curves[setting] = dict(precision=precision, recall=recall, thresholds=THRESHOLDS.copy(),
                               tp=tps, proposals=proposals, num_faces=num_faces)
    return aps, curves


def evaluate(pred_dir, gt, warn=None, return_curves=False, arithmetic='matlab'):
    """Evaluate a prediction directory against the val ground truth.

    Args:
        pred_dir: directory of ``<event>/<image name>.txt`` prediction files.
        gt: GroundTruth or the directory of the four official .mat files.
        warn: callable for one-line warnings (default ``warnings.warn``, WiderEvalWarning).
        return_curves: also return the PR curves (see ``evaluate_detections``).
        arithmetic: 'matlab' (default, the official tools' numbers) or 'double' (see ``ARITHMETICS``).
    Returns:
        ``{'easy': AP, 'medium': AP, 'hard': AP}``, or ``(aps, curves)`` with ``return_curves``.
    """
    if not isinstance(gt, GroundTruth):
        gt = load_ground_truth(gt)
    dets, _ = read_predictions(pred_dir, gt, warn=warn)
    if not any(d is not None and len(d) for d in dets):
        _warn(warn, f'the prediction files in {pred_dir} hold no detections: every AP is 0')
    aps, curves = evaluate_detections(dets, gt, warn=warn, arithmetic=arithmetic)
    return (aps, curves) if return_curves else aps


def plot_pr_curves(curves, aps, path, label=None):
    """Save the three precision-recall curves side by side to ``path`` (needs matplotlib);
    returns the figure. Each panel's title gives its AP (no legend, which would hide the
    curve of a weak detector, whose points lie at low recall).

    The file is written atomically; the format follows the extension (png, pdf, svg, ...).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 4.6))
    FigureCanvasAgg(fig)
    for ax, setting in zip(fig.subplots(1, len(SETTINGS)), SETTINGS):
        c = curves[setting]
        keep = c['proposals'] > 0
        name = f'{label} ' if label else ''
        ax.plot(c['recall'][keep], c['precision'][keep], linewidth=2)
        ax.set_title(f'WIDER FACE val - {setting}: {name}AP {aps[setting]:.4f}')
        ax.set_xlabel('Recall')
        ax.set_ylabel('Precision')
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=ext, dpi=110)
    return fig
