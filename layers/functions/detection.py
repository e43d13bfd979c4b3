"""Test-phase post-processing: decode, threshold, NMS, top-k."""
import torch
from torchvision.ops import batched_nms

from ..bbox_utils import decode


def nms_top_k(boxes, scores, groups, iou_threshold, top_k):
    """Greedy NMS that stops once `top_k` boxes per group are kept.

    boxes [N, 4] point form, scores [N], groups [N] long. Returns the indices of the kept
    boxes, sorted by score (descending) within each group, at most `top_k` per group.

    Greedy NMS decides each box from higher-scored boxes only, so running it on the
    best-scored prefix gives exactly the final decisions for that prefix. The prefix is
    doubled until it yields `top_k` boxes for every group or covers all boxes, which keeps
    the common case (thousands of candidates, a few hundred kept) far below O(N^2).
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes, scores, groups = boxes[order], scores[order], groups[order]
    num = scores.numel()
    if num == 0:
        return order
    num_groups = int(groups.max()) + 1
    prefix = min(num, max(top_k, 1024))
    while True:
        keep = batched_nms(boxes[:prefix], scores[:prefix], groups[:prefix], iou_threshold)
        keep = _first_per_group(keep, groups, top_k)
        if prefix >= num:
            break
        # Done once every group that still has boxes past the prefix already holds top_k.
        counts = torch.bincount(groups[keep], minlength=num_groups)
        if bool((counts[groups[prefix:]] >= top_k).all()):
            break
        prefix = min(num, prefix * 2)
    return order[keep]


def _rank_in_group(groups):
    """groups [N] long, in priority order -> [N] long: how many earlier entries share each
    entry's group (0 for the first of a group)."""
    by_group = torch.sort(groups, stable=True).indices
    g_sorted = groups[by_group]
    rank = torch.empty_like(by_group)
    rank[by_group] = torch.arange(groups.numel(), device=groups.device) - torch.searchsorted(g_sorted, g_sorted)
    return rank


def _first_per_group(keep, groups, top_k):
    """Restrict score-sorted `keep` to its first `top_k` entries of each group."""
    if keep.numel() == 0:
        return keep
    return keep[_rank_in_group(groups[keep]) < top_k]


class Detect:
    """Turns network outputs into per-class detections.

    `Detect(cfg).forward(loc, conf, priors)`:
        loc [B, P, 4] regression offsets, conf [B, P, C] softmax scores, priors [P, 4]
        normalised center form.
    Returns [B, C, cfg.TOP_K, 5] with rows (score, x1, y1, x2, y2) normalised to [0, 1]
    (not clipped), sorted by score and zero-padded; class 0 (background) stays all zeros.

    Per image and class: scores > CONF_THRESH, the best NMS_TOP_K of them, NMS at
    NMS_THRESH IoU (no +1), the best TOP_K kept.

    `nms_mode` chooses how the NMS runs; both give the same detections. 'prefix' runs
    `nms_top_k` (the least arithmetic, but a host round trip per doubling of the prefix),
    'full' one `batched_nms` over every candidate (the fewest round trips). None, the
    default, picks 'prefix' on the CPU, where the arithmetic is the cost, and 'full' on
    accelerators, where the round trips are.
    """

    NMS_MODES = ('prefix', 'full')

    def __init__(self, cfg, nms_mode=None):
        if nms_mode not in (None, *self.NMS_MODES):
            raise ValueError(f"nms_mode must be None, 'prefix' or 'full', not {nms_mode!r}")
        self.nms_mode = nms_mode
        self.num_classes = cfg.NUM_CLASSES
        self.top_k = cfg.TOP_K
        self.nms_top_k = cfg.NMS_TOP_K
        self.nms_thresh = cfg.NMS_THRESH
        self.conf_thresh = cfg.CONF_THRESH
        self.variance = cfg.VARIANCE

    @torch.no_grad()
    def forward(self, loc, conf, priors):
        batch, num_priors = loc.shape[:2]
        num_classes = conf.size(2)
        loc, conf, priors = loc.float(), conf.float(), priors.float()
        output = loc.new_zeros((batch, num_classes, self.top_k, 5))
        if num_classes < 2 or num_priors == 0:
            return output
        k = min(self.nms_top_k, num_priors)
        # Best candidates per (image, class), foreground classes only: [B, C-1, k].
        cand_scores, cand_idx = conf[:, :, 1:].transpose(1, 2).topk(k, dim=2)
        image_idx = torch.arange(batch, device=loc.device)[:, None, None].expand_as(cand_idx)
        class_idx = torch.arange(1, num_classes, device=loc.device)[None, :, None].expand_as(cand_idx)
        valid = cand_scores > self.conf_thresh
        scores = cand_scores[valid]
        if scores.numel() == 0:
            return output
        prior_idx = cand_idx[valid]
        image_idx, class_idx = image_idx[valid], class_idx[valid]
        boxes = decode(loc[image_idx, prior_idx], priors[prior_idx], self.variance)
        groups = image_idx * num_classes + class_idx
        prefix = (self.nms_mode or ('prefix' if loc.device.type == 'cpu' else 'full')) == 'prefix'
        if prefix:  # at most top_k per group already
            keep = nms_top_k(boxes, scores, groups, self.nms_thresh, self.top_k)
        else:
            keep = batched_nms(boxes, scores, groups, self.nms_thresh)
        # keep is in score order, so a box's rank within its (image, class) is its row.
        slot = _rank_in_group(groups[keep])
        if not prefix:
            within = slot < self.top_k
            keep, slot = keep[within], slot[within]
        rows = torch.cat((scores[keep, None], boxes[keep]), dim=1)
        output[image_idx[keep], class_idx[keep], slot] = rows
        return output

    __call__ = forward
