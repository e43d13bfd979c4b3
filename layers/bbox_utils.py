"""Box math for S3FD: conversions, IoU, encoding and anchor matching.

Conventions: "point form" boxes are (x1, y1, x2, y2), "center form" boxes (cx, cy, w, h);
all coordinates are normalised by the image width/height unless stated otherwise. Every
function accepts any leading batch dimensions and keeps the last dimension as the box.
"""
import numpy as np
import torch
from torchvision.ops import box_iou


def point_form(boxes):
    """(cx, cy, w, h) -> (x1, y1, x2, y2); boxes [..., 4]."""
    return torch.cat((boxes[..., :2] - boxes[..., 2:] / 2,
                      boxes[..., :2] + boxes[..., 2:] / 2), dim=-1)


def center_size(boxes):
    """(x1, y1, x2, y2) -> (cx, cy, w, h); boxes [..., 4]."""
    return torch.cat(((boxes[..., 2:] + boxes[..., :2]) / 2,
                      boxes[..., 2:] - boxes[..., :2]), dim=-1)


def jaccard(box_a, box_b):
    """IoU of every pair: box_a [A, 4], box_b [B, 4] in point form -> [A, B].

    Continuous coordinates (no +1 pixel convention).
    """
    return box_iou(box_a, box_b)


def encode(matched, priors, variances):
    """Regression targets of ground-truth boxes against priors.

    matched: [..., 4] point form, priors: [..., 4] center form (broadcastable).
    Returns [..., 4]: ((gx - px) / (v0 pw), (gy - py) / (v0 ph), log(gw / pw) / v1, log(gh / ph) / v1).
    """
    g_cxcy = ((matched[..., :2] + matched[..., 2:]) / 2 - priors[..., :2]) / (variances[0] * priors[..., 2:])
    g_wh = torch.log((matched[..., 2:] - matched[..., :2]) / priors[..., 2:]) / variances[1]
    return torch.cat((g_cxcy, g_wh), dim=-1)


def decode(loc, priors, variances):
    """Inverse of `encode`: loc [..., 4] offsets, priors [..., 4] center form -> point form."""
    cxcy = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    wh = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat((cxcy - wh / 2, cxcy + wh / 2), dim=-1)


_pairwise_jaccard = torch.vmap(box_iou)


def batched_jaccard(box_a, box_b):
    """IoU within each batch entry: box_a [N, A, 4], box_b [N, B, 4] (point form) -> [N, A, B].

    torchvision's box_iou, vectorised over the leading dimension.
    """
    return _pairwise_jaccard(box_a, box_b)


