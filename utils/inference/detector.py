"""Face detection with a test-phase S3FD: device set-up, preprocessing, scales, box conversion,
the S3FD multi-scale test with box voting, WIDER rows and drawing. Used by wider_test.py, demo.py
and benchmarks/bench_infer.py.

Coordinates
    Every box here is ``(x1, y1, x2, y2)`` in continuous pixel coordinates of the *original*
    image: pixel ``i`` covers ``[i, i + 1)``, so a box spanning the whole image is
    ``(0, 0, W, H)`` and its width is ``x2 - x1``. This is the frame the network is trained
    in (data/widerface.py turns an annotation ``x y w h`` into ``x1 = x, x2 = x + w``).
    Detection arrays are float32 ``[n, 5]`` rows ``(x1, y1, x2, y2, score)``, sorted by score,
    descending.

Input
    RGB uint8 ``[H, W, 3]`` (``utils.files.image_io.load_rgb``) resized as the reference test
    (S3FD.pytorch ``tools/wider_test.py``) resizes: ``cv2.resize(img, None, fx=s, fy=s)``
    with ``INTER_LINEAR`` (no resize at ``s == 1``). OpenCV then makes the image
    ``round(W * s) x round(H * s)`` (halves to even) and samples the source at
    ``x_src = (x + 0.5) / s - 0.5`` with the given ``s``, not with the rounded size over the
    original one; ``resize_rgb`` and ``scaled_size``. A mirrored pass mirrors the original
    image and then resizes it, as the reference. The resized image minus ``cfg.img_mean`` per
    channel, CHW float32, no scaling, is the network input. An input side under
    ``MIN_INPUT_SIDE`` (28, the smallest the network accepts; the reference fails there) is
    padded at the bottom/right with the mean colour (0 after mean subtraction); padding never
    moves a box.

Boxes
    The network's boxes are normalised to its input, and map back to the original image as
    the reference maps them: times the input size (the resized size, padding included), over
    ``s`` (``to_pixel_boxes``); a mirrored pass's box ``(x1, x2)`` then becomes
    ``(W - x2, W - x1)`` with ``W`` the original width. Every pass keeps scores >= ``thresh``.

Scales (WIDER FACE test of S3FD)
    ``max_shrink(h, w) = sqrt(1700 * 1200 / (h * w))`` is the largest scale whose input has at
    most 1700x1200 pixels; single-scale detection runs at ``min(1, max_shrink)``. ``max_size``
    (optional, a quick-run deviation) additionally caps the longer side of every pass.

Multi-scale test (``multi_scale_detect``), the S3FD / S3FD.pytorch WIDER protocol
    with ``m = max_shrink`` and ``s = min(1, m)``:
    1. the image at scale ``s`` and its horizontal mirror (one batch of two);
    2. a shrunk pass at ``0.5`` (``0.5 * m`` when ``m < 0.75``), keeping boxes whose longer
       side (pixel-inclusive, ``x2 - x1 + 1``) is over 30 px;
    3. an enlarged pass at ``min(2, m)`` when ``m > 1`` (else at the midpoint of the shrunk
       scale and ``m``), and when ``m > 2`` further passes at 4, 8, ... below ``m`` and one at
       ``m``; if the last of these scales is above 1 their boxes are kept when the shorter
       side is under 100 px, otherwise (all passes below 1) when the longer side is over 30 px;
    4. all boxes are merged by ``bbox_vote``.
    Single-scale detection (``single_scale_detect``) is the first pass without its mirror.

Box voting (``bbox_vote``)
    Boxes in descending score order (equal scores in pass order: a stable sort, where the
    reference's order of equal scores is whatever NumPy's unstable sort gives); the best
    remaining box and every remaining box with IoU >= 0.3 to it (pixel-inclusive ``+1`` IoU,
    as the reference and the WIDER tools) form a cluster and are removed; a cluster of two or
    more boxes yields one box whose coordinates are the score-weighted mean of the cluster
    and whose score is the best score; a cluster of a single box is dropped (the reference's
    consensus rule: a face must be found by at least two passes); at most 750 boxes are kept.
"""
import contextlib
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from s3fd import MIN_INPUT_SIDE
from utils.transforms import clip_boxes, mirror_boxes, subtract_mean
from utils.device import setup_device

