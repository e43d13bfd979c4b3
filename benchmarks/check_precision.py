"""Mixed precision must not change training: the same weights and batches trained for N steps
in float32 and under autocast give losses within a tolerance.

    python benchmarks/check_precision.py --device gpu --amp_dtype bf16 --steps 20
    python benchmarks/check_precision.py --device gpu --channels_last --compile
    python benchmarks/check_precision.py --device cpu --input_size 128 --batch_size 2 --steps 5

Prints one JSON object with both loss sequences, the relative difference of the final losses
(mean of the last 5 steps) and `ok` (difference <= --tolerance, 2% by default). Two figures
tell where a disagreement starts: `first_update_rel_diff`, how far the mixed run's first SGD
update (its gradient at the shared initial weights) is from float32's, relative to the float32
update's norm; and per run `first_nonfinite`, the first step after which a weight is NaN/inf
(null when none), whether that step's loss was finite and which parameters went bad.
"""
import argparse
import copy
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import add_step_arguments  # noqa: E402
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_step_arguments(p, amp_choices=())
    p.add_argument('--steps', default=20, type=int)
    p.add_argument('--lr', default=1e-3, type=float)
    p.add_argument('--tolerance', default=0.02, type=float)
    p.add_argument('--channels_last', action='store_true', help='channels-last network and input in both runs')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the network of the mixed-precision run (checks compile as well)')
    return p.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import torch  # noqa: E402

from s3fd import build_s3fd, init_weights_from_scratch  # noqa: E402
from benchmarks.bench_train import prepare_training, synthetic_batches  # noqa: E402
from utils.training.engine import nonfinite_parameters, training_step  # noqa: E402
from utils import device as devices  # noqa: E402


def train_steps(model, runtime, batches, steps, lr, channels_last=False, compile_net=False, compile_mode=None,
                on_start=None, on_first_step=None):
    """Train `model` in place for `steps` SGD steps on `batches` (cycled), as train.py does.

    Returns (losses, first_nonfinite): first_nonfinite is None, or {'step', 'loss_finite',
    'params', 'count'} for the first step after which a weight is NaN/inf.
    on_start(net) runs before step 1 with the network that trains (compiled or not);
    on_first_step(model) after step 1, whose gradients are still in .grad.
    """
    net, optimizer, criterion, finite = prepare_training(model, runtime, lr, channels_last, compile_net,
                                                         compile_mode=compile_mode)
    if on_start is not None:
        on_start(net)
    losses, first_nonfinite = [], None
    for step in range(steps):
        images, targets = batches[step % len(batches)]
        loss, _, _, _ = training_step(net, criterion, optimizer, runtime, finite, images, targets, channels_last)
        losses.append(float(loss))
        if step == 0 and on_first_step is not None:
            on_first_step(model)
        if first_nonfinite is None:
            bad = nonfinite_parameters(model)
            if bad:
                first_nonfinite = {'step': step + 1, 'loss_finite': math.isfinite(losses[-1]),
                                   'params': bad[:8], 'count': len(bad)}
    return losses, first_nonfinite


def train_losses(net, runtime, batches, steps, lr, channels_last=False, compile_net=False):
    """(losses, first update as one flat float32 CPU vector, first_nonfinite or None) of a copy of `net`."""
    model = copy.deepcopy(net)
    initial = flat_weights(model)
    update = {}
    losses, first_nonfinite = train_steps(model, runtime, batches, steps, lr, channels_last, compile_net,
                                          on_first_step=lambda m: update.setdefault('delta', flat_weights(m) - initial))
    return losses, update['delta'], first_nonfinite


def flat_weights(model):
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def main(args):
    try:
        fp32 = devices.setup_device(args.device, args.device_id, amp='off')
        mixed = devices.setup_device(args.device, args.device_id, amp='native', amp_dtype=args.amp_dtype)
    except devices.DeviceUnavailable as e:
        sys.exit(f'check_precision.py: error: {e}')
    if fp32.type == 'cuda':  # compare with true float32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    batches = synthetic_batches(args, 4, torch.Generator().manual_seed(0))
    ref, ref_update, ref_bad = train_losses(net, fp32, batches, args.steps, args.lr, args.channels_last)
    amp, amp_update, amp_bad = train_losses(net, mixed, batches, args.steps, args.lr, args.channels_last,
                                            args.compile)
    update_diff = float((amp_update - ref_update).norm() / ref_update.norm())
    tail = min(5, args.steps)
    ref_end, amp_end = sum(ref[-tail:]) / tail, sum(amp[-tail:]) / tail
    rel = abs(amp_end - ref_end) / abs(ref_end)
    ok = math.isfinite(rel) and rel <= args.tolerance  # a NaN difference must not pass
    print(json.dumps({'device': mixed.describe(), 'steps': args.steps, 'channels_last': args.channels_last,
                      'compile': args.compile, 'fp32_losses': [round(x, 4) for x in ref],
                      'amp_losses': [round(x, 4) for x in amp], 'final_rel_diff': round(rel, 5),
                      'first_update_rel_diff': round(update_diff, 5),
                      'first_nonfinite': {'fp32': ref_bad, 'amp': amp_bad},
                      'tolerance': args.tolerance, 'ok': ok}))
    return ok


if __name__ == '__main__':
    sys.exit(0 if main(parse_args()) else 1)
