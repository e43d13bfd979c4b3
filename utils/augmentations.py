"""Training and validation transforms of S3FD, on uint8 NumPy images with OpenCV.

Coordinates: boxes are float32 [n, 4] pixel (x1, y1, x2, y2), continuous (a box covering
pixels 0..9 is (0, 0, 10, 10)); images are uint8 [H, W, 3] RGB.

Training sample (docs/design.md#augmentation), decided first as a `CropPlan` from the boxes
and the image size only, then rendered:

1. Geometry. With probability `data_anchor_sampling_prob`, data-anchor-sampling: a random
   face of side s = sqrt(w h), its nearest anchor among `cfg.ANCHOR_SIZES`, a target anchor
   drawn from the anchors up to one above it (index at most 5), scale
   ratio = target / s * 2^U(-1, 1), and an input_size x input_size window (at that scale)
   placed so that it holds the face; a trial is accepted when some face lies fully inside
   the window or overlaps it with IoU > 0.7 (`sampling_trials` trials). Otherwise (or when no
   trial is accepted) the SSD square samplers: one of scale 1.0 and five of scale
   U(0.3, 1.0), each a square of side scale * min(H, W) inside the image holding at least one
   whole face (`sampling_trials` trials each); one successful sampler is picked at random.
   When none succeeds the whole image is taken, padded to a square.
   Every window is square, so the aspect ratio never changes; where a window leaves the image
   the output is padded with `cfg.img_mean`.
2. Faces whose centre lies in the window are kept, clipped to it, mapped to the output, and
   dropped when their side sqrt(w * h) is under `min_face_size` output pixels (the
   reference's area rule: a 5x8 face stays, a 4x8 one goes).
3. Rendering crops the source region first and resizes only that region (random
   interpolation), then applies the photometric distortion to the image part of the output
   (brightness, contrast, saturation, hue, each with its probability, in one of two orders;
   the mean padding stays exact), then mirrors with probability `mirror_prob`.

Randomness comes only from the numpy Generator passed in; a plan is a pure function of
(boxes, image size, generator state), and rendering a plan is deterministic.

Differences from the reference port, on purpose: crops are taken before resizing (the
reference rescales the whole image first), no crop changes the aspect ratio, the face side
of data-anchor-sampling is sqrt(w h) (the reference's operator precedence made it
sqrt(w + h + 1)), saturation and hue act in OpenCV's HSV space (full 0..255 hue range) and
the contrast pivot is the mean luminance estimated from channel means, and the
interpolations are OpenCV's (`cfg.resize_interpolations`; Lanczos is left out by default
for speed).
"""
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

from data.config import cfg as default_cfg
from utils.transforms import clip_boxes, mirror_boxes

__all__ = ['CropPlan', 'INTERPOLATIONS', 'TrainAugmentation', 'train_transform', 'distort_image',
           'val_transform', 'fallback_plan']

INTERPOLATIONS = {
    'linear': cv2.INTER_LINEAR,
    'cubic': cv2.INTER_CUBIC,
    'area': cv2.INTER_AREA,
    'nearest': cv2.INTER_NEAREST,
    'lanczos': cv2.INTER_LANCZOS4,
}

# RGB -> luma weights (ITU-R 601, the ones PIL and OpenCV use for grayscale).
_LUMA = np.array([0.299, 0.587, 0.114])
_RAMP = np.arange(256, dtype=np.float64)  # identity lookup table


@dataclass(frozen=True, eq=False)
class CropPlan:
    """Everything random about one training sample.

    kind: 'anchor' (data-anchor-sampling), 'square' (SSD sampler), 'whole' (no sampler
        succeeded: the whole image padded to a square) or 'fallback' (see `fallback_plan`).
    window: (x0, y0, side) the square window in source pixels; may extend past the image.
    src: (x0, y0, x1, y1) the part of the source image inside the window (integers).
    dst: (x0, y0, x1, y1) where that part lands in the output (integers).
    boxes: float32 [m, 4] kept faces in output pixels, before mirroring.
    keep: int64 [m] index of each kept face in the input boxes.
    interpolation: OpenCV interpolation flag of the resize.
    distort: None or (order, brightness, contrast, saturation, hue), each factor None when
        that distortion does not fire; order 0 = B, C, S, H and order 1 = B, S, H, C.
    mirror: flip horizontally after everything else.
    face, anchor, jitter: data-anchor-sampling only (-1, 0, 0.0 otherwise): the chosen
        face, the target anchor size and the exponent of the 2^U(-1, 1) factor.
    """
    kind: str
    window: tuple
    src: tuple
    dst: tuple
    boxes: np.ndarray
    keep: np.ndarray
    interpolation: int
    distort: tuple
    mirror: bool
    size: int
    face: int = -1
    anchor: float = 0.0
    jitter: float = 0.0

    @property
    def scale(self):
        """Output pixels per source pixel."""
        return self.size / self.window[2]


