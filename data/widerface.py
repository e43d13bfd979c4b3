"""WIDER FACE: the official annotation parser, the list-file reader and the dataset.

Formats (docs/design.md#list-format; box coordinates: docs/design.md#coordinates):

* Official annotation file `wider_face_{train,val}_bbx_gt.txt`: a relative image path line,
  a face-count line, then `count` lines `x y w h blur expression illumination invalid
  occlusion pose` (pixels, top-left corner and size); an image with count 0 is followed by
  one line of ten zeros.
* List file (`data/face_train.txt`, written by prepare_wider_data.py), one image per line:
  `<image path> <n> x y w h 1 x y w h 1 ...` (pixels).

`WIDERDetection` returns `(image float32 [3, S, S], target float32 [n, 5])`: the image in RGB
order with `cfg.img_mean` subtracted (no scaling), target rows `(x1, y1, x2, y2, label)`
normalised to [0, 1] by the output size, label 1. With `normalize=False` the image is the
uint8 RGB image and the mean is subtracted later, on the device.
"""
import math
import os
import re
import sys
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from data.config import cfg
from utils.augmentations import TrainAugmentation, fallback_plan, val_transform
from utils.transforms import clip_boxes, to_tensor, to_uint8_tensor
from utils.cli import UserError
from utils.files.image_io import ImageReadError, load_rgb

__all__ = ['ATTRIBUTE_NAMES', 'AnnotationError', 'UnusableImageError', 'WiderAnnotation',
           'annotation_path',
           'image_root', 'read_text_lines', 'read_wider_annotations', 'read_face_list', 'WIDERDetection']

# The six per-face flags of the official annotation files, in their column order.
ATTRIBUTE_NAMES = ('blur', 'expression', 'illumination', 'invalid', 'occlusion', 'pose')


def annotation_path(dataset_dir, split):
    """The official annotation file of `split` ('train', 'val') under a WIDER FACE root."""
    return os.path.join(dataset_dir, 'wider_face_split', f'wider_face_{split}_bbx_gt.txt')


def image_root(dataset_dir, split):
    """The folder that the annotation files' image names are relative to."""
    return os.path.join(dataset_dir, f'WIDER_{split}', 'images')


class AnnotationError(UserError, ValueError):
    """A malformed annotation or list file; the message is `<file>:<line>: <reason>`."""

    def __init__(self, path, line, reason):
        where = f'{path}:{line}' if line else str(path)
        super().__init__(f'{where}: {reason}')
        self.path, self.line, self.reason = str(path), line, reason

    def __reduce__(self):
        return type(self), (self.path, self.line, self.reason)


class UnusableImageError(ValueError):
    """An image that reads fine but cannot be trained on: none of its listed faces lies inside
    it. The message is `<image path>: <reason>`."""

    def __init__(self, path, reason):
        super().__init__(f'{path}: {reason}')
        self.path, self.reason = str(path), str(reason)

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class WiderAnnotation(NamedTuple):
    """One image of an official annotation file.

    name: path relative to `WIDER_<split>/images`, e.g. '0--Parade/0_Parade_marchingband_1_465.jpg'.
    boxes: float32 [n, 4] (x, y, w, h) pixels, exactly as in the file (w or h may be 0).
    attributes: int32 [n, 6] blur, expression, illumination, invalid, occlusion, pose.
    line: line number of the path line (1-based).
    """
    name: str
    boxes: np.ndarray
    attributes: np.ndarray
    line: int


def read_text_lines(path):
    """The lines of a UTF-8 text file (a leading byte-order mark is dropped, as Windows editors
    write one); `AnnotationError` naming the line of a byte that is not UTF-8 or a file that
    cannot be read, `FileNotFoundError` when the file does not exist."""
    try:
        with open(path, 'rb') as handle:
            data = handle.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AnnotationError(path, 0, f'cannot read the file ({exc.strerror or exc})') from None
    if data.startswith(b'\xef\xbb\xbf'):
        data = data[3:]
    try:
        return data.decode('utf-8').splitlines()
    except UnicodeDecodeError as exc:
        line = data.count(b'\n', 0, exc.start) + 1
        raise AnnotationError(path, line, f'not UTF-8 text (byte 0x{data[exc.start]:02x})') from None


def _numbers(path, lineno, text, what, group=None):
    """The numbers of `text`; AnnotationError naming the first bad one (with its place among groups
    of `group` numbers, e.g. the face of a list line) rather than quoting a line of any length."""
    tokens = text.split()
    values = []
    for k, tok in enumerate(tokens):
        try:
            value = float(tok)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            where = f' (face {k // group + 1}, number {k % group + 1} of {group})' if group else ''
            kind = 'non-numeric field' if value is None else 'non-finite number (nan or inf)'
            raise AnnotationError(path, lineno, f'{kind} {tok[:20]!r} in {what}{where}')
        values.append(value)
    return values


