import pytest
import torch

from data.config import cfg
from layers.functions.prior_box import PriorBox
from layers.modules.multibox_loss import MultiBoxLoss

MAPS = [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]


def _priors():
    return PriorBox((160, 224), MAPS, cfg).forward()


def _targets():
    return [torch.tensor([[0.1, 0.1, 0.3, 0.4, 1.0], [0.5, 0.2, 0.6, 0.3, 1.0]]),
            torch.zeros((0, 5)),
            torch.tensor([[0.4, 0.4, 0.9, 0.95, 1.0]])]


def test_loss_finite_positive_and_zero_face_images():
    priors = _priors()
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(3, len(priors), 4, generator=g)
    conf = torch.randn(3, len(priors), 2, generator=g)
    loss_l, loss_c = MultiBoxLoss(cfg)((loc, conf, priors), _targets())
    assert torch.isfinite(loss_l) and torch.isfinite(loss_c)
    assert loss_l > 0 and loss_c > 0


def test_batch_without_any_face_divides_by_batch_size():
    priors = _priors()
    loc = torch.zeros(2, len(priors), 4, requires_grad=True)
    conf = torch.zeros(2, len(priors), 2, requires_grad=True)
    loss_l, loss_c = MultiBoxLoss(cfg)((loc, conf, priors), [torch.zeros((0, 5))] * 2)
    # No positives: no localisation loss, and no negatives are mined (3 * 0).
    assert loss_l.item() == 0 and loss_c.item() == 0
    (loss_l + loss_c).backward()


def _one_face():
    """(priors, targets, criterion, conf_t, num_pos) of one image with one face."""
    priors = _priors()
    targets = [torch.tensor([[0.1, 0.1, 0.3, 0.4, 1.0]])]
    criterion = MultiBoxLoss(cfg)
    _, conf_t = criterion.build_targets(targets, priors, 1)
    return priors, targets, criterion, conf_t, int((conf_t > 0).sum())


def test_hard_negative_count_and_normalisation():
    priors, targets, criterion, conf_t, num_pos = _one_face()
    assert num_pos >= 1
    # Uniform logits: every prior costs log(2); loss_c = (num_pos + 3 num_pos) log 2 / num_pos.
    loc = torch.zeros(1, len(priors), 4)
    conf = torch.zeros(1, len(priors), 2)
    _, loss_c = criterion((loc, conf, priors), targets)
    assert abs(loss_c.item() - 4 * torch.log(torch.tensor(2.0)).item()) < 1e-5


def test_hard_negatives_are_the_most_confident_mistakes():
    priors, targets, criterion, conf_t, num_pos = _one_face()
    conf = torch.zeros(1, len(priors), 2)
    negatives = torch.nonzero(conf_t[0] == 0).flatten()
    hard = negatives[:3 * num_pos]
    conf[0, hard, 1] = 5.0  # confidently wrong: these must be mined
    conf[0, negatives[3 * num_pos:3 * num_pos + 10], 1] = -5.0  # easy ones
    _, loss_c = criterion((torch.zeros(1, len(priors), 4), conf, priors), targets)
    ce_hard = torch.logsumexp(torch.tensor([0.0, 5.0]), 0).item()
    expected = (num_pos * torch.log(torch.tensor(2.0)).item() + 3 * num_pos * ce_hard) / num_pos
    assert abs(loss_c.item() - expected) < 1e-4


def test_loss_decreases_when_optimising_a_toy_prediction():
    priors = _priors()
    torch.manual_seed(0)
    loc = torch.zeros(3, len(priors), 4, requires_grad=True)
    conf = torch.zeros(3, len(priors), 2, requires_grad=True)
    opt = torch.optim.SGD([loc, conf], lr=5.0)
    criterion = MultiBoxLoss(cfg)
    losses = []
    for _ in range(20):
        loss_l, loss_c = criterion((loc, conf, priors), _targets())
        loss = loss_l + loss_c
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))


def test_loss_is_float32_under_autocast():
    priors = _priors()
    loc = torch.randn(3, len(priors), 4).bfloat16()
    conf = torch.randn(3, len(priors), 2).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss_l, loss_c = MultiBoxLoss(cfg)((loc, conf, priors), _targets())
    assert loss_l.dtype == torch.float32 and loss_c.dtype == torch.float32