class PriorGrid:
    """The row-major grid layout of priors made by PriorBox, used to match faces fast.

    A level is a block of `rows x cols` priors of one size whose centres form a grid:
    prior (i, j) of the level sits at index offset + i * cols + j, its x extent depends only
    on j and its y extent only on i. `from_priors` recovers the layout from a [P, 4] prior
    tensor and returns None when the priors are not such grids (or would make more than
    MAX_LEVELS levels, where the windowed search stops paying off).
    """

    MAX_LEVELS = 32

    def __init__(self, levels):
        self.levels = levels  # dicts: offset, rows, cols, w, h, col_x1, col_x2, row_y1, row_y2
        self._device_cache = {}

    @classmethod
    def from_priors(cls, priors):
        p = priors.detach().float().cpu()
        corners = point_form(p).numpy()
        p = p.numpy()
        levels = []
        start, total = 0, p.shape[0]
        while start < total:
            w, h = p[start, 2], p[start, 3]
            same = (p[start:, 2] == w) & (p[start:, 3] == h)
            length = int(np.argmin(same)) if not same.all() else len(same)
            first_row = p[start:start + length, 1] == p[start, 1]
            cols = int(np.argmin(first_row)) if not first_row.all() else length
            if length % cols:
                return None
            rows = length // cols
            block = p[start:start + length].reshape(rows, cols, 4)
            cx, cy = block[0, :, 0], block[:, 0, 1]
            if not ((block[:, :, 0] == cx[None]).all() and (block[:, :, 1] == cy[:, None]).all()
                    and (np.diff(cx) > 0).all() and (np.diff(cy) > 0).all()):
                return None
            grid_corners = corners[start:start + length].reshape(rows, cols, 4)
            levels.append(dict(offset=start, rows=rows, cols=cols, w=float(w), h=float(h),
                               col_x1=grid_corners[0, :, 0].copy(), col_x2=grid_corners[0, :, 2].copy(),
                               row_y1=grid_corners[:, 0, 1].copy(), row_y2=grid_corners[:, 0, 3].copy()))
            start += length
            if len(levels) > cls.MAX_LEVELS:
                return None
        return cls(levels)

    def window_sizes(self, truths_cpu, t1):
        """Host side: (rows, cols) of the prior window each level needs for these faces.

        A level's window must hold (a) every prior that a face could overlap with IoU > t1 and
        (b) the face's best prior on that level. The IoU of a w x h face and a W x H anchor is
        at most min(w, W) min(h, H) / (wh + WH - min(w, W) min(h, H)) (centres aligned); a level
        where that bound is <= t1 only needs (b), which lies within about 2 anchor sizes of
        the face's first overlapping cell.
        """
        boxes = truths_cpu.detach().float().numpy()
        fw = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
        fh = (boxes[:, 3] - boxes[:, 1]).astype(np.float64)
        sizes = []
        for lv in self.levels:
            iw, ih = np.minimum(fw, lv['w']), np.minimum(fh, lv['h'])
            bound = iw * ih / (fw * fh + lv['w'] * lv['h'] - iw * ih)
            eligible = bound > t1 * (1 - 1e-4)
            dims = []
            for lo, hi, first_lo, first_hi, anchor, n in (
                    (lv['col_x1'], lv['col_x2'], boxes[:, 0], boxes[:, 2], lv['w'], lv['cols']),
                    (lv['row_y1'], lv['row_y2'], boxes[:, 1], boxes[:, 3], lv['h'], lv['rows'])):
                spacing = float(np.diff(lo).min()) if n > 1 else anchor
                need = int(np.ceil(2 * anchor / spacing)) + 2
                if eligible.any():
                    count = (np.searchsorted(lo, first_hi[eligible], side='left')
                             - np.searchsorted(hi, first_lo[eligible], side='right'))
                    need = max(need, int(count.max()))
                dims.append(min(need, n))
            sizes.append((dims[1], dims[0]))
        return sizes

    def window_priors(self, truths, sizes):
        """Device side: prior indices [G, M] of each face's windows, level by level, each
        window row-major (so indices increase along a row of the result)."""
        key = str(truths.device)
        if key not in self._device_cache:
            self._device_cache[key] = [(torch.from_numpy(lv['col_x2']).to(truths.device),
                                        torch.from_numpy(lv['row_y2']).to(truths.device))
                                       for lv in self.levels]
        windows = []
        x1 = truths[:, 0].contiguous()
        y1 = truths[:, 1].contiguous()
        for lv, (col_x2, row_y2), (ny, nx) in zip(self.levels, self._device_cache[key], sizes):
            j0 = torch.searchsorted(col_x2, x1, right=True).clamp(max=lv['cols'] - nx)
            i0 = torch.searchsorted(row_y2, y1, right=True).clamp(max=lv['rows'] - ny)
            rows = i0[:, None] + torch.arange(ny, device=truths.device)
            cols = j0[:, None] + torch.arange(nx, device=truths.device)
            windows.append((lv['offset'] + rows[:, :, None] * lv['cols'] + cols[:, None, :]).flatten(1))
        return torch.cat(windows, dim=1)


# Device types whose scatter_reduce_ with 'amax'/'amin' is a kernel of PyTorch's own. Elsewhere
# the matcher gets the same maxima by sorting: torch_npu has no scatter_reduce kernel before
# 2.13, and from 2.13 one that copies to the host for anything but a float32 sum, so on an
# Ascend NPU scatter_reduce_ would run on the CPU every step (benchmarks/check_npu_ops.py).
SCATTER_MINMAX_DEVICES = ('cpu', 'cuda')


