"""Do two training runs align? The Ascend recipe's acceptance check: the losses of a GPU run and of an
NPU run of the same seed and options agree at equal iterations.

    python tools/compare_losses.py gpu.log npu.log [--tolerance 0.05] [--plot losses.png]
    python tools/compare_losses.py weights_gpu/metrics.jsonl weights_npu/metrics.jsonl

Each input is what train.py printed (its log: the `epoch:E || iter:I || Loss:X` blocks and the
`test epoch:E || Loss:X` validation lines) or the metrics.jsonl it writes in its --save_folder (the
epoch's mean training loss at the epoch's last iteration, and the validation loss). The table
lists, at every iteration both runs logged, the training loss of each run (a log's Loss: the mean
over the epoch so far), then the validation loss at every epoch both validated, each with the
difference B - A and the relative difference |B - A| / |A| (A: the first file, the reference).
The verdict: aligned when the mean relative difference is within --tolerance, else not aligned
(docs/training.md, "Do a GPU run and an NPU run align?", says where the default comes from and how
to measure your own). A run logged twice over (a resumed run) counts its last value.

Exit status: 0 aligned, 1 not aligned, 2 bad input (one line naming the file and line).
--plot draws both curves (needs matplotlib; without it the table and verdict still print).
"""
import argparse
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cli import UserError, at_least, run_cli  # noqa: E402

DEFAULT_TOLERANCE = 0.05
# train.py's log lines (the original repository's format; spaces around the separators may vary)
TRAIN_LINE = re.compile(r'^\s*epoch:\s*(\d+)\s*\|\|\s*iter:\s*(\d+)\s*\|\|\s*Loss:\s*(\S+)\s*$')
VAL_LINE = re.compile(r'^\s*test epoch:\s*(\d+)\s*\|\|\s*Loss:\s*(\S+)\s*$')


class Run:
    """One run's losses: `train` {iteration: loss}, `val` {epoch: loss}."""

    def __init__(self, path):
        self.path = path
        self.train = {}
        self.val = {}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('reference', help='train.py log or metrics.jsonl of the reference run (A, e.g. the GPU)')
    parser.add_argument('other', help='train.py log or metrics.jsonl of the run to check (B, e.g. the NPU)')
    parser.add_argument('--tolerance', type=at_least(0.0, float), default=DEFAULT_TOLERANCE,
                        help='largest mean relative difference |B - A| / |A| still called aligned '
                             f'(default {DEFAULT_TOLERANCE:g})')
    parser.add_argument('--plot', default=None, metavar='FILE',
                        help='also draw both runs\' curves to FILE (png, pdf, svg; needs matplotlib)')
    return parser.parse_args(argv)


def _number(text, path, number):
    try:
        value = float(text)
    except ValueError:
        raise UserError(f'{path}:{number}: loss {text!r} is not a number') from None
    return value


def read_run(path):
    """A Run from a train.py log or a metrics.jsonl file; UserError (one line) when it holds neither."""
    try:
        with open(path, encoding='utf-8-sig', errors='replace') as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise UserError(f'{path}: no such file') from None
    except OSError as exc:
        raise UserError(f'{path}: cannot read the file ({exc.strerror or exc})') from None
    run = Run(path)
    if any(line.lstrip().startswith('{') for line in lines[:5]):
        _read_metrics(run, lines)
    else:
        for number, line in enumerate(lines, 1):
            match = TRAIN_LINE.match(line)
            if match:
                run.train[int(match.group(2))] = _number(match.group(3), path, number)
                continue
            match = VAL_LINE.match(line)
            if match:
                run.val[int(match.group(1))] = _number(match.group(2), path, number)
    if not run.train and not run.val:
        raise UserError(f'{path}: no train.py loss lines (epoch:E || iter:I || Loss:X) and no metrics.jsonl rows')
    return run


