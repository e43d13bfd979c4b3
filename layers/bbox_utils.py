"""Box math for S3FD: conversions, IoU, encoding and anchor matching.

Conventions: "point form" boxes are (x1, y1, x2, y2), "center form" boxes (cx, cy, w, h);
all coordinates are normalised by the image width/height unless stated otherwise. Every
function accepts any leading batch dimensions and keeps the last dimension as the box.
"""
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


def _segment_argmax(values, segment, num_segments):
    """Per-segment maximum over rows of `values`.

    values [G, P], segment [G] (the segment of each row, in 0..num_segments-1).
    Returns (max [S, P], argmax [S, P]) where argmax is the row index in 0..G-1 (the first
    row on ties) and -1 for a segment without rows (whose max is -inf).
    """
    num_rows, num_cols = values.shape
    index = segment[:, None].expand(num_rows, num_cols)
    best = values.new_full((num_segments, num_cols), float('-inf'))
    best.scatter_reduce_(0, index, values, reduce='amax')
    rows = torch.arange(num_rows, device=values.device)[:, None].expand(num_rows, num_cols)
    candidates = torch.where(values == best[segment], rows, num_rows)
    arg = torch.full((num_segments, num_cols), num_rows, dtype=torch.long, device=values.device)
    arg.scatter_reduce_(0, index, candidates, reduce='amin')
    arg = torch.where(arg == num_rows, -1, arg)
    return best, arg