def _best_face_per_prior(flat_prior, values, faces, size, num_faces):
    """For pairs (prior slot, IoU, face): the best IoU of every slot and its face.

    flat_prior, values, faces: [N] (slot = image * P + prior), values >= 0, faces in
    increasing order. Returns (best [size], face [size]); face is num_faces where no pair with
    IoU > 0 reaches the slot, and the lowest face index on ties.
    """
    if values.device.type not in SCATTER_MINMAX_DEVICES:
        return _best_face_per_prior_sorted(flat_prior, values, faces, size, num_faces)
    best = values.new_zeros(size).scatter_reduce_(0, flat_prior, values, reduce='amax')
    candidate = torch.where((values == best[flat_prior]) & (values > 0), faces,
                            torch.full_like(faces, num_faces))
    face = torch.full((size,), num_faces, dtype=torch.long, device=values.device)
    face.scatter_reduce_(0, flat_prior, candidate, reduce='amin')
    return best, face


def _best_face_per_prior_sorted(flat_prior, values, faces, size, num_faces):
    """`_best_face_per_prior` without scatter_reduce: sort the pairs by slot, and within a
    slot by decreasing IoU (both sorts stable, so equal IoUs keep the faces' increasing
    order); the first pair of each slot is then its best IoU with the lowest face."""
    order = torch.sort(values, descending=True, stable=True).indices
    order = order.gather(0, torch.sort(flat_prior.gather(0, order), stable=True).indices)
    slot, value, face = flat_prior.gather(0, order), values.gather(0, order), faces.gather(0, order)
    first = _starts_of_runs(slot)
    best = _scatter_distinct(slot, value, first, size, 0)
    return best, _scatter_distinct(slot, face, first & (value > 0), size, num_faces)


def _starts_of_runs(sorted_index):
    """True where a sorted [N] tensor starts a run of equal values."""
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    return first


def _scatter_distinct(index, src, keep, size, fill):
    """[size] filled with `fill`, then out[index[i]] = src[i] where keep[i]; the kept indices
    are distinct. The others write to spare elements past the end, one each (no two writes
    to one place, whose order index_put_ leaves open), which are dropped."""
    n = index.numel()
    out = torch.full((size + n,), fill, dtype=src.dtype, device=src.device)
    spare = torch.arange(size, size + n, device=index.device)
    out.index_put_((torch.where(keep, index, spare),), src)
    return out[:size]


def _last_face_per_slot(slots, faces, size):
    """[size] long: the largest of `faces` (increasing) written to each slot, -1 where none."""
    if slots.device.type in SCATTER_MINMAX_DEVICES:
        forced = torch.full((size,), -1, dtype=torch.long, device=slots.device)
        return forced.scatter_reduce_(0, slots, faces, reduce='amax')
    order = torch.sort(slots, stable=True).indices
    slot = slots.gather(0, order)
    last = torch.ones_like(slot, dtype=torch.bool)
    last[:-1] = slot[1:] != slot[:-1]
    return _scatter_distinct(slot, faces.gather(0, order), last, size, -1)