def _read_metrics(run, lines):
    """metrics.jsonl (utils.training.save_folder.metrics_rows): each epoch's mean training loss at
    its last iteration, and its validation loss."""
    from utils.training.save_folder import metrics_rows

    for row in metrics_rows(lines, run.path):
        for key in ('train_loss', 'val_loss'):
            if row.get(key) is not None and not isinstance(row[key], (int, float)):
                raise UserError(f'{run.path}: epoch {row["epoch"]}: "{key}" is not a number')
        if row.get('train_loss') is not None and isinstance(row.get('iteration'), int):
            run.train[row['iteration']] = float(row['train_loss'])
        if row.get('val_loss') is not None:
            run.val[row['epoch']] = float(row['val_loss'])


def relative(a, b):
    """|b - a| / |a|: inf where a is 0 and b is not; not finite losses count as inf."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    if a == b:
        return 0.0
    return abs(b - a) / abs(a) if a else math.inf


def compare(a, b):
    """Rows (kind, at, loss A, loss B, relative difference) at the iterations and epochs in common."""
    rows = [('train', f'iter {i}', a.train[i], b.train[i], relative(a.train[i], b.train[i]))
            for i in sorted(set(a.train) & set(b.train))]
    rows += [('val', f'epoch {e}', a.val[e], b.val[e], relative(a.val[e], b.val[e]))
             for e in sorted(set(a.val) & set(b.val))]
    if not rows:
        raise UserError(f'{a.path} and {b.path} have no iteration or validated epoch in common '
                        f'(A: iterations {_span(a.train)}, B: iterations {_span(b.train)})')
    return rows


def _span(points):
    return f'{min(points)}-{max(points)}' if points else 'none'


def report(a, b, rows, tolerance):
    """Print the table and the verdict; returns whether the runs align."""
    print(f'A: {a.path}')
    print(f'B: {b.path}')
    print(f'{"":5} {"at":>11} {"loss A":>11} {"loss B":>11} {"B - A":>10} {"relative":>9}')
    for kind, at, loss_a, loss_b, rel in rows:
        print(f'{kind:5} {at:>11} {loss_a:11.4f} {loss_b:11.4f} {loss_b - loss_a:+10.4f} {rel:9.2%}')
    mean = sum(row[4] for row in rows) / len(rows)
    worst = max(rows, key=lambda row: row[4])
    aligned = mean <= tolerance
    print(f'mean relative difference {mean:.2%} over {len(rows)} points (largest {worst[4]:.2%}, {worst[0]} '
          f'{worst[1]}); tolerance {tolerance:.2%}: {"aligned" if aligned else "NOT aligned"}')
    return aligned


def plot(a, b, path):
    """Both runs' training loss per iteration and validation loss per epoch. False (with a line
    on stderr) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f'compare_losses.py: --plot needs matplotlib, which is not installed (pip install matplotlib); '
              f'{path} not drawn', file=sys.stderr)
        return False
    from utils.files.fileio import atomic_path

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    train_ax, val_ax = fig.subplots(1, 2)
    for run, name in ((a, 'A'), (b, 'B')):
        label = f'{name}: {os.path.basename(run.path)}'
        if run.train:
            train_ax.plot(*zip(*sorted(run.train.items())), marker='.', label=label)
        if run.val:
            val_ax.plot(*zip(*sorted(run.val.items())), marker='o', label=label)
    train_ax.set(xlabel='iteration', ylabel='training loss (loc + conf)')
    val_ax.set(xlabel='epoch', ylabel='validation loss')
    for ax in (train_ax, val_ax):
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=100)
    except (OSError, ValueError) as exc:
        raise UserError(f'{path}: cannot write the plot ({exc})') from None
    print(f'curves drawn to {path}')
    return True


def main(args):
    a, b = read_run(args.reference), read_run(args.other)
    aligned = report(a, b, compare(a, b), args.tolerance)
    if args.plot:
        plot(a, b, args.plot)
    return aligned


def cli(argv=None):
    result = {}
    status = run_cli(lambda args: result.setdefault('aligned', main(args)), parse_args, argv,
                     prog='compare_losses.py', status=2)
    return status if status else (0 if result.get('aligned') else 1)


if __name__ == '__main__':
    sys.exit(cli())
