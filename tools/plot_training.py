"""Draw a training run's curves from the metrics file train.py writes in its --save_folder.

    python tools/plot_training.py weights/metrics.jsonl [--out weights/training.png]

Left: the training loss (mean over the epoch) and the validation loss, per epoch. Right, for
a run with --val_ap: the WIDER AP of each epoch evaluated (Easy/Medium/Hard, or one AP over
all faces when the official ground truth was not found). The epoch that sfd_face.pth holds
is marked in each panel; legends sit below the panels. A run that was resumed may list an epoch twice: its last row counts. Needs matplotlib
(pip install matplotlib).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cli import HelpFormatter, UserError, run_cli  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('metrics', help='metrics.jsonl written by train.py in its --save_folder')
    parser.add_argument('--out', default=None, help='image file (png, pdf, svg; default: training.png '
                                                    'beside the metrics file)')
    return parser.parse_args(argv)


def read_metrics(path):
    """The rows of a metrics file, one per epoch, in epoch order (utils.training.save_folder);
    UserError when it holds none."""
    from utils.training.save_folder import read_metrics as rows_of

    rows = rows_of(path)
    if not rows:
        raise UserError(f'{path}: holds no epoch yet')
    return rows


def draw(rows):
    """The figure of `rows` (read_metrics): the losses per epoch, and the AP per epoch when any
    epoch has one, the epoch sfd_face.pth holds marked in each panel. Epoch ticks are whole
    epochs; each legend is below its panel, where it hides no point. A run without --val_ap
    gets the loss panel alone (no empty AP panel)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError('drawing needs matplotlib, which is not installed: pip install matplotlib') from None

    epochs = [row['epoch'] for row in rows]
    settings = []
    for row in rows:
        for name in (row.get('ap') or {}):
            if name not in settings:
                settings.append(name)
    fig = Figure(figsize=(12 if settings else 6.5, 5), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if settings else 1, squeeze=False)[0]
    loss_ax = axes[0]
    for key, label in (('train_loss', 'training loss (epoch mean)'), ('val_loss', 'validation loss')):
        points = [(e, row[key]) for e, row in zip(epochs, rows) if row.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), marker='o', label=label)
    loss_ax.set_ylabel('loss (loc + conf)')
    if settings:
        ap_ax = axes[1]
        for name in settings:
            points = [(e, row['ap'][name]) for e, row in zip(epochs, rows)
                      if (row.get('ap') or {}).get(name) is not None]
            ap_ax.plot(*zip(*points), marker='o', label=f'{name} AP')
        ap_ax.set_ylabel('WIDER AP (official protocol)')
        ap_ax.set_ylim(0, 1)
    kept = [row for row in rows if row.get('best_saved')]
    for ax in axes:
        if kept:
            last = kept[-1]
            ax.axvline(last['epoch'], color='grey', linestyle='--',
                       label=f'sfd_face.pth: epoch {last["epoch"]} (best {last.get("best_by", "loss")})')
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return fig


def plot(rows, out):
    """Draw `rows` (see draw) into the image file `out`, written atomically."""
    from utils.files.fileio import atomic_path

    fig = draw(rows)
    ext = os.path.splitext(out)[1].lstrip('.').lower() or 'png'
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=ext, dpi=100)


def main(args):
    rows = read_metrics(args.metrics)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), 'training.png')
    plot(rows, out)
    print(f'{len(rows)} epochs drawn to {out}')
    return out


if __name__ == '__main__':
    sys.exit(run_cli(main, parse_args, prog='plot_training.py'))