def match_batch(truths, labels, segment, num_images, priors, variances, thresholds, mode='image',
                grid=None, truths_cpu=None, max_faces=None):
    """Assign every prior of every image a ground-truth face (S3FD two-stage matching).

    Args:
        truths: [G, 4] point-form faces of the whole batch, concatenated image by image.
        labels: [G] class of each face (1 for faces).
        segment: [G] long, the image index of each face.
        num_images: B.
        priors: [P, 4] center form.
        variances: (0.1, 0.2).
        thresholds: (t1, t2, t3) = cfg.FACE.OVERLAP_THRESH, normally (0.1, 0.35, 0.5).
        mode: scale-compensation rule of stage 2, 'image' or 'face'.
        grid: optional PriorGrid of `priors`; with it only the IoUs that can matter are
            computed (see PriorGrid.window_sizes), else all G x P of them. Same result for
            every face with area that overlaps some prior; MultiBoxLoss refuses the others.
        truths_cpu: `truths` on the host, if already there (saves a copy with `grid`).
        max_faces: largest face count of one image, if known on the host.

    Stage 1 (both modes): each prior takes the face of highest IoU; each face's best prior
    is forced to that face whatever its IoU; priors whose IoU is below t2 are background.

    Stage 2, mode 'image' (the established PyTorch port, per image):
        N = (#faces with best-prior IoU >= t2 + #faces with best-prior IoU >= t3) // 2,
        and among background priors with t1 < IoU < t2 the N of highest IoU become positive
        (fewer if fewer qualify; ties go to the lower prior index), each with its best face.
    Stage 2, mode 'face' (the S3FD paper, per face):
        N = round(mean over the image's faces of the stage-1 positive count per face); every
        face with fewer than N stage-1 priors takes its N highest-IoU priors among those still
        background with IoU > t1. A prior chosen by several faces goes to the one of highest IoU.

    Returns:
        loc_t [B, P, 4] encoded regression targets (meaningful on positives only),
        conf_t [B, P] long labels, 0 for background.
    """
    num_priors = priors.size(0)
    num_faces = truths.size(0)
    device = priors.device
    t1, t2, t3 = thresholds
    if num_faces == 0:
        return (priors.new_zeros((num_images, num_priors, 4)),
                torch.zeros((num_images, num_priors), dtype=torch.long, device=device))
    if max_faces is None:
        max_faces = int(torch.bincount(segment, minlength=num_images).max())

    corners = point_form(priors)
    if grid is not None:
        host = truths_cpu if truths_cpu is not None else truths.detach().cpu()
        pair_prior = grid.window_priors(truths, grid.window_sizes(host, t1))
        pair_iou = batched_jaccard(truths[:, None, :], corners[pair_prior]).squeeze(1)
    else:
        pair_iou = jaccard(truths, corners)
        pair_prior = torch.arange(num_priors, device=device).expand(num_faces, -1)

    # Best prior of each face: the first maximum, i.e. the lowest prior index on ties.
    best_prior_overlap, best_col = pair_iou.max(dim=1)
    best_prior_idx = pair_prior.gather(1, best_col[:, None]).squeeze(1)

    face_ids = torch.arange(num_faces, device=device)
    slots = (segment[:, None] * num_priors + pair_prior).flatten()
    pair_faces = face_ids[:, None].expand_as(pair_prior).flatten()
    size = num_images * num_priors
    best_truth_overlap, best_truth_idx = _best_face_per_prior(slots, pair_iou.flatten(), pair_faces,
                                                              size, num_faces)

    # Force each face's best prior; when two faces share a best prior the later face wins,
    # as in the sequential reference loop.
    forced = _last_face_per_slot(segment * num_priors + best_prior_idx, face_ids, size)
    is_forced = forced >= 0
    best_truth_idx = torch.where(is_forced, forced, best_truth_idx).view(num_images, num_priors)
    best_truth_overlap = best_truth_overlap.masked_fill(is_forced, 2.0).view(num_images, num_priors)
    has_face = best_truth_idx < num_faces

    positive = has_face & (best_truth_overlap >= t2)
    if mode == 'image':
        num_good = (best_prior_overlap >= t2).long() + (best_prior_overlap >= t3).long()
        n_per_image = torch.zeros(num_images, dtype=torch.long, device=device)
        n_per_image.index_add_(0, segment, num_good)
        n_per_image = n_per_image // 2
        candidate = has_face & (best_truth_overlap > t1) & (best_truth_overlap < t2)
        positive |= top_n_per_row(best_truth_overlap, candidate, n_per_image, min(max_faces, num_priors))
    elif mode == 'face':
        extra, extra_idx = _match_per_face(pair_iou, pair_prior, slots, pair_faces, segment,
                                           num_images, best_truth_idx, positive, t1)
        best_truth_idx = torch.where(extra, extra_idx, best_truth_idx)
        positive |= extra
    else:
        raise ValueError(f"unknown scale-compensation mode {mode!r}: use 'image' or 'face'")

    best_truth_idx = best_truth_idx.clamp(max=num_faces - 1)
    conf_t = torch.where(positive, labels[best_truth_idx].long(), torch.zeros_like(best_truth_idx))
    loc_t = encode(truths[best_truth_idx], priors, variances)
    return loc_t, conf_t