def _interpolation_flags(params):
    try:
        return [INTERPOLATIONS[name] for name in params.resize_interpolations]
    except KeyError as exc:
        raise ValueError(f'unknown interpolation {exc} in cfg.resize_interpolations; '
                         f'choose from {sorted(INTERPOLATIONS)}') from None


def _inside(boxes, windows):
    """[T, n] True where box n lies entirely in window t (x0, y0, side)."""
    x0 = windows[:, 0:1]
    y0 = windows[:, 1:2]
    side = windows[:, 2:3]
    return ((boxes[:, 0] >= x0) & (boxes[:, 1] >= y0)
            & (boxes[:, 2] <= x0 + side) & (boxes[:, 3] <= y0 + side))


class TrainAugmentation:
    """The S3FD training transform (see the module docstring).

    Args:
        input_size: side S of the square output.
        params: configuration with the augmentation values of `data.config.cfg`
            (default: that cfg). Read once at construction.
    """

    def __init__(self, input_size=None, params=None):
        p = default_cfg if params is None else params
        self.size = int(input_size if input_size is not None else p.INPUT_SIZE)
        self.fill = tuple(int(round(float(m))) for m in p.img_mean)  # uint8 padding colour
        self.anchors = np.asarray(p.ANCHOR_SIZES, dtype=np.float64)
        self.apply_distort = bool(p.apply_distort)
        self.distort_probs = (p.brightness_prob, p.contrast_prob, p.saturation_prob, p.hue_prob)
        self.distort_deltas = (p.brightness_delta, p.contrast_delta, p.saturation_delta, p.hue_delta)
        self.anchor_sampling = bool(p.anchor_sampling)
        self.das_prob = float(p.data_anchor_sampling_prob)
        self.das_accept_iou = float(p.das_accept_iou)
        self.trials = int(p.sampling_trials)
        self.sampler_scales = np.asarray(p.ssd_sampler_scales, dtype=np.float64).reshape(-1, 2)
        self.min_face = float(p.min_face_size) if p.filter_min_face else 0.0
        self.mirror_prob = float(p.mirror_prob)
        self.interpolations = _interpolation_flags(p)

    # -- planning (boxes and sizes only, no pixels) ---------------------------------------

    def plan(self, boxes, width, height, rng):
        """Draw a CropPlan for an image of `width` x `height` holding `boxes` [n, 4] (n >= 1,
        clipped to the image, positive size). The plan may keep no face (then draw again)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            raise ValueError('a training sample needs at least one face')
        use_das = self.anchor_sampling and rng.random() < self.das_prob
        geometry = None
        if use_das:
            geometry = self._anchor_window(boxes, width, height, rng)
        if geometry is None:
            geometry = self._square_window(boxes, width, height, rng)
        kind, window, face, anchor, jitter = geometry
        interpolation = self.interpolations[int(rng.integers(len(self.interpolations)))]
        distort = self._draw_distortion(rng)
        mirror = bool(rng.random() < self.mirror_prob)
        return self._finish(boxes, width, height, kind, window, interpolation, distort, mirror,
                            face, anchor, jitter)

    def _anchor_window(self, boxes, width, height, rng):
        """Data-anchor-sampling window, or None when no trial is accepted."""
        face = int(rng.integers(len(boxes)))
        fx1, fy1, fx2, fy2 = (float(v) for v in boxes[face])
        fw, fh = fx2 - fx1, fy2 - fy1
        side = np.sqrt(fw * fh)
        nearest = int(np.argmin(np.abs(self.anchors - side)))
        top = min(nearest + 1, len(self.anchors) - 1)
        anchor = float(self.anchors[int(rng.integers(top + 1))])
        jitter = float(rng.uniform(-1.0, 1.0))
        ratio = anchor / side * 2.0 ** jitter
        win = max(1, int(round(self.size / ratio)))
        u = rng.random((self.trials, 2))
        if win < max(width, height):
            # Place the window over the chosen face (inside it when the face is larger).
            lo_x, hi_x = (fx2 - win, fx1) if fw <= win else (fx1, fx2 - win)
            lo_y, hi_y = (fy2 - win, fy1) if fh <= win else (fy1, fy2 - win)
        else:
            # The whole image fits in the window: place the image inside it.
            lo_x, hi_x = width - win, 0
            lo_y, hi_y = height - win, 0
        x0 = np.floor(lo_x + u[:, 0] * (hi_x - lo_x))
        y0 = np.floor(lo_y + u[:, 1] * (hi_y - lo_y))
        windows = np.stack([x0, y0, np.full_like(x0, win)], axis=1)
        ok = _inside(boxes, windows).any(axis=1)
        if not ok.all():
            corners = np.concatenate([windows[:, :2], windows[:, :2] + windows[:, 2:]], axis=1)
            iou = box_iou(torch.from_numpy(corners), torch.from_numpy(boxes).double()).numpy()
            ok |= (iou > self.das_accept_iou).any(axis=1)
        hits = np.flatnonzero(ok)
        if len(hits) == 0:
            return None
        t = hits[0]
        return 'anchor', (int(x0[t]), int(y0[t]), win), face, anchor, jitter

    def _square_window(self, boxes, width, height, rng):
        """SSD square samplers; the whole image padded to a square when none succeeds."""
        num = len(self.sampler_scales)
        lo = self.sampler_scales[:, 0:1]
        hi = self.sampler_scales[:, 1:2]
        u = rng.random((3, num, self.trials))
        short = min(width, height)
        sides = np.maximum(1.0, np.floor((lo + u[0] * (hi - lo)) * short))
        x0 = np.floor(u[1] * (width - sides))
        y0 = np.floor(u[2] * (height - sides))
        windows = np.stack([x0, y0, sides], axis=-1).reshape(-1, 3)
        ok = _inside(boxes, windows).any(axis=1).reshape(num, self.trials)
        found = ok.any(axis=1)
        first = ok.argmax(axis=1)
        choices = np.flatnonzero(found)
        pick = int(rng.integers(max(1, len(choices))))
        if len(choices) == 0:
            win = max(width, height)
            x0w = int(np.floor(rng.random() * (width - win)))
            y0w = int(np.floor(rng.random() * (height - win)))
            return 'whole', (x0w, y0w, win), -1, 0.0, 0.0
        s = choices[pick]
        t = first[s]
        return ('square', (int(x0[s, t]), int(y0[s, t]), int(sides[s, t])), -1, 0.0, 0.0)

    def _draw_distortion(self, rng):
        u = rng.random(5)
        d = rng.uniform(-1.0, 1.0, 4)
        if not self.apply_distort:
            return None
        factors = []
        for k in range(4):
            if u[k + 1] < self.distort_probs[k]:
                delta = d[k] * self.distort_deltas[k]
                factors.append(float(delta) if k == 3 else float(1.0 + delta))
            else:
                factors.append(None)
        if all(f is None for f in factors):
            return None
        return (int(u[0] < 0.5),) + tuple(factors)

    def _finish(self, boxes, width, height, kind, window, interpolation, distort, mirror,
                face=-1, anchor=0.0, jitter=0.0):
        s = self.size
        x0, y0, win = window
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + win, width), min(y0 + win, height)
        scale = s / win
        dx0 = min(s - 1, int(round((sx0 - x0) * scale)))
        dy0 = min(s - 1, int(round((sy0 - y0) * scale)))
        dx1 = min(s, max(dx0 + 1, int(round((sx1 - x0) * scale))))
        dy1 = min(s, max(dy0 + 1, int(round((sy1 - y0) * scale))))
        # Boxes follow the pixels exactly: map the source region onto the destination one.
        kx = (dx1 - dx0) / max(sx1 - sx0, 1)
        ky = (dy1 - dy0) / max(sy1 - sy0, 1)
        cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
        cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
        inside = (cx >= x0) & (cx < x0 + win) & (cy >= y0) & (cy < y0 + win)
        keep = np.flatnonzero(inside)
        out = boxes[keep].astype(np.float64)
        np.clip(out[:, 0::2], sx0, sx1, out=out[:, 0::2])
        np.clip(out[:, 1::2], sy0, sy1, out=out[:, 1::2])
        out[:, 0::2] = (out[:, 0::2] - sx0) * kx + dx0
        out[:, 1::2] = (out[:, 1::2] - sy0) * ky + dy0
        out_w, out_h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
        big = (out_w > 1e-6) & (out_h > 1e-6) & (out_w * out_h >= self.min_face ** 2)
        return CropPlan(kind=kind, window=(int(x0), int(y0), int(win)),
                        src=(int(sx0), int(sy0), int(sx1), int(sy1)),
                        dst=(dx0, dy0, dx1, dy1), boxes=out[big].astype(np.float32),
                        keep=keep[big], interpolation=interpolation, distort=distort,
                        mirror=mirror, size=s, face=face, anchor=anchor, jitter=jitter)

    # -- rendering --------------------------------------------------------------------------

    def render(self, image, plan):
        """Apply a plan to the image it was drawn for.

        Returns (uint8 [S, S, 3] RGB, float32 [m, 4] boxes in output pixels).
        """
        sx0, sy0, sx1, sy1 = plan.src
        dx0, dy0, dx1, dy1 = plan.dst
        s = plan.size
        region = cv2.resize(image[sy0:sy1, sx0:sx1], (dx1 - dx0, dy1 - dy0),
                            interpolation=plan.interpolation)
        if plan.distort is not None:
            region = distort_image(region, plan.distort)
        left, top, right, bottom = dx0, dy0, s - dx1, s - dy1
        boxes = plan.boxes
        if plan.mirror:
            # Flipping before padding is the same as flipping the padded output.
            region = cv2.flip(region, 1)
            left, right = right, left
            boxes = mirror_boxes(boxes, s)
        if left or top or right or bottom:
            region = cv2.copyMakeBorder(region, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                        value=self.fill)
        return region, boxes

    def __call__(self, image, boxes, rng):
        """Plan and render one sample; may return zero boxes (the dataset then redraws)."""
        height, width = image.shape[:2]
        return self.render(image, self.plan(boxes, width, height, rng))


def fallback_plan(aug, boxes, width, height):
    """Deterministic plan that always keeps a face: a window centred on the face with the
    largest short side, scaled so that short side becomes max(2 * min_face_size, 16) px
    (or so the face fills at most the output), no distortion, no mirror, bilinear."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    face = int(np.argmax(np.minimum(w, h)))
    short, long_ = float(min(w[face], h[face])), float(max(w[face], h[face]))
    want = max(2.0 * aug.min_face, 16.0)
    ratio = max(want / short, min(1.0, 0.9 * aug.size / long_))
    win = max(1, int(np.floor(aug.size / ratio)))
    cx = float(boxes[face, 0] + boxes[face, 2]) * 0.5
    cy = float(boxes[face, 1] + boxes[face, 3]) * 0.5
    window = (int(np.floor(cx - win / 2)), int(np.floor(cy - win / 2)), win)
    return aug._finish(boxes, width, height, 'fallback', window, cv2.INTER_LINEAR, None, False)


