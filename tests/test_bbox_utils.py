import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data.config import cfg
from layers.bbox_utils import (center_size, decode, encode, jaccard, match, match_batch,
                               point_form)

VAR = cfg.VARIANCE


def test_point_form_center_size_round_trip():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.05, 0.05]])
    pts = point_form(boxes)
    assert torch.allclose(pts[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    assert torch.allclose(center_size(pts), boxes)


def test_jaccard_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    iou = jaccard(a, b)
    expected = torch.tensor([[1 / 7, 2 / 4, 0.0], [0.0, 1 / 2, 0.0]])
    assert torch.allclose(iou, expected)


def test_encode_values_and_decode_round_trip():
    priors = torch.tensor([[0.5, 0.5, 0.1, 0.2]])
    gt = torch.tensor([[0.46, 0.42, 0.58, 0.62]])  # centre (0.52, 0.52), size (0.12, 0.2)
    enc = encode(gt, priors, VAR)
    expected = torch.tensor([[0.02 / (0.1 * 0.1), 0.02 / (0.1 * 0.2),
                              math.log(1.2) / 0.2, math.log(1.0) / 0.2]])
    assert torch.allclose(enc, expected, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    pri = torch.rand(100, 4, generator=g) * 0.5 + 0.1
    boxes = point_form(torch.rand(100, 4, generator=g) * 0.5 + 0.1)
    assert torch.allclose(decode(encode(boxes, pri, VAR), pri, VAR), boxes, atol=1e-5)
    # Batched leading dimensions broadcast.
    assert torch.allclose(decode(encode(boxes[None], pri, VAR), pri, VAR)[0], boxes, atol=1e-5)


def _priors_from_point_boxes(boxes):
    return center_size(torch.tensor(boxes, dtype=torch.float32))


# One face covering [0, 0.2]^2. Priors: an exact copy (IoU 1), then strips of decreasing
# overlap: 0.25, 0.15, 0.05, and one far away (IoU 0).
FACE = [0.0, 0.0, 0.2, 0.2]
STRIPS = [[0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.2, 0.05], [0.0, 0.0, 0.2, 0.03],
          [0.0, 0.0, 0.2, 0.01], [0.9, 0.0, 1.0, 0.1]]


def _match(truths, priors, mode='image', num_images=1, segment=None):
    truths = torch.tensor(truths, dtype=torch.float32)
    labels = torch.ones(len(truths))
    if segment is None:
        segment = torch.zeros(len(truths), dtype=torch.long)
    return match_batch(truths, labels, segment, num_images, priors, VAR, cfg.FACE.OVERLAP_THRESH, mode)


def test_stage2_per_image_adds_the_best_candidates():
    priors = _priors_from_point_boxes(STRIPS)
    iou = jaccard(torch.tensor([FACE]), point_form(priors))[0]
    assert torch.allclose(iou, torch.tensor([1.0, 0.25, 0.15, 0.05, 0.0]))
    # One face with best IoU 1.0: N = (1 + 1) // 2 = 1 -> only the 0.25 strip is added.
    _, conf = _match([FACE], priors)
    assert conf[0].tolist() == [1, 1, 0, 0, 0]


def test_stage2_per_image_n_counts_all_faces_of_the_image():
    # Second face far away, matched exactly by its own prior: N = (2 + 2) // 2 = 2, so the
    # strips of IoU 0.25 and 0.15 become positive; 0.05 stays background (not above 0.1).
    other = [0.6, 0.6, 0.95, 0.95]
    priors = _priors_from_point_boxes(STRIPS + [other])
    loc, conf = _match([FACE, other], priors)
    assert conf[0].tolist() == [1, 1, 1, 0, 0, 1]
    # The added priors regress to the face they overlap.
    expected = encode(torch.tensor(FACE), priors[2], VAR)
    assert torch.allclose(loc[0, 2], expected)


def test_stage2_per_image_is_limited_to_candidates_above_t1():
    # Three faces, all matched exactly: N = 3 but only two strips have IoU in (0.1, 0.35).
    f2, f3 = [0.6, 0.6, 0.95, 0.95], [0.3, 0.6, 0.5, 0.9]
    priors = _priors_from_point_boxes(STRIPS + [f2, f3])
    _, conf = _match([FACE, f2, f3], priors)
    assert conf[0].tolist() == [1, 1, 1, 0, 0, 1, 1]


def test_forced_best_prior_even_below_threshold():
    # The face's best IoU (0.25) is below 0.35, yet its best prior becomes positive.
    priors = _priors_from_point_boxes(STRIPS[1:])
    _, conf = _match([FACE], priors)
    # best IoU 0.25 < 0.35: N = 0, so only the forced prior is positive.
    assert conf[0].tolist() == [1, 0, 0, 0]


def test_stage2_per_face_compensates_the_face_with_few_anchors():
    # Face A is matched by three priors (IoU 1, 0.6, 0.6); face B only by its forced best
    # prior (IoU 0.3). Mean stage-1 count = (3 + 1) / 2 = 2, so face B takes its 2 best
    # unmatched priors with IoU > 0.1 (0.2 and 0.12), not the 0.05 one.
    face_a = [0.0, 0.0, 0.2, 0.2]
    a_priors = [[0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.2, 0.12], [0.0, 0.08, 0.2, 0.2]]
    face_b = [0.5, 0.5, 0.9, 0.9]  # area 0.16
    b_priors = [[0.5, 0.5, 0.9, 0.62], [0.5, 0.5, 0.9, 0.58], [0.5, 0.5, 0.9, 0.548],
                [0.5, 0.5, 0.9, 0.52]]  # IoU 0.3, 0.2, 0.12, 0.05
    priors = _priors_from_point_boxes(a_priors + b_priors)
    iou_b = jaccard(torch.tensor([face_b]), point_form(priors))[0, 3:]
    assert torch.allclose(iou_b, torch.tensor([0.3, 0.2, 0.12, 0.05]), atol=1e-5)
    _, conf_face = _match([face_a, face_b], priors, mode='face')
    assert conf_face[0].tolist() == [1, 1, 1, 1, 1, 1, 0]
    # The per-image rule on the same case: N = (2 + 1) // 2 = 1 -> only the 0.2 prior.
    _, conf_image = _match([face_a, face_b], priors, mode='image')
    assert conf_image[0].tolist() == [1, 1, 1, 1, 1, 0, 0]


def test_stage2_per_face_ties_go_to_the_lower_prior_index():
    # Dyadic coordinates, so the tied IoUs are exactly equal. Face A has 3 stage-1 priors,
    # face B 1 (its forced best, IoU 0.5): N = 2, and B's two best free priors are the
    # IoU-0.25 strip and one of two IoU-0.125 strips: the one with the lower prior index.
    face_a = [0.0, 0.0, 0.25, 0.25]
    a_priors = [[0.0, 0.0, 0.25, 0.25], [0.0, 0.0, 0.25, 0.125], [0.0, 0.125, 0.25, 0.25]]
    face_b = [0.5, 0.5, 1.0, 1.0]
    b_priors = [[0.5, 0.5, 1.0, 0.75], [0.5, 0.9375, 1.0, 1.0], [0.5, 0.5, 1.0, 0.625],
                [0.5, 0.5, 1.0, 0.5625]]  # IoU 0.5, 0.125, 0.25, 0.125
    priors = _priors_from_point_boxes(a_priors + b_priors)
    iou_b = jaccard(torch.tensor([face_b]), point_form(priors))[0, 3:]
    assert iou_b.tolist() == [0.5, 0.125, 0.25, 0.125]
    _, conf = _match([face_a, face_b], priors, mode='face')
    assert conf[0].tolist() == [1, 1, 1, 1, 1, 1, 0]
    # Same faces with the tied strips swapped: again the lower index wins.
    swapped = _priors_from_point_boxes(a_priors + [b_priors[0], b_priors[3], b_priors[2], b_priors[1]])
    _, conf = _match([face_a, face_b], swapped, mode='face')
    assert conf[0].tolist() == [1, 1, 1, 1, 1, 1, 0]


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError):
        _match([FACE], _priors_from_point_boxes(STRIPS), mode='paper')


def _reference_match(truths, labels, priors, thresholds):
    """Straightforward per-image implementation of the reference port's matching."""
    t1, t2, t3 = thresholds
    overlaps = jaccard(truths, point_form(priors))
    best_prior_overlap, best_prior_idx = overlaps.max(1)
    best_truth_overlap, best_truth_idx = overlaps.max(0)
    best_truth_overlap = best_truth_overlap.clone()
    for j in range(truths.size(0)):
        best_truth_overlap[best_prior_idx[j]] = 2
        best_truth_idx[best_prior_idx[j]] = j
    n = (int((best_prior_overlap >= t2).sum()) + int((best_prior_overlap >= t3).sum())) // 2
    conf = labels[best_truth_idx].long()
    conf[best_truth_overlap < t2] = 0
    cand = [(float(best_truth_overlap[p]), p) for p in range(priors.size(0))
            if t1 < best_truth_overlap[p] < t2]
    cand.sort(key=lambda c: -c[0])
    for _, p in cand[:n]:
        conf[p] = labels[best_truth_idx[p]].long()
    return encode(truths[best_truth_idx], priors, VAR), conf


def test_batched_matching_equals_per_image_reference():
    from layers.functions.prior_box import PriorBox
    maps = [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]
    priors = PriorBox((160, 224), maps, cfg).forward()
    g = torch.Generator().manual_seed(3)
    counts = [3, 0, 1, 7]
    targets = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 0.8
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.02
        targets.append(torch.cat((xy, xy + wh), 1))
    truths = torch.cat(targets)
    segment = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    loc, conf = match_batch(truths, torch.ones(len(truths)), segment, len(counts), priors, VAR,
                            cfg.FACE.OVERLAP_THRESH)
    for i, t in enumerate(targets):
        if len(t) == 0:
            assert (conf[i] == 0).all()
            continue
        ref_loc, ref_conf = _reference_match(t, torch.ones(len(t)), priors, cfg.FACE.OVERLAP_THRESH)
        assert torch.equal(conf[i], ref_conf)
        pos = ref_conf > 0
        assert torch.allclose(loc[i][pos], ref_loc[pos], atol=1e-5)
        # The classic in-place signature gives the same rows.
        loc_t, conf_t = torch.zeros(1, len(priors), 4), torch.zeros(1, len(priors), dtype=torch.long)
        match(cfg.FACE.OVERLAP_THRESH, t, priors, VAR, torch.ones(len(t)), loc_t, conf_t, 0)
        assert torch.equal(conf_t[0], ref_conf)


def _realistic_faces(gen, counts, size):
    """Faces of 2 to 400 px (many small, some elongated) on an image of `size` (H, W)."""
    h, w = size
    out = []
    for n in counts:
        side = torch.rand(n, generator=gen) ** 3 * 398 + 2
        aspect = torch.rand(n, generator=gen) * 1.2 + 0.5
        bw, bh = (side / w).clamp(max=0.95), (side * aspect / h).clamp(max=0.95)
        x1 = torch.rand(n, generator=gen) * (1 - bw)
        y1 = torch.rand(n, generator=gen) * (1 - bh)
        out.append(torch.stack((x1, y1, x1 + bw, y1 + bh), 1))
    return out


def test_prior_grid_matching_equals_dense_matching():
    from layers.functions.prior_box import PriorBox
    from layers.bbox_utils import PriorGrid
    size = (320, 448)
    maps = [(80, 112), (40, 56), (20, 28), (10, 14), (5, 7), (3, 4)]
    priors = PriorBox(size, maps, cfg).forward()
    grid = PriorGrid.from_priors(priors)
    assert grid is not None and len(grid.levels) == 6
    assert [(lv['rows'], lv['cols']) for lv in grid.levels] == maps
    gen = torch.Generator().manual_seed(42)
    counts = [0, 1, 5, 40, 13, 2]
    faces = _realistic_faces(gen, counts, size)
    # Add faces exactly on anchors (ties between priors) and a tiny one.
    faces[1] = torch.tensor([[0.0, 0.0, 16 / 448, 16 / 320]])
    truths = torch.cat(faces)
    segment = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = torch.ones(len(truths))
    for mode in ('image', 'face'):
        dense = match_batch(truths, labels, segment, len(counts), priors, VAR, cfg.FACE.OVERLAP_THRESH, mode)
        fast = match_batch(truths, labels, segment, len(counts), priors, VAR, cfg.FACE.OVERLAP_THRESH, mode,
                           grid=grid)
        assert torch.equal(dense[1], fast[1]), mode
        pos = dense[1] > 0
        assert torch.equal(dense[0][pos], fast[0][pos]), mode
        assert pos.sum() > 50


def test_prior_grid_rejects_priors_that_are_not_grids():
    from layers.bbox_utils import PriorGrid
    g = torch.Generator().manual_seed(0)
    assert PriorGrid.from_priors(torch.rand(50, 4, generator=g)) is None
    # Same-size priors whose centres do not form a grid.
    scattered = torch.cat((torch.rand(12, 2, generator=g), torch.full((12, 2), 0.1)), 1)
    assert PriorGrid.from_priors(scattered) is None


def test_degenerate_grids_still_match_exactly():
    from layers.bbox_utils import PriorGrid
    priors = _priors_from_point_boxes(STRIPS)  # five one-prior levels
    grid = PriorGrid.from_priors(priors)
    assert grid is not None and len(grid.levels) == 5
    truths = torch.tensor([FACE])
    seg = torch.zeros(1, dtype=torch.long)
    dense = match_batch(truths, torch.ones(1), seg, 1, priors, VAR, cfg.FACE.OVERLAP_THRESH)
    fast = match_batch(truths, torch.ones(1), seg, 1, priors, VAR, cfg.FACE.OVERLAP_THRESH, grid=grid)
    assert torch.equal(dense[1], fast[1])


def test_top_n_per_row_takes_the_n_largest_candidates_ties_by_index():
    from layers.bbox_utils import top_n_per_row
    values = torch.tensor([[-3.0, -1.0, -2.0, -1.0, 5.0],
                           [0.5, 0.5, 0.5, 0.1, 0.9],
                           [1.0, 2.0, 3.0, 4.0, 5.0]])
    candidate = torch.tensor([[True, True, True, True, False],
                              [True, True, True, True, True],
                              [True, False, True, False, False]])
    n = torch.tensor([3, 2, 4])  # row 2 asks for more than its two candidates
    for k_max in (4, 5):
        got = top_n_per_row(values, candidate, n, k_max)
        assert got.tolist() == [[False, True, True, True, False],   # negatives count; 5.0 is no candidate
                                [True, False, False, False, True],  # 0.9, then the first 0.5
                                [True, False, True, False, False]]  # every candidate, nothing else
    assert not top_n_per_row(values, candidate, torch.zeros(3, dtype=torch.long), 0).any()


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def _match_all_ways(truths, segment, num_images, priors, grid):
    out = {}
    for mode in ('image', 'face'):
        for g in (None, grid):
            out[mode, g is None] = match_batch(truths, torch.ones(len(truths)), segment, num_images, priors, VAR,
                                               cfg.FACE.OVERLAP_THRESH, mode, grid=g)
    return out


def test_matching_by_sorting_equals_scatter_reduce(monkeypatch):
    # The path of devices without PyTorch's scatter_reduce amax/amin (the Ascend NPU), run on
    # the CPU: identical targets, including ties between faces (a duplicated face, two faces
    # with the same best prior: the later one is forced there) and faces overlapping nothing
    # but their forced prior.
    import layers.bbox_utils as bbox_utils
    from layers.bbox_utils import PriorGrid
    from layers.functions.prior_box import PriorBox
    size = (160, 224)
    maps = [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]
    priors = PriorBox(size, maps, cfg).forward()
    grid = PriorGrid.from_priors(priors)
    gen = torch.Generator().manual_seed(7)
    counts = [6, 0, 1, 25]
    faces = _realistic_faces(gen, counts, size)
    faces[0][1] = faces[0][0]  # the same face twice
    faces[0][2] = faces[0][0] * 0.999  # nearly the same: the same best prior
    faces[2][0] = torch.tensor([0.0, 0.0, 2 / 224, 2 / 160])  # 2 px: below every threshold
    truths = torch.cat(faces)
    segment = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    with _OpNames() as native_ops:
        native = _match_all_ways(truths, segment, len(counts), priors, grid)
    monkeypatch.setattr(bbox_utils, 'SCATTER_MINMAX_DEVICES', ())
    with _OpNames() as sorted_ops:
        by_sorting = _match_all_ways(truths, segment, len(counts), priors, grid)
    assert 'aten::scatter_reduce_.two' in native_ops.names
    assert not any('scatter_reduce' in name for name in sorted_ops.names)
    for key, (loc, conf) in native.items():
        assert torch.equal(by_sorting[key][1], conf), key
        assert torch.equal(by_sorting[key][0], loc), key
        assert conf.sum() > 30


def test_best_face_per_prior_by_sorting_on_ties_and_empty_slots(monkeypatch):
    import layers.bbox_utils as bbox_utils
    from layers.bbox_utils import _best_face_per_prior, _best_face_per_prior_sorted, _last_face_per_slot
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, size, num_faces = (int(torch.randint(1, k, (1,), generator=gen)) for k in (200, 40, 12))
        slots = torch.randint(0, size, (n,), generator=gen)
        # IoUs from a few levels (many ties), a fifth of them exactly 0
        values = torch.randint(0, 4, (n,), generator=gen).float() / 4 * (torch.rand(n, generator=gen) > 0.2)
        faces = torch.sort(torch.randint(0, num_faces, (n,), generator=gen)).values
        best, face = _best_face_per_prior(slots, values, faces, size, num_faces)
        best_s, face_s = _best_face_per_prior_sorted(slots, values, faces, size, num_faces)
        assert torch.equal(best, best_s) and torch.equal(face, face_s)
        assert (face_s[best_s == 0] == num_faces).all()
    slots = torch.tensor([3, 0, 3, 3])
    for devices in (('cpu',), ()):  # scatter_reduce, then sorting
        monkeypatch.setattr(bbox_utils, 'SCATTER_MINMAX_DEVICES', devices)
        assert _last_face_per_slot(slots, torch.arange(4), 5).tolist() == [1, -1, -1, 3, -1]
        assert _last_face_per_slot(slots[:1], torch.arange(1), 4).tolist() == [-1, -1, -1, 0]
