import pytest
import torch
from torchvision.ops import nms

from data.config import cfg
from layers.bbox_utils import center_size, decode
from layers.functions.detection import Detect, nms_top_k


def _priors_grid(n):
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.1 + 0.01
    return torch.cat((xy, wh), 1)


def test_no_candidate_gives_zeros():
    priors = _priors_grid(100)
    loc = torch.zeros(2, 100, 4)
    conf = torch.zeros(2, 100, 2)
    conf[..., 0] = 1.0  # background everywhere: face score 0 < 0.05
    out = Detect(cfg).forward(loc, conf, priors)
    assert out.shape == (2, 2, cfg.TOP_K, 5)
    assert torch.count_nonzero(out) == 0


def test_nms_suppresses_the_overlapping_box():
    # Three priors: A, B shifted slightly from A (IoU > 0.3), C far away.
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.12, 0.1, 0.32, 0.3], [0.6, 0.6, 0.8, 0.8]])
    priors = center_size(boxes)
    loc = torch.zeros(1, 3, 4)
    conf = torch.tensor([[[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]]])
    out = Detect(cfg).forward(loc, conf, priors)
    rows = out[0, 1]
    assert torch.allclose(rows[0], torch.tensor([0.9, 0.1, 0.1, 0.3, 0.3]))
    assert torch.allclose(rows[1], torch.tensor([0.7, 0.6, 0.6, 0.8, 0.8]))
    assert torch.count_nonzero(rows[2:]) == 0
    assert torch.count_nonzero(out[0, 0]) == 0


def _reference_detect(loc, conf, priors):
    out = torch.zeros(loc.size(0), 2, cfg.TOP_K, 5)
    for b in range(loc.size(0)):
        boxes = decode(loc[b], priors, cfg.VARIANCE)
        scores = conf[b, :, 1]
        mask = scores > cfg.CONF_THRESH
        s, bx = scores[mask], boxes[mask]
        order = s.argsort(descending=True)[:cfg.NMS_TOP_K]
        s, bx = s[order], bx[order]
        keep = nms(bx, s, cfg.NMS_THRESH)[:cfg.TOP_K]
        out[b, 1, :len(keep)] = torch.cat((s[keep, None], bx[keep]), 1)
    return out


@pytest.mark.parametrize('nms_mode', [None, 'prefix', 'full'])
def test_detect_matches_straightforward_reference_with_many_candidates(nms_mode):
    n = 6000
    priors = _priors_grid(n)
    g = torch.Generator().manual_seed(7)
    loc = torch.randn(2, n, 4, generator=g) * 0.5
    conf = torch.softmax(torch.randn(2, n, 2, generator=g), -1)
    out = Detect(cfg, nms_mode=nms_mode).forward(loc, conf, priors)
    ref = _reference_detect(loc, conf, priors)
    assert torch.allclose(out, ref, atol=1e-6)
    assert (out[:, 1, :, 0] > 0).sum(1).min() > 0


def test_unknown_nms_mode_is_a_clear_error():
    with pytest.raises(ValueError, match='nms_mode'):
        Detect(cfg, nms_mode='fast')


def test_nms_top_k_equals_full_nms_then_truncation():
    g = torch.Generator().manual_seed(11)
    xy = torch.rand(5000, 2, generator=g)
    boxes = torch.cat((xy, xy + torch.rand(5000, 2, generator=g) * 0.05 + 0.01), 1)
    scores = torch.rand(5000, generator=g)
    groups = torch.randint(0, 3, (5000,), generator=g)
    for top_k in (10, 300, 4000):
        keep = nms_top_k(boxes, scores, groups, 0.3, top_k)
        expected = []
        for grp in range(3):
            idx = torch.nonzero(groups == grp).flatten()
            k = nms(boxes[idx], scores[idx], 0.3)[:top_k]
            expected.append(idx[k])
        assert sorted(keep.tolist()) == sorted(torch.cat(expected).tolist())