def test_per_face_mode_runs_and_adds_positives():
    priors = _priors()
    t = _targets()
    _, conf_image = MultiBoxLoss(cfg, match_mode='image').build_targets(t, priors, 3)
    _, conf_face = MultiBoxLoss(cfg, match_mode='face').build_targets(t, priors, 3)
    assert (conf_face > 0).sum() > 0 and (conf_image > 0).sum() > 0
    assert (conf_face[1] == 0).all() and (conf_image[1] == 0).all()


def test_original_call_signature_is_accepted_and_bad_modes_fail_at_construction():
    priors = _priors()
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(3, len(priors), 4, generator=g)
    conf = torch.randn(3, len(priors), 2, generator=g)
    expected = MultiBoxLoss(cfg)((loc, conf, priors), _targets())
    for use_gpu in (True, False):   # the original train.py: MultiBoxLoss(cfg, args.dataset, args.cuda)
        got = MultiBoxLoss(cfg, 'face', use_gpu)((loc, conf, priors), _targets())
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(TypeError, match='match_mode by keyword'):
        MultiBoxLoss(cfg, 'face', 'image')
    with pytest.raises(ValueError, match="unknown scale-compensation mode 'faces'"):
        MultiBoxLoss(cfg, match_mode='faces')


def test_hard_negatives_cpu_topk_equals_sort_selection():
    from layers.bbox_utils import top_n_per_row
    from layers.modules.multibox_loss import hard_negatives
    g = torch.Generator().manual_seed(4)
    mining = torch.randint(0, 50, (4, 300), generator=g).float() / 7  # many ties
    negative = torch.rand(4, 300, generator=g) > 0.1
    num_neg = torch.tensor([0, 3, 40, 299])
    fast = hard_negatives(mining, negative, num_neg)
    # The accelerators' sizing (the whole row, no count read back) selects the same priors.
    assert torch.equal(top_n_per_row(mining, negative, num_neg, mining.size(1)), fast)
    order = torch.sort(mining.masked_fill(~negative, -1.0), dim=1, descending=True, stable=True).indices
    expected = torch.zeros_like(negative)
    for b in range(4):
        chosen = [int(i) for i in order[b] if negative[b, i]][:int(num_neg[b])]
        expected[b, chosen] = True
    assert torch.equal(fast, expected)
    assert fast.sum(1).tolist() == [0, 3, 40, int(negative[3].sum())]


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device for the accelerator sizing'))])
def test_hard_negatives_ignore_the_scores_of_non_negatives(device):
    # MultiBoxLoss passes the raw cross-entropy, positives included: their scores, however
    # high, must neither be selected nor displace a negative.
    from layers.modules.multibox_loss import hard_negatives
    g = torch.Generator().manual_seed(5)
    mining = (torch.randint(0, 20, (3, 200), generator=g).float() / 3).to(device)
    negative = (torch.rand(3, 200, generator=g) > 0.2).to(device)
    num_neg = torch.tensor([5, 60, 199], device=device)
    masked = hard_negatives(mining.masked_fill(~negative, 0.0), negative, num_neg)
    loud = hard_negatives(mining.masked_fill(~negative, 1e6), negative, num_neg)
    assert torch.equal(masked, loud)
    assert not (loud & ~negative).any()
    assert loud.sum(1).tolist() == [5, 60, int(negative[2].sum())]


@pytest.mark.parametrize('box', [[0.2, 0.2, 0.2, 0.3], [0.2, 0.3, 0.4, 0.3], [5.0, 5.0, 5.1, 5.1],
                                 [0.1, 0.1, float('nan'), 0.2]])
def test_a_target_that_is_no_face_box_is_a_clear_error_not_a_nan_loss(box):
    priors = _priors()
    good = torch.tensor([[0.1, 0.1, 0.3, 0.3, 1.0]])
    bad = torch.tensor([[0.5, 0.5, 0.7, 0.7, 1.0], box + [1.0]])
    with pytest.raises(ValueError, match='target 1 of image 1 is no face box inside the image'):
        MultiBoxLoss(cfg)((torch.zeros(2, len(priors), 4), torch.zeros(2, len(priors), 2), priors), [good, bad])
