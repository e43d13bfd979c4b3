"""Face detection over a list of image files: decoding in worker processes, single-scale
passes batched by input size, unreadable images reported instead of raised. Used by
wider_test.py and by the AP evaluation during training (utils/training/val_ap.py).

    for index, dets, hw, error in detect_files(detector, paths, mode='single', batch_size=4):
        ...  # dets: float32 [n, 5] (x1, y1, x2, y2, score) in pixels of the original image
"""
import cv2
import torch
from torch.utils.data import DataLoader

from utils.files.image_io import ImageReadError, load_rgb
from utils.inference.detector import resize_rgb, single_scale


class _DecodedImages:
    """Map-style dataset: decodes (and for the single-scale test resizes) image `index`;
    returns (index, rgb, original hw, scale or None, None), or (index, None, None, None,
    message) when it cannot be read."""

    def __init__(self, paths, resize, max_size):
        self.paths = paths
        self.resize = resize
        self.max_size = max_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            rgb = load_rgb(self.paths[index])
        except ImageReadError as exc:
            return index, None, None, None, str(exc)
        hw = rgb.shape[:2]
        scale = single_scale(*hw, max_size=self.max_size) if self.resize else None
        if self.resize:
            rgb = resize_rgb(rgb, scale)
        return index, rgb, hw, scale, None


def _as_is(sample):
    return sample


def detect_files(detector, paths, mode='single', batch_size=1, workers=2, option='--workers'):
    """Detect faces in every file of `paths`; yields `(index, dets, hw, error)` per file, in
    no fixed order: `dets` float32 [n, 5] `(x1, y1, x2, y2, score)` in original pixels and
    `hw` the original size, or `dets`, `hw` None and `error` the message of an image that
    cannot be read.

    mode 'single': images are resized by the detector's single-scale rule (its `max_size`
    applies) in the workers, and images of one input size run `batch_size` at a time, which
    gives the same boxes as one at a time. 'multiscale': one image at a time. `workers` decoding
    processes, at most the CPU cores this process may use (`option` names the setting in the
    line that says so; data.factory.usable_workers).
    """
    from data.factory import usable_workers

    single = mode == 'single'
    workers = usable_workers(workers, option)
    if workers > 0:
        # The worker processes decode in parallel already; a forked worker whose parent used
        # OpenCV's thread pool can deadlock inside OpenCV, so the parent runs it single-threaded.
        cv2.setNumThreads(1)
    # A generator of its own: the loader draws its workers' base seed from it, not from the global
    # RNG, so that detecting during training leaves the training's random state as it was.
    loader = DataLoader(_DecodedImages(paths, single, detector.max_size), batch_size=None, shuffle=False,
                        num_workers=workers, collate_fn=_as_is, generator=torch.Generator())
    pending = {}  # input size -> [(index, resized image, original hw, scale)], oldest size first
    max_pending = 4 * batch_size

    def flush(key):
        group = pending.pop(key)
        dets = detector.detect_resized([g[1] for g in group], [g[3] for g in group])
        return [(index, d, hw, None) for (index, _, hw, _), d in zip(group, dets)]

    for index, rgb, hw, scale, error in loader:
        if error is not None:
            yield index, None, None, error
            continue
        if not single:
            yield index, detector.detect(rgb, mode), hw, None
            continue
        key = rgb.shape
        pending.setdefault(key, []).append((index, rgb, hw, scale))
        if len(pending[key]) >= batch_size:
            yield from flush(key)
        elif sum(len(g) for g in pending.values()) >= max_pending:
            yield from flush(next(iter(pending)))
    while pending:
        yield from flush(next(iter(pending)))