OFFICIAL_MAX_PIXELS = 1700 * 1200
VOTE_IOU = 0.3
VOTE_TOP_K = 750
SHRUNK_MIN_SIDE = 30     # px, pixel-inclusive: shrunk passes keep boxes whose longer side is above
ENLARGED_MAX_SIDE = 100  # px, pixel-inclusive: enlarged passes keep boxes whose shorter side is below

__all__ = ['OFFICIAL_MAX_PIXELS', 'MIN_INPUT_SIDE', 'inference_device', 'max_shrink', 'single_scale',
           'resize_rgb', 'images_to_input', 'to_pixel_boxes', 'Detector', 'bbox_vote', 'multi_scale_plan',
           'to_wider_rows', 'draw_detections']


# ----------------------------------------------------------------------------- device

def inference_device(name, device_id=0, amp='off', fixed_size=False):
    """The Runtime of an inference script (``utils.device.setup_device``, which raises
    DeviceUnavailable with a one-line message).

    Args:
        name, device_id: ``--device`` ('gpu', 'npu', 'cpu'; None: 'gpu' when CUDA is
            available, else 'cpu') and ``--device_id``.
        amp: 'off' (float32), 'bf16' or 'fp16' (the network autocast in that precision).
        fixed_size: every input has the same size. Otherwise cuDNN autotuning is turned
            off: it would tune again for every new image size.
    """
    if name is None:
        name = 'gpu' if torch.cuda.is_available() else 'cpu'
    runtime = setup_device(name, device_id, amp='off' if amp == 'off' else 'native',
                       amp_dtype='fp16' if amp == 'fp16' else 'bf16')
    if runtime.type == 'cuda' and not fixed_size:
        torch.backends.cudnn.benchmark = False
    return runtime


# ----------------------------------------------------------------------------- scales

def max_shrink(height, width, max_pixels=OFFICIAL_MAX_PIXELS, max_size=None):
    """Largest scale for an image of ``height x width``: ``sqrt(max_pixels / (h * w))``,
    further capped so that the longer side is at most ``max_size`` when given."""
    scale = math.sqrt(max_pixels / float(height * width))
    if max_size:
        scale = min(scale, max_size / float(max(height, width)))
    return scale


def single_scale(height, width, max_size=None):
    """Scale of the single-scale test: never enlarges, shrinks to the 1700x1200 budget
    (and to ``max_size`` on the longer side when given)."""
    return min(1.0, max_shrink(height, width, max_size=max_size))