def read_wider_annotations(path):
    """Parse an official WIDER FACE annotation file.

    Returns a list of `WiderAnnotation` in file order. Raises `AnnotationError` (naming the
    file and the line) on a missing count, a non-numeric field, a face line without ten
    numbers, or a file that ends inside an image's face list; `FileNotFoundError` when the
    file does not exist.
    """
    lines = read_text_lines(path)
    records = []
    i, total = 0, len(lines)
    while i < total:
        name = lines[i].strip()
        if not name:
            i += 1
            continue
        path_line = i + 1
        if i + 1 >= total or not lines[i + 1].strip():
            raise AnnotationError(path, i + 2, f'file ends before the face count of {name!r}')
        count_text = lines[i + 1].strip()
        try:
            count = int(count_text)
        except ValueError:
            raise AnnotationError(path, i + 2, f'expected the number of faces of {name!r}, '
                                               f'got {count_text!r}') from None
        if count < 0:
            raise AnnotationError(path, i + 2, f'negative face count {count}')
        i += 2
        rows = []
        for k in range(count):
            if i >= total:
                raise AnnotationError(path, total + 1, f'truncated: {name!r} declares {count} '
                                                      f'faces but the file ends after {k}')
            values = _numbers(path, i + 1, lines[i], 'a face line')
            if len(values) != 10:
                raise AnnotationError(path, i + 1, f'expected 10 numbers (x y w h blur expression '
                                                  f'illumination invalid occlusion pose), got {len(values)}')
            rows.append(values)
            i += 1
        if count == 0 and i < total:
            # The official files put one line of ten zeros after a count of 0.
            tokens = lines[i].split()
            if len(tokens) == 10 and all(re.fullmatch(r'-?[0-9.]+', t) for t in tokens):
                i += 1
        table = np.asarray(rows, dtype=np.float64).reshape(-1, 10)
        records.append(WiderAnnotation(name, table[:, :4].astype(np.float32),
                                       table[:, 4:].astype(np.int32), path_line))
    return records


_TOKEN = re.compile(r'\S+')


def _is_number(token):
    try:
        float(token)
    except ValueError:
        return False
    return True


def _parse_list_line(path, lineno, line):
    """One list-file line -> (image path, float32 [n, 5] x y w h label). The image path may
    contain spaces: it is everything before the count that makes the line consistent, and
    its last word is not a number (so a wrong count is reported, not read as a path)."""
    spans = [(m.start(), m.group()) for m in _TOKEN.finditer(line)]
    if len(spans) < 2:
        raise AnnotationError(path, lineno, 'expected "<image path> <n> x y w h 1 ...", '
                                            f'got {line.strip()!r}')
    for k in range(1, len(spans)):
        tok = spans[k][1]
        if k > 1 and _is_number(spans[k - 1][1]):
            continue
        if tok.isdigit() and len(spans) - k - 1 == 5 * int(tok):
            image = line[:spans[k][0]].strip()
            values = _numbers(path, lineno, ' '.join(t for _, t in spans[k + 1:]), 'a box', group=5)
            table = np.asarray(values, dtype=np.float32).reshape(-1, 5)
            labels = table[:, 4]
            bad = (labels != np.round(labels)) | (labels < 1) | (labels >= cfg.NUM_CLASSES)
            if bad.any():
                raise AnnotationError(path, lineno, f'face {int(np.argmax(bad)) + 1} has label '
                                                    f'{labels[bad][0]:g}; the labels are 1 to '
                                                    f'{cfg.NUM_CLASSES - 1} (1 = face)')
            return image, table
    # No consistent split: report the most likely cause.
    tok = spans[1][1]
    if not tok.isdigit():
        raise AnnotationError(path, lineno, f'expected the face count after the image path, got {tok!r}')
    raise AnnotationError(path, lineno, f'{int(tok)} faces need {5 * int(tok)} numbers after the '
                                        f'count, found {len(spans) - 2}')


def read_face_list(list_file):
    """Read a list file.

    Returns (paths: list[str], boxes: list of float32 [n, 5] (x1, y1, x2, y2, label) pixels).
    Blank lines and lines starting with '#' are ignored. Raises `AnnotationError` for a
    malformed line (file and line number) or a file without any image line,
    `FileNotFoundError` when it does not exist.
    """
    paths, boxes = [], []
    for lineno, line in enumerate(read_text_lines(list_file), 1):
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        image, table = _parse_list_line(list_file, lineno, line)
        table[:, 2] += table[:, 0]
        table[:, 3] += table[:, 1]
        paths.append(image)
        boxes.append(table)
    if not paths:
        raise AnnotationError(list_file, 0, 'no image line: the list file is empty '
                                            '(run prepare_wider_data.py to write it)')
    return paths, boxes