def top_n_per_row(values, candidate, n, k_max):
    """Mask of the n[b] largest candidate values of each row b (ties: lower index first).

    values [B, P] float, candidate [B, P] bool, n [B] long with n <= k_max <= P. No host sync.
    """
    if k_max <= 0:
        return torch.zeros_like(candidate)
    vals = values.masked_fill(~candidate, float('-inf'))
    top = vals.topk(k_max, dim=1).values
    n = n.clamp(max=k_max)
    kth = top.gather(1, (n - 1).clamp(min=0)[:, None])
    above = candidate & (vals > kth)
    at = candidate & (vals == kth)
    remaining = n - above.sum(dim=1)
    take_at = at & (at.long().cumsum(dim=1) <= remaining[:, None])
    return (above | take_at) & (n > 0)[:, None]


def _match_per_face(pair_iou, pair_prior, slots, pair_faces, segment, num_images,
                    best_truth_idx, positive, t1):
    """Stage 2 of the paper: top-N compensation for faces with too few stage-1 anchors.

    Returns (extra [B, P] bool, face index [B, P]) for the newly positive priors.
    """
    num_faces = pair_iou.size(0)
    device = pair_iou.device
    # Counts by scatter into sizes known on the host: torch.bincount would read its input's
    # maximum back to the host (a sync on accelerators).
    owner = torch.where(positive, best_truth_idx, torch.full_like(best_truth_idx, num_faces)).flatten()
    per_face = torch.zeros(num_faces + 1, dtype=torch.long, device=device)
    per_face = per_face.index_add_(0, owner, torch.ones_like(owner))[:num_faces]
    faces_per_image = torch.zeros(num_images, dtype=torch.long, device=device)
    faces_per_image = faces_per_image.index_add_(0, segment, torch.ones_like(segment)).clamp(min=1)
    total_per_image = torch.zeros(num_images, dtype=torch.long, device=device)
    total_per_image.index_add_(0, segment, per_face)
    n_target = torch.round(total_per_image.float() / faces_per_image.float()).long()[segment]
    needy = per_face < n_target
    free = ~positive.flatten()[slots].view_as(pair_iou)
    eligible = free & (pair_iou > t1) & needy[:, None]
    # Columns are in increasing prior order (see PriorGrid.window_priors), so ties go to the
    # lower prior index. n_target is unknown on the host: the whole row is the bound.
    take = top_n_per_row(pair_iou, eligible, n_target, pair_iou.size(1))
    chosen = torch.where(take, pair_iou, torch.zeros_like(pair_iou))
    _, face = _best_face_per_prior(slots, chosen.flatten(), pair_faces, positive.numel(), num_faces)
    extra = (face < num_faces).view_as(positive)
    return extra, torch.where(extra, face.view_as(positive), best_truth_idx)


def match(threshold, truths, priors, variances, labels, loc_t, conf_t, idx, mode='image'):
    """Match one image's faces to the priors and write row `idx` of loc_t / conf_t.

    The classic per-image signature of the SSD-style repositories. truths [n, 4] point form,
    labels [n], priors [P, 4] center form; loc_t [B, P, 4] and conf_t [B, P] are filled in
    place. See `match_batch` for the rules.
    """
    segment = torch.zeros(truths.size(0), dtype=torch.long, device=truths.device)
    loc, conf = match_batch(truths, labels, segment, 1, priors, variances, threshold, mode,
                            max_faces=truths.size(0))
    loc_t[idx] = loc[0]
    conf_t[idx] = conf[0]
