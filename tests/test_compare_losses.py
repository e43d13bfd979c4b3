"""tools/compare_losses.py: reading train.py's logs and metrics.jsonl, the table and the verdict,
one-line errors, the plot with and without matplotlib. (The CPU float32 run against the fake
NPU's Apex O2 run is in tests/test_npu.py.)"""
import json
import sys

import pytest

from tools import compare_losses

LOG_A = """Device: cuda:0 | autocast bfloat16
Timer: 0.3231
epoch:8 || iter:6640 || Loss:2.9980
->> conf loss:1.9670 || loc loss:1.9074
->>lr:0.001000
Timer: 0.3260
epoch:8 || iter:6650 || Loss:3.0034
->> conf loss:2.0115 || loc loss:1.9247
->>lr:0.001000
Timer: 392.5459
test epoch:8 || Loss:6.2771
"""
# another spacing, a resumed run logging iteration 6650 twice (the last counts), an iteration A lacks
LOG_B = """epoch:8  ||  iter:6640  ||  Loss:3.0280
epoch:8 || iter:6650 || Loss:9.9999
Resuming training, loading weights/sfd_face_checkpoint.pth...
epoch:8 || iter:6650 || Loss:3.0334
epoch:8 || iter:6660 || Loss:3.0076
test epoch:8 || Loss:6.2000
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_logs_compared_at_equal_iterations_and_epochs(tmp_path, capsys):
    a, b = write(tmp_path, 'gpu.log', LOG_A), write(tmp_path, 'npu.log', LOG_B)
    assert compare_losses.cli([a, b]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(('train', 'val'))]
    assert rows == [['train', 'iter', '6640', '2.9980', '3.0280', '+0.0300', '1.00%'],
                    ['train', 'iter', '6650', '3.0034', '3.0334', '+0.0300', '1.00%'],
                    ['val', 'epoch', '8', '6.2771', '6.2000', '-0.0771', '1.23%']]
    assert out.rstrip().endswith('tolerance 5.00%: aligned')
    assert compare_losses.cli([a, b, '--tolerance', '0.01']) == 1
    assert capsys.readouterr().out.rstrip().endswith('tolerance 1.00%: NOT aligned')


def test_metrics_jsonl_rows(tmp_path, capsys):
    rows = [{'epoch': 0, 'iteration': 4, 'train_loss': 10.0, 'val_loss': 20.0},
            {'epoch': 1, 'iteration': 8, 'train_loss': 8.0, 'val_loss': None}]
    a = write(tmp_path, 'a.jsonl', ''.join(json.dumps(r) + '\n' for r in rows))
    b = write(tmp_path, 'b.jsonl', ''.join(json.dumps(dict(r, train_loss=r['train_loss'] * 2)) + '\n' for r in rows)
              + '{"epoch": 2, "iter')  # a last line cut short by a crash is left out
    assert compare_losses.cli([a, b]) == 1
    out = capsys.readouterr().out
    assert 'iter 4' in out and 'iter 8' in out and 'epoch 0' in out and 'epoch 1' not in out
    assert 'mean relative difference 66.67% over 3 points' in out


@pytest.mark.parametrize('content, words', [
    (None, 'no such file'),
    ('hello\n', 'no train.py loss lines'),
    ('{"epoch": 0}\nnot json\n{"epoch": 1}\n', 'bad.txt:2: not a JSON object'),
    ('{"epoch": "x", "train_loss": 1}\n', 'bad.txt:1: a row without an integer "epoch"'),
    ('epoch:0 || iter:0 || Loss:abc\n', "bad.txt:1: loss 'abc' is not a number"),
])
def test_bad_input_is_one_line(tmp_path, capsys, content, words):
    bad = str(tmp_path / 'bad.txt') if content is None else write(tmp_path, 'bad.txt', content)
    good = write(tmp_path, 'good.log', LOG_A)
    assert compare_losses.cli([good, bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('compare_losses.py: error: ') and words in err and '\n' not in err, err


def test_no_common_iteration(tmp_path, capsys):
    a = write(tmp_path, 'a.log', 'epoch:0 || iter:0 || Loss:1.0\n')
    b = write(tmp_path, 'b.log', 'epoch:0 || iter:10 || Loss:1.0\n')
    assert compare_losses.cli([a, b]) == 2
    err = capsys.readouterr().err
    assert 'no iteration or validated epoch in common (A: iterations 0-0, B: iterations 10-10)' in err


def test_non_finite_and_zero_losses_are_not_aligned():
    assert compare_losses.relative(2.0, 2.0) == 0.0
    assert compare_losses.relative(0.0, 1.0) == float('inf')
    assert compare_losses.relative(1.0, float('nan')) == float('inf')


def test_plot_written_and_without_matplotlib(tmp_path, capsys, monkeypatch):
    a, b = write(tmp_path, 'gpu.log', LOG_A), write(tmp_path, 'npu.log', LOG_B)
    png = tmp_path / 'curves.png'
    assert compare_losses.cli([a, b, '--plot', str(png)]) == 0
    assert png.stat().st_size > 0 and f'curves drawn to {png}' in capsys.readouterr().out
    for name in ('matplotlib', 'matplotlib.backends.backend_agg', 'matplotlib.figure'):
        monkeypatch.setitem(sys.modules, name, None)  # not installed
    missing = tmp_path / 'missing.png'
    assert compare_losses.cli([a, b, '--plot', str(missing)]) == 0  # the verdict still stands
    captured = capsys.readouterr()
    assert 'aligned' in captured.out and not missing.exists()
    assert captured.err.strip() == (f'compare_losses.py: --plot needs matplotlib, which is not installed '
                                    f'(pip install matplotlib); {missing} not drawn')