def match_batch(truths, labels, segment, num_images, priors, variances, thresholds, mode='image'):
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

    Stage 1 (both modes): each prior takes the face of highest IoU; each face's best prior
    is forced to that face whatever its IoU; priors whose IoU is below t2 are background.

    Stage 2, mode 'image' (the established PyTorch port, per image):
        N = (#faces with best-prior IoU >= t2 + #faces with best-prior IoU >= t3) // 2,
        and among background priors with t1 < IoU < t2 the N of highest IoU become positive
        (fewer if fewer qualify), each taking its highest-IoU face.
    Stage 2, mode 'face' (the S3FD paper, per face):
        N = round(mean over the image's faces of the stage-1 positive count per face); every
        face with fewer than N stage-1 priors takes its N highest-IoU priors among those still
        background with IoU > t1. A prior chosen by several faces goes to the one of highest IoU.

    Returns:
        loc_t [B, P, 4] encoded regression targets (meaningful on positives only),
        conf_t [B, P] long labels, 0 for background.
    """
    num_priors = priors.size(0)
    device = priors.device
    t1, t2, t3 = thresholds
    if truths.size(0) == 0:
        return (priors.new_zeros((num_images, num_priors, 4)),
                torch.zeros((num_images, num_priors), dtype=torch.long, device=device))

    overlaps = jaccard(truths, point_form(priors))  # [G, P]
    best_truth_overlap, best_truth_idx = _segment_argmax(overlaps, segment, num_images)
    best_prior_overlap, best_prior_idx = overlaps.max(dim=1)  # [G]

    # Force each face's best prior; when two faces share a best prior the later face wins,
    # as in the sequential reference loop.
    rows = torch.arange(truths.size(0), device=device)
    flat_pos = segment * num_priors + best_prior_idx
    forced = torch.full((num_images * num_priors,), -1, dtype=torch.long, device=device)
    forced.scatter_reduce_(0, flat_pos, rows, reduce='amax')
    forced = forced.view(num_images, num_priors)
    is_forced = forced >= 0
    best_truth_idx = torch.where(is_forced, forced, best_truth_idx)
    best_truth_overlap = torch.where(is_forced, torch.full_like(best_truth_overlap, 2.0),
                                     best_truth_overlap)
    best_truth_overlap = torch.nan_to_num(best_truth_overlap, neginf=0.0)  # images without faces
    has_face = best_truth_idx >= 0
    best_truth_idx = best_truth_idx.clamp(min=0)

    positive = has_face & (best_truth_overlap >= t2)
    if mode == 'image':
        num_good = ((best_prior_overlap >= t2).long() + (best_prior_overlap >= t3).long())
        n_per_image = torch.zeros(num_images, dtype=torch.long, device=device)
        n_per_image.index_add_(0, segment, num_good)
        n_per_image = n_per_image // 2
        candidate = has_face & (best_truth_overlap > t1) & (best_truth_overlap < t2)
        cand_overlap = torch.where(candidate, best_truth_overlap, torch.zeros_like(best_truth_overlap))
        order = torch.sort(cand_overlap, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(num_priors, device=device).expand(num_images, -1))
        positive |= candidate & (rank < n_per_image[:, None])
    elif mode == 'face':
        extra, extra_idx = _match_per_face(overlaps, segment, num_images, best_truth_idx,
                                           positive, t1)
        best_truth_idx = torch.where(extra, extra_idx, best_truth_idx)
        positive |= extra
    else:
        raise ValueError(f"unknown scale-compensation mode {mode!r}: use 'image' or 'face'")

    conf_t = torch.where(positive, labels[best_truth_idx].long(), torch.zeros_like(best_truth_idx))
    loc_t = encode(truths[best_truth_idx], priors, variances)
    return loc_t, conf_t


def _match_per_face(overlaps, segment, num_images, best_truth_idx, positive, t1):
    """Stage 2 of the paper: top-N compensation for faces with too few stage-1 anchors.

    Returns (extra [B, P] bool, face index [B, P]) for the newly positive priors.
    """
    num_faces, num_priors = overlaps.shape
    device = overlaps.device
    # Stage-1 positives per face.
    owner = torch.where(positive, best_truth_idx, torch.full_like(best_truth_idx, num_faces))
    per_face = torch.bincount(owner.flatten(), minlength=num_faces + 1)[:num_faces]
    faces_per_image = torch.bincount(segment, minlength=num_images).clamp(min=1)
    total_per_image = torch.zeros(num_images, dtype=torch.long, device=device)
    total_per_image.index_add_(0, segment, per_face)
    n_target = torch.round(total_per_image.float() / faces_per_image.float()).long()[segment]  # [G]
    needy = per_face < n_target
    k = int(n_target[needy].max()) if bool(needy.any()) else 0
    if k == 0:
        return torch.zeros_like(positive), best_truth_idx
    free = ~positive[segment]  # [G, P]: prior still background in the face's image
    scores = torch.where(free & (overlaps > t1) & needy[:, None], overlaps,
                         torch.zeros_like(overlaps))
    top_val, top_idx = scores.topk(min(k, num_priors), dim=1)
    take = (top_val > 0) & (torch.arange(top_val.size(1), device=device)[None] < n_target[:, None])
    chosen = torch.zeros_like(overlaps)
    chosen.scatter_(1, top_idx, torch.where(take, top_val, torch.zeros_like(top_val)))
    chosen = torch.where(chosen > 0, chosen, torch.full_like(chosen, float('-inf')))
    best, arg = _segment_argmax(chosen, segment, num_images)
    extra = torch.isfinite(best)
    return extra, torch.where(extra, arg, best_truth_idx)


def match(threshold, truths, priors, variances, labels, loc_t, conf_t, idx, mode='image'):
    """Match one image's faces to the priors and write row `idx` of loc_t / conf_t.

    The classic per-image signature of the SSD-style repositories. truths [n, 4] point form,
    labels [n], priors [P, 4] center form; loc_t [B, P, 4] and conf_t [B, P] are filled in
    place. See `match_batch` for the rules.
    """
    segment = torch.zeros(truths.size(0), dtype=torch.long, device=truths.device)
    loc, conf = match_batch(truths, labels, segment, 1, priors, variances, threshold, mode)
    loc_t[idx] = loc[0]
    conf_t[idx] = conf[0]
