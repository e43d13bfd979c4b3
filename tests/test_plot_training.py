"""tools/plot_training.py: the curves of a run's metrics.jsonl (needs matplotlib)."""
import json

import pytest

from tools import plot_training

matplotlib = pytest.importorskip('matplotlib', reason='matplotlib not installed (optional: pip install matplotlib)')

# The demo's run (docs/training.md) and a run without --val_ap (best by loss), as train.py writes them.
DEMO_AP = [(0.0017, 0.0168, 0.0052), (0.0046, 0.0877, 0.0389), (0.0444, 0.0294, 0.0092), (0.2878, 0.1202, 0.0393),
           (0.5357, 0.2255, 0.0712)]


def rows(with_ap):
    out = []
    for epoch in range(5):
        ap = dict(zip(('easy', 'medium', 'hard'), DEMO_AP[epoch])) if with_ap else None
        out.append({'epoch': epoch, 'iteration': 27 * (epoch + 1), 'train_loss': 9.4 - epoch, 'val_loss': 12.0 - epoch / 2,
                    'ap': ap, 'best_saved': epoch in ((1, 4) if with_ap else (1, 3)), 'best_by': 'ap' if with_ap else 'loss'})
    return out


def drawn_points(ax):
    """Display coordinates of every plotted point of `ax` (markers and line ends)."""
    points = []
    for line in ax.lines:
        points.extend(line.get_transform().transform(line.get_xydata()))
    return points


@pytest.mark.parametrize('with_ap', [False, True], ids=['without --val_ap', 'with --val_ap'])
def test_panels_whole_epoch_ticks_and_legends_that_hide_nothing(with_ap):
    fig = plot_training.draw(rows(with_ap))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.get_axes()
    assert len(axes) == (2 if with_ap else 1)   # no empty AP panel without --val_ap
    for ax in axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks   # whole epochs
        assert (low, high) == (-0.5, 4.5)
        box = ax.get_legend().get_window_extent(renderer)
        assert not box.overlaps(ax.get_window_extent(renderer))
        assert not any(box.contains(x, y) for x, y in drawn_points(ax))
        assert 'sfd_face.pth: epoch' in [t.get_text() for t in ax.get_legend().get_texts()][-1]


def test_main_writes_the_picture_beside_the_metrics(tmp_path, capsys):
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(''.join(json.dumps(r) + '\n' for r in rows(False)))
    out = plot_training.main(plot_training.parse_args([str(metrics)]))
    assert out == str(tmp_path / 'training.png') and (tmp_path / 'training.png').read_bytes()[:4] == b'\x89PNG'
    assert capsys.readouterr().out == f'5 epochs drawn to {out}\n'
