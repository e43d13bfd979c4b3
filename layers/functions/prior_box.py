"""Anchor (prior) boxes of S3FD: one square anchor per feature-map cell."""
import operator

import torch


def prior_grid(input_size, feature_maps, steps, anchor_sizes, dtype=torch.float64, device=None):
    """Unclipped priors [P, 4] in normalised center form, computed in `dtype`.

    input_size (H, W) and each feature map's (h_k, w_k) may be Python ints or the traced
    sizes of tensors (so that an ONNX exporter records the arithmetic for any input size).
    Order: source by source, row-major within a map; cx = (j + 0.5) * step / W,
    cy = (i + 0.5) * step / H, w = anchor / W, h = anchor / H.
    """
    height, width = input_size
    per_map = []
    for (fh, fw), step, anchor in zip(feature_maps, steps, anchor_sizes):
        cy = (torch.arange(fh, device=device, dtype=dtype) + 0.5) * step / height
        cx = (torch.arange(fw, device=device, dtype=dtype) + 0.5) * step / width
        cy, cx = torch.meshgrid(cy, cx, indexing='ij')
        w = torch.ones_like(cx) * (anchor / width)
        h = torch.ones_like(cy) * (anchor / height)
        per_map.append(torch.stack((cx, cy, w, h), dim=-1).reshape(-1, 4))
    return torch.cat(per_map, dim=0)


def _pair(size, what):
    """(h, w) ints from an int (square) or a pair."""
    try:
        side = operator.index(size)
        return side, side
    except TypeError:
        pass
    try:
        h, w = size
        return int(h), int(w)
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be an int or an (h, w) pair, not {size!r}') from None


class PriorBox:
    """Priors for one input size.

    Args:
        input_size: (H, W) of the network input in pixels, or one int for a square input.
        feature_maps: [(h_k, w_k), ...] the real sizes of the six source maps; an int stands
            for a square map, so `PriorBox(640, cfg.FEATURE_MAPS, cfg)` gives the 640x640 priors.
        cfg: provides STEPS, ANCHOR_SIZES and CLIP.

    `forward()` returns [P, 4] priors in normalised center form (cx, cy, w, h), ordered
    source by source, row-major within a map: cx = (j + 0.5) * step / W,
    cy = (i + 0.5) * step / H, w = anchor / W, h = anchor / H.
    """

    def __init__(self, input_size, feature_maps, cfg, device=None, dtype=torch.float32):
        self.imh, self.imw = _pair(input_size, 'input_size')
        self.feature_maps = [_pair(size, 'feature map') for size in feature_maps]
        self.steps = cfg.STEPS
        self.anchor_sizes = cfg.ANCHOR_SIZES
        self.clip = cfg.CLIP
        self.device = device
        self.dtype = dtype
        if len(self.feature_maps) != len(self.steps):
            raise ValueError(f'{len(self.feature_maps)} feature maps but {len(self.steps)} steps in cfg')

    def forward(self):
        priors = prior_grid((self.imh, self.imw), self.feature_maps, self.steps, self.anchor_sizes,
                            device=self.device).to(self.dtype)
        if self.clip:
            priors.clamp_(min=0, max=1)
        return priors

    __call__ = forward
