"""The WIDER FACE test of the reference PyTorch port (yxlijun/S3FD.pytorch, tools/wider_test.py),
rewritten for the tests from what that script computes, pass by pass, with OpenCV, NumPy and
the network only: nothing from utils.inference. Tests compare utils.inference.detector.Detector with it.

What it computes (facts read from the reference script):
- a pass at scale ``s``: ``cv2.resize(img, None, fx=s, fy=s, INTER_LINEAR)`` unless ``s == 1``;
  the input is the RGB image minus the mean, CHW, one image per forward; a box is the
  normalised box times the resized width/height, over ``s``; scores >= thresh are kept;
- the mirrored pass mirrors the original image (``cv2.flip(img, 1)``), runs a pass at the same
  scale and maps ``x1, x2`` to ``W - x2, W - x1`` (``W`` the original width);
- the shrunk and enlarged passes and their size filters (``multi_scale``), then box voting:
  clusters at pixel-inclusive IoU >= 0.3 around the best remaining box, single-box clusters
  dropped, score-weighted coordinates, the best score, at most 750 boxes.
The one choice not taken from the reference: boxes of equal score are ordered by pass order
(stable sort, as utils.inference.detector); the reference's order of equal scores is whatever NumPy's
(unstable) quicksort gives.
"""
import cv2
import numpy as np
import torch
import torch.nn as nn

from data.config import cfg


class OneImageAtATime(nn.Module):
    """Runs the wrapped network on each image of a batch alone, as an NCHW-contiguous tensor.
    The same pixels then give bit-identical outputs however the caller batched and laid them
    out (utils.inference.detector batches a pass with its mirror, channels-last; the reference runs one
    image at a time), so a comparison sees the procedure and not the float rounding of
    different convolution kernels: with random weights many scores agree to 1e-6, and that
    rounding alone reorders them and changes a few voted boxes."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.cat([self.net(image[None].contiguous()) for image in x])


def detect_pass(net, img, s, thresh):
    """One pass: float64 ``[n, 5]`` rows ``(x1, y1, x2, y2, score)`` in original pixels."""
    if s != 1:
        img = cv2.resize(img, None, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    x = img.astype(np.float32).transpose(2, 0, 1) - np.float32(cfg.img_mean)[:, None, None]
    with torch.no_grad():
        y = net(torch.from_numpy(np.ascontiguousarray(x))[None])[0, 1].numpy()   # [K, 5] float32
    h, w = img.shape[:2]
    det = np.column_stack((w * y[:, 1] / s, h * y[:, 2] / s, w * y[:, 3] / s, h * y[:, 4] / s, y[:, 0]))
    return det[det[:, 4] >= thresh]


def flip_pass(net, img, s, thresh):
    det = detect_pass(net, cv2.flip(img, 1), s, thresh)
    out = det.copy()
    out[:, 0] = img.shape[1] - det[:, 2]
    out[:, 2] = img.shape[1] - det[:, 0]
    return out


def _longer(det):
    return np.maximum(det[:, 2] - det[:, 0] + 1, det[:, 3] - det[:, 1] + 1)


def _shorter(det):
    return np.minimum(det[:, 2] - det[:, 0] + 1, det[:, 3] - det[:, 1] + 1)


def multi_scale(net, img, m, thresh):
    """The shrunk and the enlarged detections for the largest scale ``m``."""
    st = 0.5 if m >= 0.75 else 0.5 * m
    det_s = detect_pass(net, img, st, thresh)
    det_s = det_s[_longer(det_s) > 30]
    bt = min(2, m) if m > 1 else (st + m) / 2
    det_b = [detect_pass(net, img, bt, thresh)]
    if m > 2:
        bt *= 2
        while bt < m:
            det_b.append(detect_pass(net, img, bt, thresh))
            bt *= 2
        det_b.append(detect_pass(net, img, m, thresh))
    det_b = np.concatenate(det_b)
    det_b = det_b[_shorter(det_b) < 100] if bt > 1 else det_b[_longer(det_b) > 30]
    return det_s, det_b


def vote(det, iou=0.3, top_k=750):
    det = det[np.argsort(-det[:, 4], kind='stable')]
    out = []
    while len(det):
        area = (det[:, 2] - det[:, 0] + 1) * (det[:, 3] - det[:, 1] + 1)
        iw = np.maximum(0.0, np.minimum(det[0, 2], det[:, 2]) - np.maximum(det[0, 0], det[:, 0]) + 1)
        ih = np.maximum(0.0, np.minimum(det[0, 3], det[:, 3]) - np.maximum(det[0, 1], det[:, 1]) + 1)
        inter = iw * ih
        merge = inter / (area[0] + area - inter) >= iou
        cluster, det = det[merge], det[~merge]
        if len(cluster) <= 1:
            continue
        weights = cluster[:, 4:5]
        out.append(np.append((cluster[:, :4] * weights).sum(axis=0) / weights.sum(), cluster[:, 4].max()))
    return np.asarray(out, dtype=np.float64).reshape(-1, 5)[:top_k]


def reference_test(net, img, m, thresh=0.05):
    """The reference's detections for RGB uint8 ``img`` and largest scale ``m``
    (``sqrt(1700 * 1200 / (h * w))`` in the reference)."""
    s = m if m < 1 else 1
    det0 = detect_pass(net, img, s, thresh)
    det1 = flip_pass(net, img, s, thresh)
    det_s, det_b = multi_scale(net, img, m, thresh)
    return vote(np.concatenate((det0, det1, det_s, det_b)))
