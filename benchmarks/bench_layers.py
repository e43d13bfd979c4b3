"""Benchmark of the S3FD layers on CPU: MultiBoxLoss and Detect at 640x640.

Prints one JSON object with median wall times in seconds:
  loss_s:   MultiBoxLoss (matching + mining + both losses, forward only) on a batch of
            16 images with 1-40 faces each;
  detect_s: Detect on one 640x640 output whose scores are all near 0.5 (every prior above
            CONF_THRESH, so NMS_TOP_K = 5000 candidates go to NMS), default NMS mode;
  detect_modes: Detect at batch 1 and 16 in each NMS mode ('prefix', 'full');
  l2norm: forward + backward of the three L2Norm layers at their 640x640 sizes on bf16 input
            (as under autocast), batch --l2norm_batch: the layer against the plain autograd
            composition it replaces (pow, sum, sqrt, add, div, mul), with the bytes each keeps
            for the backward.

    python benchmarks/bench_layers.py [--threads 1] [--repeat 15] [--device cpu]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import HelpFormatter  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    parser.add_argument('--repeat', type=int, default=15, help='timed repetitions (after 2 warm-ups)')
    parser.add_argument('--batch_size', type=int, default=16)
    parser.add_argument('--l2norm_batch', type=int, default=4)
    parser.add_argument('--detect_batches', default='1,16', help='comma-separated batch sizes of the NMS modes')
    parser.add_argument('--device', default='cpu')
    return parser.parse_args()


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import torch  # noqa: E402

from data.config import cfg  # noqa: E402
from layers.functions.detection import Detect  # noqa: E402
from layers.functions.prior_box import PriorBox  # noqa: E402
from layers.modules.l2norm import L2Norm  # noqa: E402
from layers.modules.multibox_loss import MultiBoxLoss  # noqa: E402

MAPS_640 = [(160, 160), (80, 80), (40, 40), (20, 20), (10, 10), (5, 5)]
L2NORM_SHAPES_640 = [(256, 160, 160, 10), (512, 80, 80, 8), (512, 40, 40, 5)]  # channels, H, W, scale


def random_faces(gen, n, input_size=640):
    """n face boxes (x1, y1, x2, y2, 1), normalised, 8 to 300 px tall at `input_size`."""
    size = (torch.rand(n, 1, generator=gen) ** 2 * 292 + 8) / input_size
    aspect = torch.rand(n, 1, generator=gen) * 0.5 + 1.0  # taller than wide
    wh = torch.cat((size, size * aspect), 1).clamp(max=0.9)
    xy = torch.rand(n, 2, generator=gen) * (1 - wh)
    return torch.cat((xy, xy + wh, torch.ones(n, 1)), 1)


def timed(fn, repeat, device):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_l2norm(x, weight, eps=1e-10):
    """The composition L2Norm used to be, left to autograd."""
    x = x.float()
    norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps
    return x / norm * weight[None, :, None, None]


def bench_l2norm(batch, repeat, device):
    """Median seconds of forward + backward over the three L2Norm layers, and the bytes each
    version keeps for its backward (beyond its bf16 input, which the ReLU keeps anyway)."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, c, h, w, generator=gen).relu().to(device, torch.bfloat16).requires_grad_(True)
              for c, h, w, _ in L2NORM_SHAPES_640]
    layers = [L2Norm(c, scale).to(device) for c, _, _, scale in L2NORM_SHAPES_640]
    grads = [torch.randn(x.shape, generator=gen).to(device) for x in inputs]
    versions = {'layer': lambda x, layer: layer(x), 'plain': lambda x, layer: plain_l2norm(x, layer.weight)}
    result = {'batch': batch, 'input': 'bf16'}
    for name, fn in versions.items():
        def step():
            outs = [fn(x, layer) for x, layer in zip(inputs, layers)]
            torch.autograd.backward(outs, grads)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            [fn(x, layer) for x, layer in zip(inputs, layers)]
        inputs_ptrs = {x.data_ptr() for x in inputs}
        kept = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs_ptrs}
        result[name] = {'fwd_bwd_s': round(timed(step, repeat, device), 4),
                        'saved_for_backward_mb': round(sum(kept.values()) / 2 ** 20, 1)}
    return result


def main(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    priors = PriorBox((640, 640), MAPS_640, cfg, device=device).forward()
    num_priors = priors.size(0)

    counts = torch.randint(1, 41, (args.batch_size,), generator=gen).tolist()
    targets = [random_faces(gen, n) for n in counts]  # on the host, as the data loader delivers them
    loc = torch.randn(args.batch_size, num_priors, 4, generator=gen).to(device)
    conf = torch.randn(args.batch_size, num_priors, 2, generator=gen).to(device)
    criterion = MultiBoxLoss(cfg)

    def run_loss():
        loss_l, loss_c = criterion((loc, conf, priors), targets)
        return loss_l + loss_c

    loss_s = timed(run_loss, args.repeat, device)

    det_loc = (torch.randn(1, num_priors, 4, generator=gen) * 0.1).to(device)
    det_conf = torch.softmax(torch.randn(1, num_priors, 2, generator=gen) * 0.01, -1).to(device)
    detect = Detect(cfg)
    candidates = int((det_conf[..., 1] > cfg.CONF_THRESH).sum())
    detect_s = timed(lambda: detect.forward(det_loc, det_conf, priors), args.repeat, device)
    kept = int((detect.forward(det_loc, det_conf, priors)[0, 1, :, 0] > 0).sum())
    modes = {}
    for mode in Detect.NMS_MODES:
        detect_mode = Detect(cfg, nms_mode=mode)
        modes[mode] = {}
        for batch in [int(b) for b in args.detect_batches.split(',')]:
            loc_b, conf_b = det_loc.expand(batch, -1, -1), det_conf.expand(batch, -1, -1)
            seconds = timed(lambda: detect_mode.forward(loc_b, conf_b, priors),
                            args.repeat if batch == 1 else max(3, args.repeat // 5), device)
            modes[mode][f'batch{batch}_s'] = round(seconds, 4)
    l2norm = bench_l2norm(args.l2norm_batch, max(3, args.repeat // 3), device)

    print(json.dumps({
        'device': str(device), 'threads': args.threads, 'priors': num_priors,
        'loss_batch': args.batch_size, 'faces_per_image': [min(counts), max(counts)],
        'loss_s': round(loss_s, 4), 'loss_target_s': 0.12,
        'detect_candidates_above_thresh': candidates, 'detect_kept': kept,
        'detect_s': round(detect_s, 4), 'detect_target_s': 0.015, 'detect_modes': modes,
        'l2norm': l2norm,
    }))


if __name__ == '__main__':
    main(parse_args())
