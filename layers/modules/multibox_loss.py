"""S3FD training loss: smooth-L1 localisation + softmax confidence with hard negative mining."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bbox_utils import PriorGrid, top_n_per_row, match_batch


class MultiBoxLoss(nn.Module):
    """Multibox loss of S3FD.

    Called as `criterion((loc, conf, priors), targets)`:
        loc [B, P, 4], conf [B, P, C] raw logits, priors [P, 4] normalised center form;
        targets: list of B tensors [n_i, 5] rows (x1, y1, x2, y2, label), normalised,
        label 1 for a face; n_i may be 0.
    Returns (loss_l, loss_c), scalars:
        loss_l = sum of smooth-L1 over positive priors,
        loss_c = sum of cross-entropy over positives and hard negatives, where each image
                 keeps its min(ratio * num_pos, P - 1) negatives of highest
                 logsumexp(conf) - conf[label];
        both divided by the number of positives in the batch (by B if there is none).

    Everything is computed in float32 on the predictions' device, without a Python loop
    over images or anchors and without host synchronisation.

    `use_gpu` is the original repository's third argument, kept so that its call
    `MultiBoxLoss(cfg, args.dataset, args.cuda)` still works; it has no effect, since the loss
    runs wherever its inputs are. `match_mode` ('image' or 'face', default
    cfg.SCALE_COMPENSATION) is keyword-only.
    """

    def __init__(self, cfg, dataset='face', use_gpu=None, *, match_mode=None):
        super().__init__()
        if dataset != 'face':
            raise ValueError(f"dataset {dataset!r} is not supported; S3FD trains on 'face'")
        if use_gpu is not None and not isinstance(use_gpu, bool):
            raise TypeError(f'use_gpu must be a bool (it is ignored: the loss runs on its inputs\' device), '
                            f'not {use_gpu!r}; pass match_mode by keyword')
        self.num_classes = cfg.NUM_CLASSES
        self.negpos_ratio = cfg.NEG_POS_RATIOS
        self.variance = cfg.VARIANCE
        self.thresholds = tuple(cfg.FACE.OVERLAP_THRESH)
        self.match_mode = match_mode or cfg.SCALE_COMPENSATION
        if self.match_mode not in ('image', 'face'):
            raise ValueError(f"unknown scale-compensation mode {self.match_mode!r}: use 'image' or 'face'")
        self._grid_for = (None, None)  # (priors tensor, its PriorGrid or None)

    def prior_grid(self, priors):
        """The PriorGrid of `priors`, recovered once per prior tensor (the network caches it)."""
        cached_priors, grid = self._grid_for
        if cached_priors is not priors:
            grid = PriorGrid.from_priors(priors)
            self._grid_for = (priors, grid)
        return grid

    def build_targets(self, targets, priors, num_images):
        """Matched (loc_t [B, P, 4], conf_t [B, P]) for a list of per-image targets.

        Targets normally arrive on the host from the data loader; the face sizes are read
        there, so matching on an accelerator needs no host synchronisation. A face without
        area or outside the image (x2 <= x1, y2 <= y1, not finite, or beyond [0, 1]) raises
        ValueError: its log-size offsets would make the loss NaN.
        """
        device = priors.device
        counts = [int(t.shape[0]) for t in targets]
        if sum(counts):
            flat_cpu = torch.cat([t.detach().reshape(-1, 5).cpu() for t in targets]).float()
        else:
            flat_cpu = torch.zeros((0, 5))
        segment = torch.repeat_interleave(torch.arange(num_images), torch.tensor(counts, dtype=torch.long))
        corners = flat_cpu[:, :4].numpy()  # numpy: a quarter of torch's per-step cost at this size
        lo, hi = corners[:, :2], corners[:, 2:]
        good = ((hi > lo) & (lo < 1) & (hi > 0)).all(1) & np.isfinite(corners).all(1)
        if not good.all():
            k = int(np.argmin(good))
            image = int(segment[k])
            face = k - sum(counts[:image])
            raise ValueError(f'target {face} of image {image} is no face box inside the image: '
                             f'(x1, y1, x2, y2) = {[round(v, 4) for v in flat_cpu[k, :4].tolist()]} '
                             '(normalised; needs x2 > x1, y2 > y1 and some area in [0, 1])')
        if device.type in ('cuda', 'npu'):
            # A copy from pageable memory would wait for the device's queue (CUDA; torch_npu turns
            # it into a stream synchronisation); pinned memory does not (utils.device.pins_host_memory).
            flat, segment = flat_cpu.pin_memory(), segment.pin_memory()
        else:
            flat = flat_cpu
        flat = flat.to(device, non_blocking=True)
        segment = segment.to(device, non_blocking=True)
        return match_batch(flat[:, :4], flat[:, 4], segment, num_images,
                           priors, self.variance, self.thresholds, self.match_mode,
                           grid=self.prior_grid(priors), truths_cpu=flat_cpu[:, :4],
                           max_faces=max(counts) if counts else 0)

    def forward(self, predictions, targets):
        loc_data, conf_data, priors = predictions
        num_images, num_priors = loc_data.shape[:2]
        if len(targets) != num_images:
            raise ValueError(f'{len(targets)} targets for a batch of {num_images} images')
        with torch.autocast(device_type=loc_data.device.type, enabled=False):
            loc_data = loc_data.float()
            conf_data = conf_data.float()
            with torch.no_grad():
                loc_t, conf_t = self.build_targets(targets, priors.float(), num_images)
            pos = conf_t > 0  # [B, P]
            num_pos = pos.sum(dim=1)  # [B]

            loss_l = F.smooth_l1_loss(loc_data, loc_t, reduction='none').sum(dim=-1)
            loss_l = (loss_l * pos).sum()

            # Cross-entropy of every prior; it also serves as the mining score.
            ce = torch.logsumexp(conf_data, dim=-1) - conf_data.gather(-1, conf_t.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                num_neg = torch.clamp(self.negpos_ratio * num_pos, max=num_priors - 1)
                neg = hard_negatives(ce.detach(), ~pos, num_neg)
            loss_c = (ce * (pos | neg)).sum()

            total_pos = num_pos.sum()
            norm = torch.where(total_pos > 0, total_pos, num_images).float()
            return loss_l / norm, loss_c / norm


def hard_negatives(mining, negative, num_neg):
    """Mask of the num_neg[b] highest-scoring negatives of each image (ties: lower index).

    mining [B, P] scores (those of non-negatives are ignored, so callers need not mask them),
    negative [B, P] bool, num_neg [B] long with num_neg <= P. On the CPU the top-k is sized
    by the largest count (several times faster than the whole row); on accelerators by the
    row length, so that no count is read back to the host.
    """
    if mining.device.type == 'cpu':
        k_max = int(num_neg.max()) if num_neg.numel() else 0
    else:
        k_max = mining.size(1)
    return top_n_per_row(mining, negative, num_neg, k_max)
