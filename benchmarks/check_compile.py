"""Does torch.compile train S3FD like eager mode? Same weights, same batches, same precision.

    python benchmarks/check_compile.py --device gpu --channels_last
    python benchmarks/check_compile.py --device gpu --channels_last --amp off      # float32, TF32 off
    python benchmarks/check_compile.py --device gpu --channels_last \\
        --inductor layout_optimization=False --inductor comprehensive_padding=False
    python benchmarks/check_compile.py --device cpu --input_size 128 --batch_size 2 --steps 3

First one step from the same initial weights, eager and compiled: the loss, the outputs and
every parameter's gradient are compared. Then --steps SGD steps each way on the same batches.
Prints one JSON object:
  loss_rel_diff, output_max_abs_diff (loc, conf)    step 1's forward;
  grad_rel_diff        ||g_compiled - g_eager|| / ||g_eager|| over all parameters;
  worst_grads          the parameters with the largest relative gradient difference;
  nonfinite_grads      {'eager': [...], 'compiled': [...]}: parameters whose gradient has a NaN/inf;
  eager_losses, compiled_losses, first_nonfinite_step (per run, null when none);
  ok                   grad_rel_diff <= --tolerance (default 0.05: bf16 runs differ by a few
                       percent in their gradients, float32 ones by far less) and no non-finite
                       value in the compiled run that the eager run does not have.
--inductor KEY=VALUE sets torch._inductor.config.KEY (Python literal) before compiling, to find
which compiler pass a disagreement comes from.
"""
import argparse
import ast
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
    add_step_arguments(p, batch_size=8)
    p.add_argument('--channels_last', action='store_true')
    p.add_argument('--steps', default=10, type=int, help='SGD steps each way after the one-step comparison')
    p.add_argument('--lr', default=1e-3, type=float)
    p.add_argument('--mode', default=None, help="torch.compile mode (e.g. 'max-autotune-no-cudagraphs')")
    p.add_argument('--inductor', action='append', default=[], metavar='KEY=VALUE',
                   help='set torch._inductor.config.KEY to the Python literal VALUE (repeatable)')
    p.add_argument('--tolerance', default=0.05, type=float)
    return p.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import torch  # noqa: E402

from s3fd import build_s3fd, init_weights_from_scratch  # noqa: E402
from benchmarks.bench_train import synthetic_batches  # noqa: E402
from benchmarks.check_precision import train_steps  # noqa: E402
from utils.training.engine import to_device  # noqa: E402
from utils import device as devices  # noqa: E402


def set_inductor_options(pairs):
    """Apply KEY=VALUE pairs to torch._inductor.config; a bad pair is a one-line error."""
    import torch._inductor.config as inductor_config
    applied = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep or not hasattr(inductor_config, key):
            raise SystemExit(f'check_compile.py: error: --inductor {pair!r}: expected KEY=VALUE with KEY an '
                             'attribute of torch._inductor.config')
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f'check_compile.py: error: --inductor {pair!r}: VALUE must be a Python literal')
        setattr(inductor_config, key, parsed)
        applied[key] = parsed
    return applied


def sig(x, digits=3):
    """x rounded to `digits` significant figures (small differences stay visible)."""
    return float(f'{x:.{digits}g}')


def named_grads(model):
    return {name: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float))
            for name, p in model.named_parameters()}


def outputs(net, runtime, images, channels_last):
    """(loc, conf) of one training-mode forward (the graph the steps use: no recompilation), float32."""
    images, _ = to_device(images, [], runtime.device, channels_last)
    with runtime.autocast():
        loc, conf, _ = net(images)
    return loc.detach().float(), conf.detach().float()


def main(args):
    try:
        runtime = devices.setup_device(args.device, args.device_id, args.amp, args.amp_dtype)
    except devices.DeviceUnavailable as e:
        sys.exit(f'check_compile.py: error: {e}')
    if runtime.type == 'cuda' and runtime.amp == 'off':  # compare float32 with float32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    inductor = set_inductor_options(args.inductor)
    torch.manual_seed(0)
    initial = build_s3fd('train')
    init_weights_from_scratch(initial)
    batches = synthetic_batches(args, 4, torch.Generator().manual_seed(0))

    results = {}
    for name in ('eager', 'compiled'):
        out, grads = {}, {}
        losses, first_nonfinite = train_steps(
            copy.deepcopy(initial), runtime, batches, args.steps, args.lr, args.channels_last,
            compile_net=name == 'compiled', compile_mode=args.mode,
            on_start=lambda net: out.update(zip(('loc', 'conf'), outputs(net, runtime, batches[0][0], args.channels_last))),
            on_first_step=lambda model: grads.update(named_grads(model)))
        results[name] = dict(loss=losses[0], loc=out['loc'], conf=out['conf'], grads=grads, losses=losses,
                             first_nonfinite=first_nonfinite and first_nonfinite['step'])

    eager, compiled = results['eager'], results['compiled']
    diff_sq, ref_sq, per_param, nonfinite = 0.0, 0.0, {}, {'eager': [], 'compiled': []}
    for pname, g_ref in eager['grads'].items():
        g = compiled['grads'][pname]
        for run, grad in (('eager', g_ref), ('compiled', g)):
            if not bool(torch.isfinite(grad).all()):
                nonfinite[run].append(pname)
        d = float((g - g_ref).norm() ** 2)
        r = float(g_ref.norm() ** 2)
        diff_sq += d
        ref_sq += r
        per_param[pname] = math.sqrt(d) / max(math.sqrt(r), 1e-12)
    grad_rel = math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-12)
    worst = sorted(per_param.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)[:5]
    loss_rel = abs(compiled['loss'] - eager['loss']) / abs(eager['loss'])
    new_nonfinite = (set(nonfinite['compiled']) - set(nonfinite['eager'])
                     or (compiled['first_nonfinite'] is not None and eager['first_nonfinite'] is None))
    ok = math.isfinite(grad_rel) and grad_rel <= args.tolerance and not new_nonfinite
    print(json.dumps({
        'device': runtime.describe(), 'torch': torch.__version__, 'batch_size': args.batch_size,
        'input_size': args.input_size, 'channels_last': args.channels_last, 'mode': args.mode,
        'inductor': inductor,
        'loss_rel_diff': sig(loss_rel),
        'output_max_abs_diff': {k: sig(float((compiled[k] - eager[k]).abs().max())) for k in ('loc', 'conf')},
        'grad_rel_diff': sig(grad_rel),
        'worst_grads': [{'param': p, 'rel_diff': sig(v)} for p, v in worst],
        'nonfinite_grads': nonfinite,
        'eager_losses': [round(x, 4) for x in eager['losses']],
        'compiled_losses': [round(x, 4) for x in compiled['losses']],
        'first_nonfinite_step': {'eager': eager['first_nonfinite'], 'compiled': compiled['first_nonfinite']},
        'tolerance': args.tolerance, 'ok': ok,
    }))
    return ok


if __name__ == '__main__':
    sys.exit(0 if main(parse_args()) else 1)