def scaled_size(height, width, scale):
    """``(h', w')`` of the image resized by ``scale``: OpenCV's size for ``fx = fy = scale``,
    ``h * scale`` and ``w * scale`` rounded to the nearest integer, halves to even (``cvRound``;
    Python's ``round`` rounds the same way), and at least 1 (where OpenCV raises)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_rgb(rgb, scale):
    """Resize ``rgb`` uint8 ``[H, W, 3]`` by ``scale`` as the reference test does:
    ``cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)``, and no
    resize at ``scale == 1``. The output is ``scaled_size(H, W, scale)`` and samples the source
    on the grid of ``scale`` itself (``x_src = (x + 0.5) / scale - 0.5``), which differs from
    the grid of an explicit output size (``w' / W``) whenever ``W * scale`` is not an integer.
    Returns the input itself when the size does not change (OpenCV copies it then). Where a
    side would round to 0 (OpenCV raises) it is 1, resized to that size.
    """
    h, w = rgb.shape[:2]
    if scale == 1:
        return rgb
    nh, nw = scaled_size(h, w, scale)
    if (nh, nw) == (h, w):
        return rgb
    if round(h * scale) >= 1 and round(w * scale) >= 1:
        return cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------- network I/O

def images_to_input(images, device='cpu'):
    """Stack same-size RGB uint8 images into the network input.

    Args:
        images: list of uint8 ``[h, w, 3]`` arrays (or one array), all of the same size.
        device: where the tensor goes (the uint8 data is moved first: 4x less to copy).
    Returns:
        float32 ``[B, 3, H, W]``: RGB minus ``cfg.img_mean``, with ``H, W >= MIN_INPUT_SIDE``
        (mean-colour padding at the bottom/right where the images are smaller). The tensor is
        channels-last in memory: the stacked ``[B, H, W, 3]`` images seen as NCHW, with no
        reordering copy. The convolutions take it as it is, and on the CPU run faster on it
        than on an NCHW-contiguous copy (about 0.55 vs 0.75 s per 640x480 image on 2 threads).
    """
    if isinstance(images, np.ndarray):
        images = [images]
    if len({im.shape for im in images}) != 1:
        raise ValueError(f'images_to_input needs images of one size, got {sorted({im.shape for im in images})}')
    batch = torch.from_numpy(np.stack(images))
    batch = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)   # NHWC data seen as NCHW
    batch = subtract_mean(batch, memory_format=torch.channels_last)
    h, w = batch.shape[-2:]
    if h < MIN_INPUT_SIDE or w < MIN_INPUT_SIDE:
        batch = F.pad(batch, (0, max(0, MIN_INPUT_SIDE - w), 0, max(0, MIN_INPUT_SIDE - h)))
    return batch


def _per_image(value, batch):
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f'expected {batch} values, one per image, got {len(value)}')
        return list(value)
    return [value] * batch


def to_pixel_boxes(output, input_hw, scale, thresh=0.0, mirror_width=None):
    """Convert test-phase network output to pixel boxes of the original images, as the
    reference test does: normalised box times the input size, over the scale.

    Args:
        output: ``[B, num_classes, K, 5]`` from ``build_s3fd('test')``: rows
            ``(score, x1, y1, x2, y2)`` normalised to the input tensor, zero-padded.
        input_hw: ``(H, W)`` of the input tensor: the resized images' size, or the padded
            size where they were smaller than ``MIN_INPUT_SIDE`` (top-left aligned, so
            padding maps to the same pixels).
        scale: the scale the images were resized by (one for all, or a list of B).
        thresh: keep scores >= thresh (padding rows, score 0, are always dropped).
        mirror_width: optional list of B entries: ``None`` for an image as it is, the
            original width ``W`` for a mirrored image, whose boxes are mirrored back
            (``x1, x2 -> W - x2, W - x1``).
    Returns:
        list of B float32 ``[n, 5]`` arrays ``(x1, y1, x2, y2, score)`` in original pixels,
        sorted by score (descending, ties in network order). Boxes are not clipped.
    """
    faces = output[:, 1].float().cpu().numpy()           # [B, K, 5]
    batch = faces.shape[0]
    scales = _per_image(scale, batch)
    widths = _per_image(mirror_width, batch)
    in_h, in_w = input_hw
    size = np.array([in_w, in_h, in_w, in_h], dtype=np.float32)
    result = []
    for b in range(batch):
        rows = faces[b]
        rows = rows[(rows[:, 0] > 0) & (rows[:, 0] >= thresh)]
        boxes = rows[:, [1, 2, 3, 4, 0]]
        # normalised -> input pixels (float32, as the reference) -> original pixels (/ scale).
        boxes[:, :4] = (boxes[:, :4] * size) / float(scales[b])
        if widths[b] is not None:
            boxes = mirror_boxes(boxes, widths[b])
        result.append(boxes[np.argsort(-boxes[:, 4], kind='stable')])
    return result


class Detector:
    """A test-phase S3FD on a device, with the preprocessing and the post-processing.

    Args:
        net: ``build_s3fd('test')`` network (eval mode, on ``device``).
        device: torch.device or string.
        thresh: per-pass score threshold (rows below are dropped).
        max_size: optional cap of the longer input side of every pass (a speed deviation).
        autocast: context-manager factory wrapped around the network (``Runtime.autocast``;
            default: none).
    """

    def __init__(self, net, device='cpu', thresh=0.05, max_size=None, autocast=contextlib.nullcontext):
        self.net = net
        self.device = torch.device(device)
        self.thresh = thresh
        self.max_size = max_size
        self.autocast = autocast

    @torch.inference_mode()
    def forward(self, batch):
        """Network output ``[B, 2, K, 5]`` for an input batch (see ``images_to_input``)."""
        with self.autocast():
            return self.net(batch)

    def detect_resized(self, images, scale, mirror_width=None):
        """Detections for same-size images already resized by ``resize_rgb``.

        Args:
            images: list of uint8 ``[h', w', 3]`` arrays of one size.
            scale: the scale each was resized by (one for all, or one per image).
            mirror_width: optional, one per image: ``None``, or the original width of an
                image that is a mirrored original (its boxes are mirrored back).
        Returns:
            list of float32 ``[n, 5]`` arrays (``(x1, y1, x2, y2, score)``, original pixels),
            one per image.
        """
        batch = images_to_input(images, self.device)
        out = self.forward(batch)
        return to_pixel_boxes(out, tuple(batch.shape[-2:]), scale, self.thresh, mirror_width)

    def detect_at_scale(self, rgb, scale, flip=False):
        """Detections for one image at ``scale``; with ``flip`` also for its mirror (the
        original mirrored, then resized; one batch of two) and returns (normal, mirrored)."""
        images = [resize_rgb(rgb, scale)]
        if flip:
            images.append(resize_rgb(cv2.flip(rgb, 1), scale))
        dets = self.detect_resized(images, scale, [None, rgb.shape[1]] if flip else None)
        return tuple(dets) if flip else dets[0]

    def single_scale_detect(self, rgb):
        """Single-scale test: float32 ``[n, 5]`` ``(x1, y1, x2, y2, score)``, <= cfg.TOP_K rows."""
        return self.detect_at_scale(rgb, single_scale(*rgb.shape[:2], max_size=self.max_size))

    def multi_scale_detect(self, rgb):
        """The S3FD multi-scale + flip test merged by box voting (module docstring)."""
        plan = multi_scale_plan(*rgb.shape[:2], max_size=self.max_size)
        det0, det1 = self.detect_at_scale(rgb, plan['base'], flip=True)
        det_s = self.detect_at_scale(rgb, plan['shrink'])
        det_s = det_s[pixel_sides(det_s).max(axis=1) > SHRUNK_MIN_SIDE]
        det_b = np.concatenate([self.detect_at_scale(rgb, s) for s in plan['enlarge']])
        if plan['enlarge_keeps_small']:
            det_b = det_b[pixel_sides(det_b).min(axis=1) < ENLARGED_MAX_SIDE]
        else:
            det_b = det_b[pixel_sides(det_b).max(axis=1) > SHRUNK_MIN_SIDE]
        return bbox_vote(np.concatenate([det0, det1, det_s, det_b]))

    def detect(self, rgb, mode='single'):
        """``single_scale_detect`` or ``multi_scale_detect`` by ``mode`` ('single', 'multiscale')."""
        if mode == 'single':
            return self.single_scale_detect(rgb)
        if mode == 'multiscale':
            return self.multi_scale_detect(rgb)
        raise ValueError(f"mode must be 'single' or 'multiscale', not {mode!r}")


def multi_scale_plan(height, width, max_size=None):
    """Scales of the S3FD multi-scale test for an image of ``height x width``.

    Returns a dict: ``base`` (scale of the normal and mirrored passes), ``shrink`` (the
    shrunk pass), ``enlarge`` (list of scales of the enlarged passes) and
    ``enlarge_keeps_small`` (True: the enlarged passes keep small boxes, False: big ones).
    """
    m = max_shrink(height, width, max_size=max_size)
    shrink = 0.5 if m >= 0.75 else 0.5 * m
    big = min(2.0, m) if m > 1 else (shrink + m) / 2
    enlarge = [big]
    if m > 2:
        big *= 2
        while big < m:
            enlarge.append(big)
            big *= 2
        enlarge.append(m)
    return dict(base=min(1.0, m), shrink=shrink, enlarge=enlarge, enlarge_keeps_small=big > 1)


def pixel_sides(dets):
    """``[n, 2]`` pixel-inclusive widths and heights (``x2 - x1 + 1``, ``y2 - y1 + 1``)."""
    return np.stack((dets[:, 2] - dets[:, 0] + 1, dets[:, 3] - dets[:, 1] + 1), axis=1)


# ----------------------------------------------------------------------------- box voting

def bbox_vote(dets, iou_thresh=VOTE_IOU, top_k=VOTE_TOP_K, keep_single=False):
    """Merge overlapping detections by score-weighted box voting (module docstring).

    Args:
        dets: float ``[n, 5]`` rows ``(x1, y1, x2, y2, score)`` in any order.
        iou_thresh: boxes with pixel-inclusive IoU >= this to a cluster's best box join it.
        top_k: keep at most this many merged boxes (the best ones).
        keep_single: keep clusters of one box unchanged (the reference drops them).
    Returns:
        float32 ``[m, 5]``: merged boxes, sorted by score (descending).
    """
    dets = np.asarray(dets, dtype=np.float32).reshape(-1, 5)
    dets = dets[np.argsort(-dets[:, 4], kind='stable')]
    n = len(dets)
    boxes = torch.from_numpy(dets[:, :4].astype(np.float64))
    boxes[:, 2:] += 1  # x2 + 1, y2 + 1: box_iou then computes the (x2 - x1 + 1) convention
    remaining = np.ones(n, dtype=bool)
    merged = []
    chunk = max(1, min(n, 2 ** 20 // max(n, 1)))  # IoU rows computed at once (~2^20 pairs, tens of MB)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        overlap = (box_iou(boxes[start:stop], boxes) >= iou_thresh).numpy()
        for i in range(start, stop):
            if not remaining[i]:
                continue
            members = remaining & overlap[i - start]
            members[i] = True
            remaining &= ~members
            if members.sum() < 2 and not keep_single:
                continue
            cluster = dets[members].astype(np.float64)
            weights = cluster[:, 4:5]
            box = (cluster[:, :4] * weights).sum(axis=0) / weights.sum()
            merged.append(np.append(box, dets[i, 4]))
            if len(merged) >= top_k:
                return np.asarray(merged, dtype=np.float32)
    return np.asarray(merged, dtype=np.float32).reshape(-1, 5)


# ----------------------------------------------------------------------------- output

def to_wider_rows(dets, height, width):
    """WIDER prediction rows for one image.

    Args:
        dets: float ``[n, 5]`` ``(x1, y1, x2, y2, score)`` in original pixels.
        height, width: the image size.
    Returns:
        float64 ``[m, 5]`` rows ``(x, y, w, h, score)`` sorted by score: boxes clipped to the
        image, ``w = x2 - x1`` and ``h = y2 - y1`` (the annotation convention the network is
        trained on; the evaluator adds the pixel-inclusive +1 to predictions and faces
        alike); boxes with no area inside the image are dropped.
    """
    dets = np.asarray(dets, dtype=np.float32).reshape(-1, 5)
    clipped, keep = clip_boxes(dets[:, :4], width, height)
    clipped = clipped.astype(np.float64)
    rows = np.column_stack((clipped[:, :2], clipped[:, 2:] - clipped[:, :2], dets[keep, 4]))
    return rows[np.argsort(-rows[:, 4], kind='stable')]


def draw_detections(rgb, dets, thresh=0.0, color=(0, 255, 0)):
    """Copy of ``rgb`` (uint8 ``[H, W, 3]``) with every box of score >= ``thresh`` drawn and
    labelled with its score. Returns ``(image, number of boxes drawn)``."""
    image = rgb.copy()  # C order
    h, w = image.shape[:2]
    dets = np.asarray(dets, dtype=np.float32).reshape(-1, 5)
    dets = dets[dets[:, 4] >= thresh]   # a new array: clipped in place below
    # Not utils.augmentations.clip_boxes: it drops the boxes left without area inside the
    # image, and those are still drawn (as a line) and counted here.
    np.clip(dets[:, 0:4:2], 0, w, out=dets[:, 0:4:2])
    np.clip(dets[:, 1:4:2], 0, h, out=dets[:, 1:4:2])
    thickness = max(1, int(round(max(h, w) / 400)))
    font_scale = max(0.35, max(h, w) / 1600)
    for x1, y1, x2, y2, score in dets.tolist():
        p1 = (int(round(x1)), int(round(y1)))
        p2 = (max(p1[0], int(round(x2)) - 1), max(p1[1], int(round(y2)) - 1))
        cv2.rectangle(image, p1, p2, color, thickness)
        label = f'{score:.2f}'
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = p1[1] - th - base - 2 if p1[1] - th - base - 2 >= 0 else p1[1]
        cv2.rectangle(image, (p1[0], top), (p1[0] + tw + 2, top + th + base + 2), color, -1)
        cv2.putText(image, label, (p1[0] + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return image, len(dets)
