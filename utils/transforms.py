"""The image and box primitives that training, inference and the training engine share: the
network's input convention (RGB minus the per-channel mean `cfg.img_mean`, no scaling) and
pixel-box clipping and mirroring.

Coordinates: boxes are float32 [n, 4] pixel (x1, y1, x2, y2), continuous (a box covering pixels
0..9 is (0, 0, 10, 10)); images are uint8 [H, W, 3] RGB (NumPy) or [..., 3, H, W] (tensors).
"""
import cv2
import numpy as np
import torch

from data.config import cfg as default_cfg


def clip_boxes(boxes, width, height, min_size=0.0):
    """Clip pixel boxes [n, 4] (x1, y1, x2, y2) to the image and drop those left without
    area, or with a side under `min_size` pixels.

    Returns (clipped float32 [m, 4], indices int64 [m] of the kept rows).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    clipped = np.empty_like(boxes)
    np.clip(boxes[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=clipped[:, 1::2])
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = np.flatnonzero((w > 0) & (h > 0) & (w >= min_size) & (h >= min_size))
    return clipped[keep], keep


def mirror_boxes(boxes, width):
    """Horizontal flip of pixel boxes [n, 4] in an image `width` pixels wide."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def to_tensor(image, mean=None):
    """uint8 [S, S, 3] RGB -> float32 tensor [3, S, S], per-channel mean subtracted, no scaling."""
    mean = default_cfg.img_mean if mean is None else mean
    height, width = image.shape[:2]
    out = np.empty((3, height, width), dtype=np.float32)
    for c, channel in enumerate(cv2.split(image)):
        cv2.subtract(channel, float(mean[c]), dst=out[c], dtype=cv2.CV_32F)
    return torch.from_numpy(out)


def to_uint8_tensor(image):
    """uint8 [S, S, 3] RGB -> uint8 tensor [3, S, S], unchanged values (see subtract_mean).

    The result is a channels-first *view* of the image's memory (strides (1, 3S, 3), not
    contiguous): no copy here, the transpose happens in the one copy `torch.stack` makes
    when `detection_collate` builds the batch. Call `.contiguous()` before anything that
    needs a packed tensor. `np.ascontiguousarray` copies only odd inputs (e.g. flipped views
    with negative strides, which `torch.from_numpy` refuses); cv2 outputs pass through as is.
    """
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def subtract_mean(images, mean=None, memory_format=torch.preserve_format):
    """uint8 images [..., 3, H, W] RGB (on any device) -> float32 minus the per-channel mean:
    the values `to_tensor` gives, computed where the images are (e.g. on the GPU, after a
    copy of a quarter of the bytes), laid out in `memory_format` (4-D images only)."""
    mean = default_cfg.img_mean if mean is None else mean
    out = images.to(torch.float32, memory_format=memory_format)
    for c, value in enumerate(mean):  # Python scalars: no host-to-device copy to wait for
        out[..., c, :, :].sub_(float(value))
    return out
