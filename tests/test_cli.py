"""utils/cli.py: the one-line error path shared by every script, and `--help` that answers
before PyTorch is loaded."""
import argparse
import os
import subprocess
import sys

import pytest

from utils.cli import UserError, at_least, one_line, run_cli
from utils.files.weights import CheckpointError
from utils.device import DeviceUnavailable
from utils.files.fileio import OutputDirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every script with a command line, as a user runs it.
SCRIPTS = ['train.py', 'quickstart.py', 'wider_test.py', 'wider_eval.py', 'demo.py', 'prepare_wider_data.py',
           'data/synthetic.py', 'tools/launch.py', 'tools/make_basenet.py', 'tools/convert_official.py',
           'tools/export_onnx.py', 'tools/plot_training.py', 'tools/compare_losses.py',
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
    for option, text in option_help(proc.stdout).items():
        # One default per option: not a sentence that states it and a '(default: ...)' after it.
        assert text.lower().count('default') <= 1 or option == '--sgd', (option, text)
        assert '(default: None)' not in text and '(default: False)' not in text, (option, text)
    if script in DEFAULTS_SHOWN:
        shown = option_help(proc.stdout)
        for option, default in DEFAULTS_SHOWN[script].items():
            assert shown[option].endswith(f'(default: {default})'), (option, shown[option])


# Options whose defaults --help once left out (issue 25).
DEFAULTS_SHOWN = {'wider_test.py': {'--split': 'val', '--device_id': '0'},
                  'data/synthetic.py': {'--train': '200', '--val': '50'},
                  'train.py': {'--seed': '0', '--device_id': '0'}}


def option_help(usage):
    """{option: its help text on one line} from the options section of an argparse --help."""
    lines = usage.split('\noptions:\n', 1)[-1].splitlines()
    found, option = {}, None
    for line in lines:
        if line.startswith('  -'):
            words = line.split()
            option = next(w.rstrip(',') for w in words if w.startswith('--'))
            found[option] = ' '.join(words[1:])
        elif line.startswith('   ') and option:
            found[option] += ' ' + line.strip()
        else:
            option = None
    return {k: v.strip() for k, v in found.items()}


def test_every_user_error_is_one_line_and_a_status(capsys):
    def main(args):
        raise args.error

    for error in (CheckpointError('a.pth: no such file'), DeviceUnavailable('--device gpu: no CUDA'),
                  OutputDirError('--out x: cannot write'), UserError('needs onnx')):
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



# A mistake each script finds once its arguments are parsed, and the name its error line must
# start with: argparse's `prog`, the start of its own usage errors.
MISTAKES = [
    (['wider_test.py', '--dataset_dir', 'nowhere'], 'wider_test.py'),
    (['wider_eval.py', '-p', 'nowhere', '-g', 'nowhere'], 'wider_eval.py'),
    (['prepare_wider_data.py', '--dataset_dir', 'nowhere'], 'prepare_wider_data.py'),
    (['data.synthetic', '--out', 'README.md', '--train', '1', '--val', '0'], 'python -m data.synthetic'),
    (['tools/plot_training.py', 'nowhere.jsonl'], 'plot_training.py'),
]


def run_as_main(argv, monkeypatch):
    """Run a script (a path, or a module's dotted name as `python -m` runs it) as its command
    line does, in this process; returns its exit status."""
    import runpy
    path = os.path.join(REPO, argv[0] if argv[0].endswith('.py') else argv[0].replace('.', os.sep) + '.py')
    monkeypatch.setattr(sys, 'argv', [path] + argv[1:])
    try:
        runpy.run_path(path, run_name='__main__')
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            return 1
        return stop.code
    return 0


@pytest.mark.parametrize('argv, prog', MISTAKES, ids=[m[1] for m in MISTAKES])
def test_every_script_starts_its_errors_as_argparse_does(argv, prog, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert run_as_main(argv, monkeypatch) not in (0, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), lines
    assert run_as_main(argv + ['--no_such_option'], monkeypatch) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f'{prog}: error: unrecognized arguments')


def fake_torchvision_for_another_torch(root, version='0.28.0+cu128'):
    """A torchvision package that cannot load with this torch, as a CPU torch beside a CUDA
    torchvision (or another version) fails. Upstream (pytorch/vision, torchvision/__init__.py)
    imports `.extension`, whose `_load_library` swallows the failed load of its C++ operators,
    then `_meta_registrations`, whose `@torch.library.register_fake("torchvision::nms")` makes
    torch itself raise `RuntimeError: operator torchvision::nms does not exist`. The fake runs
    that same torch call; its dist-info gives the installed version importlib.metadata reads."""
    package = root / 'torchvision'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text('import torch\nfrom . import _meta_registrations\n')
    (package / '_meta_registrations.py').write_text(
        'import torch\n\n\n@torch.library.register_fake("torchvision::nms")\n'
        'def meta_nms(dets, scores, iou_threshold):\n    return dets.new_empty(0, dtype=torch.long)\n')
    info = root / f'torchvision-{version}.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: torchvision\nVersion: {version}\n')
    return str(root)


def test_a_torchvision_built_for_another_torch_is_one_line_naming_both_and_the_fix(tmp_path):
    import torch
    from utils.cli import torch_pair_advice
    fake = fake_torchvision_for_another_torch(tmp_path / 'site')
    (tmp_path / 'face.jpg').write_bytes(b'not read: torchvision fails first')
    expected = (f'error: torchvision 0.28.0+cu128 does not work with torch {torch.__version__} (operator '
                f'torchvision::nms does not exist): they must be builds made for each other; '
                f'{torch_pair_advice(torch.__version__)}')
    # demo.py imports torchvision inside run_cli, make_basenet.py at its top level.
    for argv in (['demo.py', 'face.jpg', '--model', 'model.pth', '--device', 'cpu'],
                 ['tools/make_basenet.py', '--src', 'vgg16.pth', '--dst', 'basenet.pth']):
        proc = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=fake), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        assert proc.stderr.strip() == f'{os.path.basename(argv[0])}: {expected}'


def test_the_torch_pair_advice_installs_the_torchvision_of_that_torch_build():
    from utils.cli import torch_pair_advice
    assert torch_pair_advice('2.14.1+cpu') == ('pip install --force-reinstall --no-deps torchvision==0.29.1 '
                                               '--index-url https://download.pytorch.org/whl/cpu')
    assert torch_pair_advice('2.5.1+cu124').endswith('torchvision==0.20.1 --index-url '
                                                     'https://download.pytorch.org/whl/cu124')
    assert torch_pair_advice('2.9.0').endswith('torchvision==0.24.0')  # the default index's build


def test_an_error_inside_a_torchvision_operator_keeps_its_traceback():
    import torch
    from torchvision.ops import box_iou

    def main(args):
        box_iou(torch.zeros(2, 3), torch.zeros(2, 4))   # a bug, not an install problem

    with pytest.raises((RuntimeError, IndexError)):
        run_cli(main, lambda argv: argparse.Namespace(), prog='tool.py')
