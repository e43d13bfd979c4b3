import pytest
import torch

from data.config import cfg
from layers.functions.prior_box import PriorBox


def test_prior_count_at_640_and_order():
    maps = [(160, 160), (80, 80), (40, 40), (20, 20), (10, 10), (5, 5)]
    priors = PriorBox((640, 640), maps, cfg).forward()
    assert priors.shape == (34125, 4)
    assert priors.dtype == torch.float32
    # First cell of the stride-4 map: centre (2, 2) px, 16 px anchor.
    assert torch.allclose(priors[0], torch.tensor([2 / 640, 2 / 640, 16 / 640, 16 / 640]))
    # Row-major: second prior is one step to the right.
    assert torch.allclose(priors[1], torch.tensor([6 / 640, 2 / 640, 16 / 640, 16 / 640]))
    # Cell (i=1, j=0) of the stride-4 map follows the whole first row.
    assert torch.allclose(priors[160], torch.tensor([2 / 640, 6 / 640, 16 / 640, 16 / 640]))
    # First prior of the last map (stride 128, anchor 512) and the very last prior.
    first_last_map = 34125 - 25
    assert torch.allclose(priors[first_last_map], torch.tensor([64 / 640, 64 / 640, 512 / 640, 512 / 640]))
    assert torch.allclose(priors[-1], torch.tensor([576 / 640, 576 / 640, 512 / 640, 512 / 640]))


def test_non_square_input_uses_width_and_height():
    maps = [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]
    priors = PriorBox((160, 224), maps, cfg).forward()
    assert priors.shape[0] == sum(h * w for h, w in maps)
    # Cell (i=2, j=3) of the stride-8 map: cx = 3.5*8/224, cy = 2.5*8/160, anchor 32.
    idx = 40 * 56 + 2 * 28 + 3
    expected = torch.tensor([3.5 * 8 / 224, 2.5 * 8 / 160, 32 / 224, 32 / 160])
    assert torch.allclose(priors[idx], expected)


def test_priors_are_not_clipped_by_default():
    priors = PriorBox((640, 640), [(160, 160), (80, 80), (40, 40), (20, 20), (10, 10), (5, 5)], cfg).forward()
    # The 512 px anchors of the border cells reach past the image edge and are kept so.
    right_edge = priors[:, 0] + priors[:, 2] / 2
    assert right_edge.max() > 1.0
    assert priors.min() > 0


def test_square_sizes_as_ints_match_pairs():
    square = PriorBox(640, cfg.FEATURE_MAPS, cfg).forward()
    pairs = PriorBox((640, 640), [(f, f) for f in cfg.FEATURE_MAPS], cfg).forward()
    assert square.shape == (34125, 4) and torch.equal(square, pairs)
    with pytest.raises(ValueError, match="feature map must be an int or an"):
        PriorBox(640, [(160, 160, 1)] + cfg.FEATURE_MAPS[1:], cfg)


def test_map_count_must_match_steps():
    with pytest.raises(ValueError):
        PriorBox((640, 640), [(160, 160)], cfg)
