"""utils/cli.py: the one-line error path shared by every script, and `--help` that answers
before PyTorch is loaded."""
import argparse
import os
import subprocess
import sys

import pytest

from utils.cli import ToolError, UserError, at_least, one_line, run_cli
from utils.checkpoint import CheckpointError
from utils.device import DeviceUnavailable
from utils.fileio import OutputDirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every script with a command line, as a user runs it.
SCRIPTS = ['train.py', 'wider_test.py', 'wider_eval.py', 'demo.py', 'prepare_wider_data.py',
           'data/synthetic.py', 'tools/make_basenet.py', 'tools/convert_official.py', 'tools/export_onnx.py',
           'tools/plot_training.py', 'tools/compare_losses.py',
           'benchmarks/bench_data.py', 'benchmarks/bench_eval.py', 'benchmarks/bench_infer.py',
           'benchmarks/bench_layers.py', 'benchmarks/bench_train.py', 'benchmarks/bench_startup.py',
           'benchmarks/check_compile.py', 'benchmarks/check_npu_ops.py', 'benchmarks/check_precision.py',
           'benchmarks/face_scale.py',
           'benchmarks/profile_train.py']

# What `--help` must not load: each of these takes from a tenth of a second (tqdm, PIL) to
# several seconds (torch) to import on a slow machine.
HEAVY = ('torch', 'torchvision', 'cv2', 'scipy', 'matplotlib', 'onnx', 'onnxruntime', 'tqdm', 'PIL')

RUN_HELP_WITHOUT_HEAVY_MODULES = """
import runpy, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {heavy!r}:
            raise ImportError('--help imported ' + name)
sys.meta_path.insert(0, Refuse())
sys.argv = [{script!r}, '--help']
sys.path.insert(0, {repo!r})
runpy.run_path({script!r}, run_name='__main__')
"""


def test_every_script_is_listed():
    with_cli = []
    for folder in ('.', 'data', 'tools', 'benchmarks', 'layers', 'utils'):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            path = os.path.normpath(os.path.join(folder, name))
            if name.endswith('.py') and "__name__ == '__main__'" in open(os.path.join(REPO, path)).read():
                with_cli.append(path)
    assert sorted(with_cli) == sorted(SCRIPTS)


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_answers_before_the_heavy_imports(script):
    code = RUN_HELP_WITHOUT_HEAVY_MODULES.format(heavy=HEAVY, script=script, repo=REPO)
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith('usage:'), proc.stdout[:500]


def test_every_user_error_is_one_line_and_a_status(capsys):
    def main(args):
        raise args.error

    for error in (CheckpointError('a.pth: no such file'), DeviceUnavailable('--device gpu: no CUDA'),
                  OutputDirError('--out x: cannot write'), ToolError('needs onnx')):
        assert isinstance(error, UserError)
        assert run_cli(main, lambda argv: argparse.Namespace(error=error), prog='tool.py', status=3) == 3
        assert capsys.readouterr().err == f'tool.py: error: {error}\n'
    with pytest.raises(ValueError):  # not a user error: a bug keeps its traceback
        run_cli(main, lambda argv: argparse.Namespace(error=ValueError('bug')))


def test_an_error_from_a_loader_worker_keeps_only_its_message():
    # torch.utils.data re-raises a worker's exception with the worker's traceback as its text.
    class DatasetError(UserError):
        pass

    worker = DatasetError('Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback '
                          '(most recent call last):\n  File "x.py", line 1, in f\n'
                          'data.widerface.DatasetError: l.txt: no readable training image found')
    assert one_line(worker) == 'l.txt: no readable training image found'
    assert one_line(DatasetError('first line\nsecond line')) == 'first line'
    assert one_line(DatasetError('')) == 'DatasetError'


@pytest.mark.parametrize('text, error', [('-1', 'must be at least 0'), ('x', "expected an integer, got 'x'"),
                                         ('11', 'must be at most 10')])
def test_at_least_refuses_with_argparse_words(text, error):
    with pytest.raises(argparse.ArgumentTypeError, match=error):
        at_least(0, maximum=10)(text)
    assert at_least(0.5, float)('0.5') == 0.5
    with pytest.raises(argparse.ArgumentTypeError):
        at_least(0.0, float)('nan')