def _lut(values):
    """Float table [256] -> uint8 lookup table (rounded, saturated)."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def distort_image(image, distort):
    """Photometric distortion of a uint8 RGB image (see CropPlan.distort). Returns a new
    array; brightness and contrast are 256-entry lookup tables, saturation and hue one
    HSV round trip (only when either fires)."""
    order, bright, contrast, sat, hue = distort
    if contrast is not None:
        # Pivot: the mean luminance after the brightness change.
        pivot = float(_LUMA @ np.asarray(cv2.mean(image)[:3])) * (bright if bright is not None else 1.0)
    table = _RAMP if bright is None else _RAMP * bright
    if contrast is not None and order == 0:
        table = pivot + contrast * (table - pivot)
    out = image
    if table is not _RAMP:
        out = cv2.LUT(out, _lut(table))
    if sat is not None or hue is not None:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL)
        h_table = _RAMP if hue is None else np.mod(_RAMP + np.rint(hue), 256)
        s_table = _RAMP if sat is None else _RAMP * sat
        hsv = cv2.LUT(hsv, np.stack([_lut(h_table), _lut(s_table), _lut(_RAMP)], axis=-1).reshape(256, 1, 3))
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    if contrast is not None and order == 1:
        out = cv2.LUT(out, _lut(pivot + contrast * (_RAMP - pivot)))
    if out is image:
        out = image.copy()
    return out


def train_transform(image, boxes, rng, input_size=None, params=None):
    """One-off training transform: (uint8 [H, W, 3], boxes [n, 4] pixels, Generator) ->
    (uint8 [S, S, 3], float32 [m, 4] output pixels). Boxes are clipped to the image first.
    For many samples build a `TrainAugmentation` once instead."""
    aug = TrainAugmentation(input_size, params)
    height, width = image.shape[:2]
    clipped, _ = clip_boxes(boxes, width, height)
    return aug.render(image, aug.plan(clipped, width, height, rng))


def val_transform(image, boxes, input_size=None):
    """Validation transform: plain bilinear resize to S x S (the aspect ratio follows the
    output, as in the reference), boxes clipped to the image and scaled. No face is dropped
    except those without area after clipping.

    Returns (uint8 [S, S, 3], float32 [m, 4] output pixels).
    """
    size = int(input_size if input_size is not None else default_cfg.INPUT_SIZE)
    height, width = image.shape[:2]
    clipped, _ = clip_boxes(boxes, width, height)
    out = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    clipped[:, 0::2] *= size / width
    clipped[:, 1::2] *= size / height
    return out, clipped