def _note(message):
    print(f'WIDERDetection: {message}', file=sys.stderr, flush=True)


class WIDERDetection(Dataset):
    """WIDER FACE detection dataset over a list file.

    Args:
        list_file: list file of prepare_wider_data.py.
        mode: 'train' (augmentation of utils/augmentations.py; images listed without a face
            are left out, with a count printed) or 'val' (plain resize, every image kept).
        input_size: side S of the square output (default cfg.INPUT_SIZE).
        seed: base seed of the training randomness.
        params: augmentation configuration (default data.config.cfg).
        normalize: True returns float32 images minus the mean; False returns the uint8 images
            (a quarter of the bytes for the loader workers to hand over) for
            `utils.transforms.subtract_mean` to finish on the device, which gives the
            same values. train.py uses False.

    `dataset[i]` or `dataset[(epoch, i)]` -> (image float32 [3, S, S] RGB minus cfg.img_mean,
    or uint8 [3, S, S] RGB with normalize=False, a channels-first view of the HWC image that
    `detection_collate`'s stack packs,
    target float32 [n, 5] rows (x1, y1, x2, y2, 1) normalised to [0, 1]). A training sample
    is a pure function of (seed, epoch, i): the epoch comes from the index tuple or else
    from `set_epoch`. A training sample always holds at least one face: when augmentation
    leaves none it is drawn again from a generator seeded with (seed, epoch, i, attempt),
    and after `cfg.resample_attempts` attempts a deterministic crop around the largest face
    is used. An image that cannot be read, or (in training) whose faces all lie outside it
    (`UnusableImageError`: it reads fine, and is not reported as unreadable), is replaced by
    another one chosen from (seed, epoch, i), warned about once per path and counted in
    `self.bad_images` (per process: each DataLoader worker counts its own). Faces that lie
    outside their image (less than a pixel inside) are left out, reported once per path and
    counted per path in `self.faces_outside` (per process too). Listed images that do not
    exist are counted when the dataset is built, with the first path printed
    (`self.missing_images`); `AnnotationError` when none of them exists.
    """

    def __init__(self, list_file, mode='train', input_size=None, seed=0, params=None, normalize=True):
        if mode not in ('train', 'val'):
            raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
        self.params = cfg if params is None else params
        self.list_file = str(list_file)
        self.mode = mode
        self.input_size = int(input_size if input_size is not None else self.params.INPUT_SIZE)
        self.seed = int(seed)
        self.epoch = 0
        self.max_attempts = int(self.params.resample_attempts)
        self.max_replacements = int(self.params.replacement_tries)
        self.mean = tuple(self.params.img_mean)
        self.normalize = bool(normalize)
        self.augment = TrainAugmentation(self.input_size, self.params) if mode == 'train' else None
        self.bad_images = {}
        self.faces_outside = {}

        paths, boxes = read_face_list(self.list_file)
        # Reported now rather than an epoch later. They stay in the dataset (and are replaced
        # when drawn): its length must not depend on what one machine's disk holds, since every
        # process of a distributed run builds its own copy and they must agree on the batches.
        exists = [os.path.isfile(p) for p in paths]
        self.missing_images = exists.count(False)
        if self.missing_images:
            first = paths[exists.index(False)]
            if self.missing_images == len(paths):
                raise AnnotationError(self.list_file, 0, f'none of its {len(paths)} images exists '
                                                         f'(first: {first}); were the images moved, or '
                                                         f'the list written on another machine?')
            _note(f'{self.list_file}: {self.missing_images} of {len(paths)} listed images do not '
                  f'exist (first: {first}); each is replaced by another image when drawn')
        bad_rows = 0
        for k, table in enumerate(boxes):
            ok = (table[:, 2] > table[:, 0]) & (table[:, 3] > table[:, 1])
            if not ok.all():
                bad_rows += int((~ok).sum())
                boxes[k] = table[ok]
        if bad_rows:
            _note(f'{self.list_file}: dropped {bad_rows} boxes with w <= 0 or h <= 0')
        self.num_without_face = 0
        if mode == 'train':
            keep = [k for k, table in enumerate(boxes) if len(table)]
            self.num_without_face = len(paths) - len(keep)
            if self.num_without_face:
                _note(f'{self.list_file}: {self.num_without_face} of {len(paths)} images have '
                      f'no face and are left out of training')
            if not keep:
                raise AnnotationError(self.list_file, 0, 'no image with a face to train on')
            paths = [paths[k] for k in keep]
            boxes = [boxes[k] for k in keep]
        # One flat array plus offsets: cheaper for forked DataLoader workers than many arrays.
        self.paths = paths
        counts = np.array([len(t) for t in boxes], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._boxes = np.concatenate(boxes, axis=0)

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch):
        """Epoch used by `dataset[i]` (an index `(epoch, i)` overrides it)."""
        self.epoch = int(epoch)

    # -- raw access --------------------------------------------------------------------------

    def pull_image(self, index):
        """uint8 [H, W, 3] RGB image of sample `index` (raises ImageReadError)."""
        return load_rgb(self.paths[index])

    def pull_anno(self, index):
        """float32 [n, 5] (x1, y1, x2, y2, label) in pixels of the original image, as listed."""
        return self._anno(index).copy()

    # -- samples -----------------------------------------------------------------------------

    def _anno(self, index):
        """View (never written to) of the listed boxes of sample `index` (see pull_anno)."""
        return self._boxes[self._offsets[index]:self._offsets[index + 1]]

    def _rng(self, *key):
        return np.random.default_rng([self.seed, *key])

    def _load(self, index):
        """(image, clipped boxes [n, 4], labels [n]) or raises ImageReadError."""
        path = self.paths[index]
        image = load_rgb(path)
        height, width = image.shape[:2]
        table = self._anno(index)
        # New arrays: the view stays intact. A face with less than a pixel inside the image
        # is not a face to learn or to validate on.
        boxes, keep = clip_boxes(table[:, :4], width, height, min_size=1.0)
        if self.mode == 'train' and len(boxes) == 0:
            raise UnusableImageError(path, f'none of its {len(table)} faces lies inside the {width}x{height} '
                                           f'image (the image reads fine: are the listed boxes those of '
                                           f'another image, or of another size of it?)')
        if len(keep) < len(table) and path not in self.faces_outside:
            self.faces_outside[path] = len(table) - len(keep)
            _note(f'{path}: {len(table) - len(keep)} of its {len(table)} faces lie outside the '
                  f'{width}x{height} image (less than a pixel inside) and are left out '
                  f'({len(self.faces_outside)} such images so far in this process)')
        return image, boxes, table[keep, 4]

    def _skip(self, index, exc):
        path = self.paths[index]
        if path not in self.bad_images:
            self.bad_images[path] = exc.reason
            kind = 'image without a face inside it' if isinstance(exc, UnusableImageError) else 'unreadable image'
            # One line: warn_explicit at a place without source, which the warning would quote.
            warnings.warn_explicit(f'skipping {kind} ({len(self.bad_images)} so far in this process): {exc}',
                                   RuntimeWarning, 'WIDERDetection', 0)

    def _target(self, boxes, labels):
        target = np.empty((len(boxes), 5), dtype=np.float32)
        target[:, :4] = boxes / self.input_size
        target[:, 4] = labels
        return torch.from_numpy(target)

    def __getitem__(self, index):
        if isinstance(index, (tuple, list)):
            epoch, index = index
        else:
            epoch = self.epoch
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} samples')
        if self.mode == 'train':
            return self._train_item(int(epoch), index)
        return self._val_item(index)

    def _image_tensor(self, image):
        return to_tensor(image, self.mean) if self.normalize else to_uint8_tensor(image)

    def _train_item(self, epoch, index):
        last_error = None
        for r in range(self.max_replacements):
            source = index if r == 0 else int(self._rng(epoch, index, r, 1).integers(len(self)))
            try:
                image, boxes, labels = self._load(source)
            except (ImageReadError, UnusableImageError) as exc:
                self._skip(source, exc)
                last_error = exc
                continue
            height, width = image.shape[:2]
            plan = None
            for attempt in range(self.max_attempts):
                candidate = self.augment.plan(boxes, width, height, self._rng(epoch, index, r, 0, attempt))
                if len(candidate.boxes):
                    plan = candidate
                    break
            if plan is None:
                plan = fallback_plan(self.augment, boxes, width, height)
            out, out_boxes = self.augment.render(image, plan)
            return self._image_tensor(out), self._target(out_boxes, labels[plan.keep])
        what = 'usable' if isinstance(last_error, UnusableImageError) else 'readable'
        raise UserError(f'{self.list_file}: no {what} training image found in '
                           f'{self.max_replacements} tries from sample {index}; last error: {last_error}')

    def _val_item(self, index):
        for r in range(len(self)):  # a missing event folder can be a long run of unreadable images
            source = (index + r) % len(self)
            try:
                image, boxes, labels = self._load(source)
            except ImageReadError as exc:
                self._skip(source, exc)
                continue
            out, out_boxes = val_transform(image, boxes, self.input_size)
            return self._image_tensor(out), self._target(out_boxes, labels)
        raise UserError(f'{self.list_file}: no readable image found from sample {index} on')
