"""train.py end to end on a tiny synthetic WIDER FACE, on the CPU."""
import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import computed_once, synthetic_lists
from data.config import cfg
from layers.modules import multibox_loss
from utils.training import checkpoint as training_checkpoint
from utils.training import engine
from utils.training.checkpoint import TrainState
from s3fd import build_s3fd
from utils.files.weights import atomic_save, load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def lists(tmp_path_factory):
    return tuple(computed_once(tmp_path_factory, 'train_lists', lambda folder: synthetic_lists(folder)))


def run_args(lists, save_folder, *extra):
    train_file, val_file = lists
    return ['--device', 'cpu', '--basenet', 'none', '--input_size', '64', '--batch_size', '2',
            '--num_workers', '0', '--train_file', train_file, '--val_file', val_file,
            '--save_folder', str(save_folder), *extra]


def run_main(lists, save_folder, *extra):
    """train.py's main in this process: the TrainState it ends with."""
    return train.main(train.parse_args(run_args(lists, save_folder, *extra)))[0]


def run_cli(lists, save_folder, *extra):
    """train.py's command-line entry in this process: its exit status (errors are printed)."""
    return train.cli(run_args(lists, save_folder, *extra))


LOG_PATTERNS = [r'Timer: \d+\.\d{4}', r'epoch:\d+ \|\| iter:\d+ \|\| Loss:\d+\.\d{4}',
                r'->> conf loss:\d+\.\d{4} \|\| loc loss:\d+\.\d{4}', r'->>lr:\d+\.\d{6}']


@pytest.fixture(scope='module')
def uninterrupted(lists, tmp_path_factory):
    """One plain run of 2 epochs (8 iterations): its log lines, its folder and its TrainState (made
    once for the pytest workers)."""
    def compute(folder):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            state = run_main(lists, folder, '--epochs', '2')
        return out.getvalue().splitlines(), str(folder), dataclasses.asdict(state)

    out, folder, state = computed_once(tmp_path_factory, 'uninterrupted', compute)
    return out, pathlib.Path(folder), TrainState(**state)


def test_end_to_end_logs_and_files(uninterrupted):
    out, folder, state = uninterrupted
    # Exactly the original four lines, in order, at iteration 0 (no speed line without --log_speed).
    start = next(i for i, line in enumerate(out) if line.startswith('epoch:0 || iter:0 ')) - 1
    for pattern, line in zip(LOG_PATTERNS, out[start:start + 5]):
        assert re.fullmatch(pattern, line), (pattern, line)
    assert not out[start + 4].startswith('->>'), out[start + 4]
    assert not any('speed:' in line for line in out)
    assert any(re.fullmatch(r'test epoch:1 \|\| Loss:\d+\.\d{4}', line) for line in out)
    assert 'Saving best state,epoch 0' in out
    assert state.epoch == 2 and state.iteration == 8  # 9 images with faces -> 4 batches of 2
    ckpt = load_file(str(folder / 'sfd_face_checkpoint.pth'))
    assert ckpt['epoch'] == 1 and set(ckpt['weight']) == set(build_s3fd('train').state_dict())
    net = build_s3fd('test')
    net.load_state_dict(torch.load(folder / 'sfd_face.pth', weights_only=True), strict=True)
    assert ckpt['state']['iteration'] == 8 and ckpt['step_index'] == 0
    assert ckpt['args']['batch_size'] == 2 and ckpt['cfg']['ANCHOR_SIZES'] == [16, 32, 64, 128, 256, 512]
    assert not [f for f in os.listdir(folder) if f.endswith('.tmp')]


def test_resume_is_exact_mid_epoch_and_at_epoch_end(lists, uninterrupted, tmp_path, capsys):
    _, full, _ = uninterrupted
    checkpoint = str(tmp_path / 'sfd_face_checkpoint.pth')
    run_main(lists, tmp_path, '--epochs', '2', '--max_iter', '3', '--log_speed')  # stops inside epoch 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith('epoch:0 || iter:0 ')) - 1
    for pattern, line in zip(LOG_PATTERNS, out[start:start + 4]):
        assert re.fullmatch(pattern, line), (pattern, line)
    assert re.fullmatch(r'->> speed:\d+\.\d img/s \|\| data wait:\d+\.\d{4}s/iter \|\| eta:\d+:\d\d:\d\d',
                        out[start + 4])
    stopped = load_file(checkpoint)
    assert stopped['state']['iteration'] == 3 and stopped['state']['batch_in_epoch'] == 3
    run_main(lists, tmp_path, '--epochs', '2', '--max_iter', '4', '--resume', checkpoint)  # epoch end
    stopped = load_file(checkpoint)
    assert stopped['state']['iteration'] == 4 and stopped['epoch'] == 0
    assert stopped['state']['epoch'] == 1 and stopped['state']['batch_in_epoch'] == 0
    run_main(lists, tmp_path, '--epochs', '2', '--resume', checkpoint)
    a, b = load_file(str(full / 'sfd_face_checkpoint.pth')), load_file(checkpoint)
    assert a['state']['iteration'] == b['state']['iteration'] == 8
    for key, value in a['weight'].items():
        assert torch.equal(value, b['weight'][key]), key
    for key, value in a['optimizer']['state'].items():
        assert torch.equal(value['momentum_buffer'], b['optimizer']['state'][key]['momentum_buffer'])
    assert a['state']['best_loss'] == pytest.approx(b['state']['best_loss'], rel=1e-6)
    assert a['state']['loss_sum'] == pytest.approx(b['state']['loss_sum'], rel=1e-6)


def _stop_at_the_first_validation_batch(monkeypatch, lists, folder, *extra):
    """Train with SIGINT sent while the first validation batch is loaded; returns the checkpoint."""
    real_to_device, calls = engine.to_device, []

    def to_device(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # 4 training batches, then validation
            os.kill(os.getpid(), signal.SIGINT)
        return real_to_device(*args, **kwargs)

    monkeypatch.setattr(engine, 'to_device', to_device)
    run_main(lists, folder, *extra)
    monkeypatch.setattr(engine, 'to_device', real_to_device)
    return str(folder / 'sfd_face_checkpoint.pth')


def test_a_stop_during_validation_saves_the_trained_epoch_and_resumes_exactly(lists, uninterrupted, tmp_path,
                                                                            monkeypatch, capsys):
    _, full, _ = uninterrupted
    checkpoint = _stop_at_the_first_validation_batch(monkeypatch, lists, tmp_path, '--epochs', '2')
    out = capsys.readouterr()
    assert 'SIGINT during validation: epoch 0 is trained, a resume validates it first' in out.out
    assert 'test epoch' not in out.out and not (tmp_path / 'sfd_face.pth').exists()
    stopped = load_file(checkpoint)['state']
    assert (stopped['epoch'], stopped['iteration'], stopped['batch_in_epoch'], stopped['unvalidated_epoch']) \
        == (1, 4, 0, 0)
    run_main(lists, tmp_path, '--epochs', '2', '--resume', checkpoint)
    assert re.search(r'^test epoch:0 \|\| Loss:', capsys.readouterr().out, re.M)
    a, b = load_file(str(full / 'sfd_face_checkpoint.pth')), load_file(checkpoint)
    assert a['state']['iteration'] == b['state']['iteration'] == 8
    for key, value in a['weight'].items():
        assert torch.equal(value, b['weight'][key]), key
    assert a['state']['best_loss'] == pytest.approx(b['state']['best_loss'], rel=1e-6)


def test_a_stop_during_the_last_validation_is_finished_by_a_resume(lists, tmp_path, monkeypatch, capsys):
    checkpoint = _stop_at_the_first_validation_batch(monkeypatch, lists, tmp_path, '--epochs', '1')
    capsys.readouterr()
    # The epoch is trained: a resume may change the batch size, and it validates before finishing.
    state = run_main(lists, tmp_path, '--epochs', '1', '--batch_size', '4', '--resume', checkpoint)
    out = capsys.readouterr().out
    assert re.search(r'^test epoch:0 \|\| Loss:', out, re.M) and 'Saving best state,epoch 0' in out
    assert (tmp_path / 'sfd_face.pth').exists() and state.unvalidated_epoch is None
    assert load_file(checkpoint)['state']['unvalidated_epoch'] is None


def test_sigterm_saves_a_checkpoint_and_exits_as_stopped_resumable(lists, tmp_path):
    cmd = [sys.executable, '-u', 'train.py', *run_args(lists, tmp_path, '--epochs', '50')]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('test epoch:0 '):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, ''.join(lines)
    rest, _ = proc.communicate(timeout=120)
    # Stopped, resumable: EX_TEMPFAIL for a scheduler to requeue, and a line that says so.
    assert proc.returncode == 75, ''.join(lines) + rest
    assert 'checkpoint saved' in rest and 'Finished:' not in rest
    ckpt = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert ckpt['state']['iteration'] >= 4
    assert (f'Stopped at iteration {ckpt["state"]["iteration"]} (SIGTERM); resume with --resume '
            f'{tmp_path / "sfd_face_checkpoint.pth"}') in rest.splitlines()


@pytest.fixture(scope='module')
def torchrun_epoch(lists, tmp_path_factory):
    """One epoch under torchrun, 2 processes (made once for the pytest workers): (its return code,
    stdout and stderr, its save folder)."""
    def compute(folder):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               'train.py', *run_args(lists, folder, '--epochs', '1')]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS='1'))
        return proc.returncode, proc.stdout, proc.stderr, str(folder)

    returncode, stdout, stderr, folder = computed_once(tmp_path_factory, 'torchrun_epoch', compute)
    return subprocess.CompletedProcess([], returncode, stdout, stderr), pathlib.Path(folder)


def test_torchrun_two_processes_one_log_stream(torchrun_epoch):
    proc, folder = torchrun_epoch
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out, everything = proc.stdout.splitlines(), proc.stdout + proc.stderr
    assert sum(line.startswith('epoch:0 || iter:0 ') for line in out) == 1, everything
    assert sum(line.startswith('test epoch:0 ') for line in out) == 1, everything
    assert '2 processes, batch 2 each' in proc.stdout, everything
    assert sum(line.startswith('Finished: ') for line in out) == 1, everything
    ckpt = load_file(str(folder / 'sfd_face_checkpoint.pth'))
    assert ckpt['state']['iteration'] == 2  # 9 images / (2 processes x 2) -> 2 iterations
    assert 'module.vgg.0.weight' not in ckpt['weight'] and ckpt['world_size'] == 2


def test_resume_loads_after_initialize_and_checks_what_defines_the_batches(lists, tmp_path, capsys, monkeypatch):
    checkpoint = str(tmp_path / 'sfd_face_checkpoint.pth')
    run_main(lists, tmp_path, '--epochs', '2', '--max_iter', '3')  # stops inside epoch 0
    capsys.readouterr()
    # Apex reads its loss scalers only after amp.initialize: weights, optimizer and amp state
    # are loaded after the device context's initialize.
    order = []
    from utils import device as devices
    initialize, load_amp = devices.Runtime.initialize, devices.Runtime.load_state_dict
    monkeypatch.setattr(devices.Runtime, 'initialize',
                        lambda self, *a: order.append('initialize') or initialize(self, *a))
    monkeypatch.setattr(devices.Runtime, 'load_state_dict',
                        lambda self, *a: order.append('amp state') or load_amp(self, *a))
    load_weights = training_checkpoint.load_weights
    monkeypatch.setattr(training_checkpoint, 'load_weights', lambda *a: order.append('weights') or load_weights(*a))
    run_main(lists, tmp_path, '--epochs', '2', '--max_iter', '4', '--lr', '5e-4', '--resume', checkpoint)
    assert order == ['initialize', 'weights', 'amp state']
    assert 'Resuming with changed options: --lr 0.0005 (checkpoint 0.001)' in capsys.readouterr().out
    run_main(lists, tmp_path, '--epochs', '2', '--max_iter', '5', '--resume', checkpoint)  # stops mid-epoch 1
    for changed, words in ((['--batch_size', '3'], 'batch_size (checkpoint 2, now 3)'),
                           (['--seed', '1'], 'seed (checkpoint 0, now 1)')):
        assert run_cli(lists, tmp_path, '--epochs', '2', '--resume', checkpoint, *changed) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith('train.py: error: ') and 'stopped mid-epoch (1 batches into epoch 1)' in err
        assert words in err
    ckpt = load_file(checkpoint)
    ckpt['variant'] = 'caffe'
    atomic_save(ckpt, str(tmp_path / 'caffe.pth'))
    assert run_cli(lists, tmp_path, '--epochs', '2', '--resume', str(tmp_path / 'caffe.pth')) == 2
    assert "holds a 'caffe' model, this run builds 'reference'" in capsys.readouterr().err


def _run_cli(*args):
    return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_channels_last_is_on_off_or_left_to_the_device():
    assert train.parse_args([]).channels_last is None  # main(): on for --device gpu only
    assert train.parse_args(['--channels_last']).channels_last is True
    assert train.parse_args(['--no-channels_last']).channels_last is False


def test_loader_images_reach_the_device_as_float_minus_mean():
    images = torch.tensor([[[[0, 255]], [[117, 0]], [[104, 1]]]], dtype=torch.uint8)  # [1, 3, 1, 2]
    targets = [torch.zeros(0, 5)]
    out, same_targets = engine.to_device(images, targets, torch.device('cpu'))
    assert out.dtype == torch.float32 and same_targets is targets
    assert out.flatten().tolist() == [-123, 132, 0, -117, 0, -103]
    floats = torch.randn(1, 3, 1, 2)
    assert torch.equal(engine.to_device(floats, targets, torch.device('cpu'))[0], floats)
    wide = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    last, _ = engine.to_device(wide, targets, torch.device('cpu'), channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last, engine.to_device(wide, targets, torch.device('cpu'))[0])


def test_device_errors_are_one_clear_line():
    if not torch.cuda.is_available():
        proc = _run_cli('--device', 'gpu')
        assert proc.returncode != 0 and 'Traceback' not in proc.stderr
        assert proc.stderr.strip().count('\n') == 0 and 'no CUDA device' in proc.stderr
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        proc = _run_cli('--device', 'npu')
        assert proc.returncode != 0 and 'Traceback' not in proc.stderr
        assert proc.stderr.strip().count('\n') == 0 and 'torch_npu' in proc.stderr


def test_missing_basenet_says_where_and_how(lists, tmp_path, capsys):
    assert run_cli(lists, tmp_path, '--basenet', 'vgg16_reducedfc.pth') == 2
    err = capsys.readouterr().err
    assert 'vgg16_reducedfc.pth' in err and 'tools/make_basenet.py' in err and '--basenet none' in err
    assert f'python tools/make_basenet.py --src torchvision --dst {tmp_path / "vgg16_reducedfc.pth"}' in err


def test_basenet_is_loaded_into_the_trunk(lists, tmp_path, capsys):
    vgg = build_s3fd('train').vgg.state_dict()
    vgg = {k: torch.full_like(v, 0.01) for k, v in vgg.items()}
    atomic_save(vgg, str(tmp_path / 'vgg16_reducedfc.pth'))
    run_main(lists, tmp_path, '--basenet', 'vgg16_reducedfc.pth', '--epochs', '1', '--max_iter', '1', '--lr', '0')
    ckpt = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert torch.allclose(ckpt['weight']['vgg.0.weight'], torch.full_like(vgg['0.weight'], 0.01))
    assert 'Load base network' in capsys.readouterr().out


def test_bad_resume_checkpoints(lists, tmp_path, capsys):
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all')
    assert run_cli(lists, tmp_path, '--resume', str(garbage)) == 2
    assert 'garbage.pth' in capsys.readouterr().err
    wrong = tmp_path / 'wrong.pth'
    sd = build_s3fd('train').state_dict()
    sd.pop('conf.0.weight')
    sd['extra.weight'] = torch.zeros(1)
    atomic_save(sd, str(wrong))
    assert run_cli(lists, tmp_path, '--resume', str(wrong)) == 2
    err = capsys.readouterr().err
    assert 'conf.0.weight' in err and 'extra.weight' in err


def _train_error(lists, tmp_path, capsys, *extra):
    status = run_cli(lists, tmp_path, *extra)
    err = capsys.readouterr().err.strip()
    assert status == 2 and 'Traceback' not in err, err
    last = err.splitlines()[-1]
    assert last.startswith('train.py: error: '), err
    return last


def test_bad_inputs_are_one_line_before_or_instead_of_a_traceback(lists, tmp_path, capsys):
    err = _train_error(lists, tmp_path, capsys, '--val_file', str(tmp_path / 'val_typo.txt'))
    assert 'val_typo.txt: no such file' in err
    assert 'is a directory' in _train_error(lists, tmp_path, capsys, '--resume', str(tmp_path))
    # --basenet given a torchvision VGG16, or a whole S3FD model: say what to do instead.
    torchvision_vgg = {'features.0.weight': torch.zeros(64, 3, 3, 3), 'classifier.0.weight': torch.zeros(1)}
    atomic_save(torchvision_vgg, str(tmp_path / 'vgg16.pth'))
    err = _train_error(lists, tmp_path, capsys, '--basenet', str(tmp_path / 'vgg16.pth'))
    assert 'torchvision VGG16: convert it with tools/make_basenet.py' in err
    atomic_save(build_s3fd('train').state_dict(), str(tmp_path / 'model.pth'))
    err = _train_error(lists, tmp_path, capsys, '--basenet', str(tmp_path / 'model.pth'))
    assert 'whole S3FD model: continue from it with --resume' in err
    # Optimizer state whose buffers do not fit the parameters (a hand-edited file).
    run_main(lists, tmp_path, '--max_iter', '1')
    checkpoint = str(tmp_path / 'sfd_face_checkpoint.pth')
    ckpt = load_file(checkpoint)
    ckpt['optimizer']['state'][0]['momentum_buffer'] = torch.zeros(3, 3)
    atomic_save(ckpt, checkpoint)
    err = _train_error(lists, tmp_path, capsys, '--max_iter', '2', '--resume', checkpoint)
    assert 'a momentum buffer of shape (3, 3) for a parameter of shape (64, 3, 3, 3)' in err


@pytest.mark.parametrize('workers', ['0', '1'])
def test_a_list_of_unreadable_images_is_one_line(tmp_path, capsys, workers):
    corrupt = tmp_path / 'corrupt.jpg'
    corrupt.write_bytes(b'not an image')
    (tmp_path / 'l.txt').write_text(f'{corrupt} 1 1 1 9 9 1\n' * 4)
    lists = (str(tmp_path / 'l.txt'), str(tmp_path / 'none.txt'))
    with pytest.warns(RuntimeWarning) if workers == '0' else contextlib.nullcontext():
        err = _train_error(lists, tmp_path, capsys, '--num_workers', workers, '--val_file', cfg.FACE.VAL_FILE)
    assert err.startswith(f'train.py: error: {tmp_path / "l.txt"}: no readable training image found'), err


@pytest.mark.parametrize('option, value, words', [
    ('--lr', '-1', 'must be at least 0.0'), ('--lr', 'nan', 'must be at least 0.0'),
    ('--seed', '-1', 'must be at least 0'), ('--seed', str(2**32), 'must be at most 4294967295'),
    ('--batch_size', '0', 'must be at least 1'), ('--momentum', 'fast', "expected a number, got 'fast'"),
    ('--max_iter', '0', 'must be at least 1'), ('--max_iter', '-5', 'must be at least 1'),
    ('--epochs', '0', 'must be at least 1'), ('--epochs', '-1', 'must be at least 1')])
def test_out_of_range_options_are_usage_errors(option, value, words, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args([option, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f'argument {option}' in err and words in err, err


def test_empty_train_list(lists, tmp_path, capsys):
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    args = run_args(lists, tmp_path)
    args[args.index('--train_file') + 1] = str(empty)
    assert train.cli(args) == 2
    assert 'empty.txt' in capsys.readouterr().err


def test_nonfinite_losses_are_skipped_then_stop_the_run(lists, tmp_path, capsys, monkeypatch):
    """Steps with a NaN loss are skipped and counted; the epoch ends with a NaN loss, so the run
    stops there, keeps nothing of it and says what to do (no checkpoint was saved before)."""
    class NanLoss(torch.nn.Module):
        def __init__(self, *a, **k):
            super().__init__()

        def forward(self, predictions, targets):
            loc = predictions[0]
            nan = loc.sum() * float('nan')
            return nan, nan

    monkeypatch.setattr(multibox_loss, 'MultiBoxLoss', NanLoss)
    assert run_cli(lists, tmp_path, '--epochs', '5') == 2
    captured = capsys.readouterr()
    assert captured.out.count('step skipped') == 4 and '4 in a row' in captured.out  # one epoch of 4 batches
    assert captured.err.strip().splitlines()[-1] == (
        f'train.py: error: epoch 0 diverged: its loss is nan. Not saved over {tmp_path / "sfd_face_checkpoint.pth"}: '
        'no checkpoint of this run was saved: start again with a lower --lr')
    assert not (tmp_path / 'sfd_face_checkpoint.pth').exists() and not (tmp_path / 'sfd_face.pth').exists()
    rows = [json.loads(line, parse_constant=_refuse) for line in open(tmp_path / 'metrics.jsonl')]
    assert rows[0]['val_loss'] is None and rows[0]['diverged'] == 'its loss is nan'


def _refuse(constant):
    raise ValueError(f'not strict JSON: {constant}')


def test_nonfinite_weights_are_never_saved_over_the_checkpoint(lists, tmp_path, capsys, monkeypatch):
    """A finite loss with a NaN gradient (sqrt at 0) makes the weights NaN; every later loss is
    NaN. The run stops, naming the weights, and writes no checkpoint of them."""
    class NanGradient(torch.nn.Module):
        def __init__(self, *a, **k):
            super().__init__()

        def forward(self, predictions, targets):
            loc, conf = predictions[0], predictions[1]
            return (loc.float() * 0).sum().sqrt(), (conf.float() * 0).sum().sqrt()

    monkeypatch.setattr(multibox_loss, 'MultiBoxLoss', NanGradient)
    assert run_cli(lists, tmp_path, '--epochs', '5') == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'weight tensors hold NaN/inf (vgg.0.weight' in err and 'Not saved over' in err
    assert not (tmp_path / 'sfd_face_checkpoint.pth').exists()
    assert engine.nonfinite_parameters(torch.nn.Linear(2, 2)) == []


def test_resume_from_an_original_repository_checkpoint(lists, tmp_path, capsys):
    """{'epoch', 'weight'} as the original train.py wrote it: weights loaded, next epoch."""
    old = {'epoch': 0, 'weight': {f'module.{k}': v for k, v in build_s3fd('train').state_dict().items()}}
    atomic_save(old, str(tmp_path / 'old.pth'))
    state = run_main(lists, tmp_path, '--epochs', '2', '--resume', str(tmp_path / 'old.pth'))
    assert 'holds weights only' in capsys.readouterr().out
    assert state.epoch == 2 and state.iteration == 8  # epoch 1 only: iterations 4..7


def test_demo_keeps_the_best_ap_draws_its_faces_and_prints_commands_that_work(tmp_path, monkeypatch, capsys):
    import quickstart as demo
    import wider_test

    def small_demo(root):
        monkeypatch.setattr(demo, 'DEMO_ROOT', str(root))
        monkeypatch.setattr(demo, 'DEMO_WIDER', str(root / 'WIDER'))
        monkeypatch.setattr(demo, 'DEMO_TRAIN_IMAGES', 6)
        monkeypatch.setattr(demo, 'DEMO_VAL_IMAGES', 3)
        monkeypatch.setattr(demo, 'DEMO_RECIPE', dict(demo.DEMO_RECIPE, input_size=64, batch_size=2, epochs=1,
                                                      val_ap_max_size=64))

    small_demo(tmp_path / 'full')
    state = demo.main([])[0]
    out = capsys.readouterr().out
    assert re.search(r'->> speed:\d+\.\d img/s', out) and re.search(AP_LINE.replace('4 images', '3 images'), out)
    best = tmp_path / 'full' / 'weights' / 'sfd_face.pth'
    aps = state.best_aps
    assert (f'Demo: done. {best} holds epoch 0, the best WIDER AP on the synthetic val split (official protocol, '
            f'single-scale, longer side 64 px): Easy {aps["easy"]:.4f}, Medium {aps["medium"]:.4f}, '
            f'Hard {aps["hard"]:.4f}') in out
    drawn = re.search(r'Demo: drew its (\d+) detections at score >= 0.3 on (\S+): (\d+) on the image\'s (\d+) annotated '
                      r'faces \((\d+) of them at least 40 px tall\), in green, and (\d+) elsewhere, in red', out)
    assert drawn and os.path.isfile(drawn.group(2)) and int(drawn.group(4)) > 0, out
    assert int(drawn.group(3)) + int(drawn.group(6)) == int(drawn.group(1))
    commands = out.split('the drawing, and the training curves:\n', 1)[1].splitlines()[:3]
    wider_test_argv = shlex.split(commands[0])
    assert wider_test_argv[:2] == ['python', 'wider_test.py'] and 'demo.py' in commands[1]
    printed = wider_test.main(wider_test.parse_args(wider_test_argv[2:]))
    assert printed == aps  # the command as printed gives the AP the demo reported
    # Everything the demo and its commands write stays in the demo's folder.
    assert os.listdir(tmp_path / 'full' / 'predictions') and os.listdir(tmp_path / 'full' / 'detections')
    assert drawn.group(2).startswith(str(tmp_path / 'full'))
    # A new demo replaces the last one, saying what it removes; stopped early, it says how to continue.
    demo.main(['--max_iter', '1'])
    checkpoint = tmp_path / 'full' / 'weights' / 'sfd_face_checkpoint.pth'
    out = capsys.readouterr().out
    assert (f"--overwrite: removed the earlier run's files from {tmp_path / 'full' / 'weights'}: metrics.jsonl, "
            'sfd_face.pth, sfd_face_checkpoint.pth') in out
    assert (f'Demo: training stopped at iteration 1, in epoch 0 of 1; continue it with '
            f'`python train.py --demo --resume {checkpoint}`') in out
    state = demo.main(['--resume', str(checkpoint)])[0]
    out = capsys.readouterr().out
    assert 'Resuming training' in out and 'Demo: done.' in out
    assert state.epoch == 1 and state.iteration > 1


AP_LINE = r'val AP epoch:\d+ \|\| Easy:\d\.\d{4} Medium:\d\.\d{4} Hard:\d\.\d{4} \|\| 4 images, \d+\.\ds'


def test_val_ap_adds_one_line_and_a_metrics_row_and_leaves_training_alone(lists, uninterrupted, tmp_path, capsys):
    _, full, _ = uninterrupted
    state = run_main(lists, tmp_path, '--epochs', '2', '--val_ap', '--val_ap_max_size', '64')
    out = capsys.readouterr().out.splitlines()
    for epoch in (0, 1):  # the original lines, then the AP line
        at = out.index(next(line for line in out if line.startswith(f'test epoch:{epoch} ')))
        following = out[at + 1:at + 3]
        ap_line = next(line for line in following if line.startswith('val AP'))
        assert re.fullmatch(AP_LINE.replace(r'\d+', str(epoch), 1), ap_line), following
        assert following[-1] == ap_line  # after 'Saving best state' when there is one
    rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [row['epoch'] for row in rows] == [0, 1] and rows[1]['iteration'] == 8
    assert set(rows[0]['ap']) == {'easy', 'medium', 'hard'} and rows[0]['best_by'] == 'loss'
    assert all(row['train_loss'] > 0 and row['val_loss'] > 0 for row in rows)
    assert state.best_ap == pytest.approx(max(sum(r['ap'].values()) / 3 for r in rows))
    # Evaluating draws no random number of the training's: the weights are those of a run without it.
    a, b = load_file(str(full / 'sfd_face_checkpoint.pth')), load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    for key, value in a['weight'].items():
        assert torch.equal(value, b['weight'][key]), key


def _scripted_aps(monkeypatch, means):
    """ValAP.evaluate returns these mean APs in turn (Easy = Medium = Hard = the mean)."""
    from utils.training.val_ap import ValAP
    calls = iter(means)
    monkeypatch.setattr(ValAP, 'evaluate', lambda self, *a, **k: dict.fromkeys(('easy', 'medium', 'hard'), next(calls)))


def test_best_by_ap_keeps_the_epoch_of_the_highest_ap_and_records_both(lists, tmp_path, monkeypatch, capsys):
    first_epoch = tmp_path / 'one_epoch'
    _scripted_aps(monkeypatch, [0.5])
    run_main(lists, first_epoch, '--epochs', '1', '--val_ap_max_size', '64')  # the weights after epoch 0
    _scripted_aps(monkeypatch, [0.5, 0.2])
    state = run_main(lists, tmp_path, '--epochs', '2', '--best_by', 'ap', '--val_ap_max_size', '64')
    out = capsys.readouterr().out
    assert out.count('Saving best state,epoch') == 2 and 'Saving best state,epoch 0' in out  # by loss, then by AP
    assert state.best_ap_epoch == 0 and state.best_ap == 0.5 and state.best_aps['easy'] == 0.5
    assert state.best_loss_epoch is not None and state.best_loss < float('inf')
    kept = torch.load(tmp_path / 'sfd_face.pth', weights_only=True)
    epoch0 = load_file(str(first_epoch / 'sfd_face_checkpoint.pth'))['weight']
    final = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert all(torch.equal(kept[k], epoch0[k]) for k in kept)                   # epoch 0: AP 0.5
    assert not all(torch.equal(kept[k], final['weight'][k]) for k in kept)      # not epoch 1: AP 0.2
    assert final['state']['best_ap_epoch'] == 0 and final['state']['best_loss_epoch'] == state.best_loss_epoch
    rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [(row['best_saved'], row['best_by']) for row in rows] == [(True, 'ap'), (False, 'ap')]
    assert 'best val AP 0.5000 (epoch 0)' in out


# -- runs that share a machine, a disk and a scheduler (utils/training/save_folder.py and stop.py) --


def test_a_second_run_on_the_same_save_folder_is_refused_naming_the_first(lists, tmp_path):
    first = subprocess.Popen([sys.executable, '-u', 'train.py', *run_args(lists, tmp_path, '--epochs', '50')],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:  # the folder is claimed before the data is loaded
            if line.startswith('Loading dataset'):
                break
        second = subprocess.run([sys.executable, 'train.py', *run_args(lists, tmp_path, '--epochs', '1')],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and 'Traceback' not in second.stderr, second.stderr
        err = second.stderr.strip()
        assert '\n' not in err and err.startswith(f'train.py: error: --save_folder {tmp_path}') and \
            f'pid {first.pid}' in err, err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 75  # the first run went on, and stopped resumably when told to


def test_stale_temporaries_are_removed_and_a_full_disk_stops_before_the_epoch(lists, tmp_path, capsys,
                                                                               monkeypatch):
    stale = tmp_path / '.sfd_face_checkpoint.pth.k9x2ab_7.tmp'  # as atomic_path names it
    stale.write_bytes(b'\0' * 1000)
    other = tmp_path / '.notes.txt.tmp'  # not a training output: left alone
    other.write_bytes(b'mine')
    run_main(lists, tmp_path, '--epochs', '1')
    assert not stale.exists() and other.exists()
    assert f'Removed 1 temporary file(s) of interrupted saves from {tmp_path}' in capsys.readouterr().out
    # The next epoch's checkpoint would not fit: one line, before the epoch's work, the old file kept.
    from utils.files import fileio
    before = (tmp_path / 'sfd_face_checkpoint.pth').read_bytes()
    monkeypatch.setattr(fileio, 'free_bytes', lambda folder: 1 << 20)
    status = run_cli(lists, tmp_path, '--epochs', '2', '--resume', str(tmp_path / 'sfd_face_checkpoint.pth'))
    out, err = capsys.readouterr()
    assert status == 2 and 'epoch:1 || iter:' not in out, out
    err = err.strip().splitlines()[-1]
    assert err.startswith(f'train.py: error: --save_folder {tmp_path}: 1.0 MiB free, about') and \
        'stopped before epoch 1 rather than after it' in err, err
    assert (tmp_path / 'sfd_face_checkpoint.pth').read_bytes() == before


def test_a_checkpoint_with_bad_contents_is_one_line_naming_the_field(lists, uninterrupted, tmp_path, capsys):
    _, full, _ = uninterrupted
    ckpt = load_file(str(full / 'sfd_face_checkpoint.pth'))
    ckpt['state'].update(batch_in_epoch=999, epoch=1)
    atomic_save(ckpt, str(tmp_path / 'bad.pth'))
    err = _train_error(lists, tmp_path, capsys, '--epochs', '3', '--resume', str(tmp_path / 'bad.pth'))
    assert 'bad.pth' in err and 'batch_in_epoch' in err and '999' in err, err


def test_a_resume_applies_a_changed_momentum_and_weight_decay(lists, uninterrupted, tmp_path, capsys):
    _, full, _ = uninterrupted
    run_main(lists, tmp_path, '--epochs', '3', '--momentum', '0.5', '--weight_decay', '0.001',
             '--resume', str(full / 'sfd_face_checkpoint.pth'))
    assert 'Resuming with changed options: --momentum 0.5 (checkpoint 0.9), --weight_decay 0.001' in \
        capsys.readouterr().out
    group = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))['optimizer']['param_groups'][0]
    assert (group['momentum'], group['weight_decay']) == (0.5, 0.001)


# -- runs that survive a cluster: one run per folder, --resume auto, periodic checkpoints, torchrun elastic --


def _launch(lists, folder, *extra, launcher_options=()):
    """tools/launch.py (torchrun with train.py's exit statuses), 2 processes, reading its output."""
    cmd = [sys.executable, 'tools/launch.py', '--standalone', '--nproc_per_node', '2', '--monitor_interval', '0.1',
           *launcher_options, 'train.py', *run_args(lists, folder, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_a_new_run_never_replaces_another_and_resume_auto_continues_it(lists, uninterrupted, tmp_path, capsys,
                                                                      monkeypatch):
    _, full, _ = uninterrupted
    checkpoint = tmp_path / 'sfd_face_checkpoint.pth'
    run_main(lists, tmp_path, '--epochs', '2', '--max_iter', '5')  # epoch 0 validated, then 1 step of epoch 1
    saved, metrics = checkpoint.read_bytes(), (tmp_path / 'metrics.jsonl').read_text()
    capsys.readouterr()
    err = _train_error(lists, tmp_path, capsys, '--epochs', '2', '--seed', '1')
    assert re.fullmatch(rf'train\.py: error: --save_folder {tmp_path} holds another run \(a checkpoint at iteration '
                        r'5, saved \d{4}-\d\d-\d\d \d\d:\d\d and best weights saved \d{4}-\d\d-\d\d \d\d:\d\d\); a new '
                        r'run would replace it: continue it with --resume auto, give another --save_folder, or start '
                        r'over with --overwrite \(removes its files\)', err), err
    assert checkpoint.read_bytes() == saved and (tmp_path / 'metrics.jsonl').read_text() == metrics
    # The same command with --resume auto continues it exactly, as --resume PATH does; re-run, it has nothing left.
    # The list spelled another way is the same list, not a changed option.
    respelled = (os.path.relpath(lists[0]), os.path.join(os.path.dirname(lists[1]), '.', os.path.basename(lists[1])))
    for spelling in (lists, respelled):
        state = run_main(spelling, tmp_path, '--epochs', '2', '--resume', 'auto')
        out = capsys.readouterr().out
        assert f'--resume auto: continuing from {checkpoint}' in out and '_file' not in out, out
    assert state.iteration == 8
    a, b = load_file(str(full / 'sfd_face_checkpoint.pth')), load_file(str(checkpoint))
    assert all(torch.equal(v, b['weight'][k]) for k, v in a['weight'].items()) and a['state'] == b['state']
    rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [row['epoch'] for row in rows] == [0, 1]
    # --overwrite starts over, naming what it removes; nothing of the earlier run stays. (Iterations of 6 s
    # and more show the speed line and its ETA without --log_speed; a run without a validation says so.)
    monkeypatch.setattr(engine.SpeedMeter, 'seconds_per_iteration', lambda self: 6.0)
    run_main(lists, tmp_path, '--epochs', '1', '--max_iter', '1', '--seed', '1', '--overwrite')
    out = capsys.readouterr().out
    assert (f"--overwrite: removed the earlier run's files from {tmp_path}: metrics.jsonl, sfd_face.pth, "
            'sfd_face_checkpoint.pth') in out
    assert re.search(r'^->> speed:\d+\.\d img/s \|\| data wait:\d+\.\d{4}s/iter \|\| eta:0:00:00$', out, re.M), out
    assert re.search(rf'^Finished: iteration 1, epoch 0, \d+\.\ds; no validation ran \(--max_iter 1 ended the run '
                     rf'inside epoch 0\), so there is no sfd_face\.pth: {re.escape(str(tmp_path))} holds '
                     r'sfd_face_checkpoint\.pth$', out, re.M), out
    assert sorted(os.listdir(tmp_path)) == ['sfd_face_checkpoint.pth']
    assert load_file(str(checkpoint))['args']['seed'] == 1
    # In a folder without a checkpoint, --resume auto starts a new run and says so.
    state = run_main(lists, tmp_path / 'new', '--epochs', '1', '--max_iter', '1', '--resume', 'auto')
    assert f'--resume auto: no checkpoint in {tmp_path / "new"}, starting a new run' in capsys.readouterr().out
    assert state.iteration == 1


def test_a_killed_torchrun_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(lists, torchrun_epoch, tmp_path):
    """torchrun --max_restarts 1, --resume auto, a full checkpoint every iteration: kill -9 of one
    worker after the checkpoint of iteration 1 (mid-epoch); the other leaves its collective (Gloo
    sees the connection close), the agent restarts the group, which resumes from the checkpoint
    and ends with the weights of the uninterrupted run, bitwise."""
    _, reference = torchrun_epoch
    proc = _launch(lists, tmp_path, '--epochs', '1', '--resume', 'auto', '--checkpoint_interval', '1',
                   launcher_options=('--max_restarts', '1'))
    lines, killed, restarted = [], None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if killed is None and 'checkpoint saved to' in line and '(iteration 1)' in line:
                workers = open(f'/proc/{proc.pid}/task/{proc.pid}/children').read().split()
                os.kill(int(workers[-1]), signal.SIGKILL)
                killed = time.time()
            if killed and restarted is None and '--resume auto: continuing from' in line:
                restarted = time.time() - killed
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    everything = ''.join(lines)
    assert proc.returncode == 0 and killed and restarted, everything
    assert restarted < 60, restarted  # the survivor left its collective and the group came back (about 5 s here)
    a, b = load_file(str(reference / 'sfd_face_checkpoint.pth')), load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert a['state'] == b['state'] and b['state']['iteration'] == 2
    for key, value in a['weight'].items():
        assert torch.equal(value, b['weight'][key]), key


def test_sigterm_to_the_launcher_stops_every_worker_within_a_step_with_exit_75(lists, tmp_path):
    """Preemption: SIGTERM to the agent (tools/launch.py), which forwards it to its workers. The stop
    travels with the step's finite check, so the workers stop after the step in progress (they
    looked every 10 iterations before), save, and the launcher exits 75 (torchrun: 1)."""
    proc = _launch(lists, tmp_path, '--epochs', '50')
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith('epoch:0 || iter:0 '):
                proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    everything = ''.join(lines)
    assert proc.returncode == 75, everything
    ckpt = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert 1 <= ckpt['state']['iteration'] <= 5, everything
    assert f'Stopped at iteration {ckpt["state"]["iteration"]} (SIGTERM)' in everything
    assert 'launch.py: SIGTERM received: the workers were told to stop and save (exit 75' in everything


# -- training that fails safe --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def longer_lists(tmp_path_factory):
    """12 training images (11 with faces): an epoch of 11 steps at batch 1, longer than the 10
    skipped steps in a row that stop a run."""
    return synthetic_lists(tmp_path_factory.mktemp('wider12'), train=12, val=2, seed=4)


def test_a_diverged_run_keeps_the_good_checkpoint_and_names_it_for_a_lower_lr(longer_lists, tmp_path, capsys):
    lists = longer_lists
    checkpoint = tmp_path / 'sfd_face_checkpoint.pth'
    run_main(lists, tmp_path, '--epochs', '1', '--batch_size', '1')
    good = checkpoint.read_bytes()
    # --lr 1e12: the first step explodes the weights, the next losses are not finite: ten skipped steps stop it.
    err = _train_error(lists, tmp_path, capsys, '--epochs', '2', '--batch_size', '1', '--lr', '1e12', '--resume', 'auto')
    assert '10 steps in a row skipped for a non-finite loss or a gradient overflow; weights reach' in err, err
    assert err.endswith(f'Not saved over {checkpoint}: resume {checkpoint} (iteration 11) with a lower --lr, e.g. '
                        f'--resume {checkpoint} --lr 1e+11'), err
    assert checkpoint.read_bytes() == good
    # That state does continue with a lower --lr.
    state = run_main(lists, tmp_path, '--epochs', '2', '--batch_size', '1', '--lr', '1e-4', '--resume', str(checkpoint))
    assert state.epoch == 2 and state.iteration == 22 and math.isfinite(state.best_loss)


def test_an_epoch_whose_validation_loss_is_not_finite_is_never_kept(lists, uninterrupted, tmp_path, capsys, monkeypatch):
    _, full, _ = uninterrupted
    shutil.copy(full / 'sfd_face_checkpoint.pth', tmp_path)
    shutil.copy(full / 'sfd_face.pth', tmp_path)
    kept = {name: (tmp_path / name).read_bytes() for name in ('sfd_face_checkpoint.pth', 'sfd_face.pth')}
    monkeypatch.setattr(engine, 'validation_loss', lambda *a, **k: math.nan)
    err = _train_error(lists, tmp_path, capsys, '--epochs', '3', '--resume', 'auto')
    assert err == (f'train.py: error: epoch 2 diverged: its loss is nan. Not saved over {tmp_path / "sfd_face_checkpoint.pth"}'
                   f': resume {tmp_path / "sfd_face_checkpoint.pth"} (iteration 8) with a lower --lr, e.g. --resume '
                   f'{tmp_path / "sfd_face_checkpoint.pth"} --lr 0.0001')
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    row, = [json.loads(line, parse_constant=_refuse) for line in open(tmp_path / 'metrics.jsonl')]
    assert row['epoch'] == 2 and row['val_loss'] is None and row['diverged'] == 'its loss is nan'


def test_a_resume_at_an_epoch_end_with_a_larger_batch_trains_the_remaining_epochs(lists, uninterrupted, tmp_path, capsys):
    _, full, _ = uninterrupted
    state = run_main(lists, tmp_path, '--epochs', '3', '--batch_size', '4', '--resume', str(full / 'sfd_face_checkpoint.pth'))
    out = capsys.readouterr().out
    assert 'Resuming with changed options: --epochs 3 (checkpoint 2), --batch_size 4 (checkpoint 2)' in out, out
    assert re.search(r'^test epoch:2 \|\| Loss:', out, re.M)
    assert (state.epoch, state.iteration) == (3, 10)  # 8, then 9 images // 4 = 2 steps of epoch 2


# Each one loads: what the probe did to a mid-epoch checkpoint, and the field the refusal names.
DAMAGE = [
    (lambda c: c.update(rng=None), "field 'rng': expected a dict, found None"),
    (lambda c: c['rng'].update(torch=torch.randint(0, 256, c['rng']['torch'].shape, dtype=torch.uint8,
                                                     generator=torch.Generator().manual_seed(0))),
     "field 'rng' cannot be restored ("),
    (lambda c: c['optimizer']['param_groups'][0].pop('dampening'), "field 'optimizer.param_groups[0].dampening' is missing"),
    (lambda c: c['optimizer']['state'][3].update(momentum_buffer=torch.empty(c['optimizer']['state'][3]['momentum_buffer'].shape, device='meta')),
     "field 'optimizer.state.3.momentum_buffer': a tensor on device 'meta'"),
    (lambda c: c.update(weight={k: v.to(torch.int32) for k, v in c['weight'].items()}),
     'does not fit S3FD: tensors of another kind than the model'),
    (lambda c: c['optimizer']['param_groups'][0].update(nesterov='yes'),
     "field 'optimizer.param_groups[0].nesterov': expected a boolean, found 'yes' (str)"),
    (lambda c: c['state'].update(epoch=10 ** 30), "field 'state.epoch': expected an integer from 0 to"),
    (lambda c: c['state'].update(iteration=10 ** 30), "field 'state.iteration': expected an integer from 0 to"),
    (lambda c: c['args'].update(batch_size='2'), "field 'args.batch_size': expected an integer, found '2' (str)"),
]


def test_a_damaged_checkpoint_is_one_line_before_any_work(lists, tmp_path, capsys):
    run_main(lists, tmp_path / 'run', '--epochs', '2', '--max_iter', '3')  # 3 steps into epoch 0
    good = load_file(str(tmp_path / 'run' / 'sfd_face_checkpoint.pth'))
    capsys.readouterr()
    for number, (damage, words) in enumerate(DAMAGE):
        ckpt = load_file(str(tmp_path / 'run' / 'sfd_face_checkpoint.pth'))
        damage(ckpt)
        path = tmp_path / f'damaged{number}.pth'
        torch.save(ckpt, path)
        status = run_cli(lists, tmp_path / f'resumed{number}', '--epochs', '2', '--resume', str(path))
        out, err = capsys.readouterr()
        last = err.strip().splitlines()[-1]  # after the data set's notes
        assert status == 2 and last.startswith(f'train.py: error: {path}') and words in last, (words, err)
        assert 'Traceback' not in err and 'epoch:' not in out, err
        assert not (tmp_path / f'resumed{number}').exists()  # nothing left behind
        path.unlink()  # 171 MiB each: keep the test's disk use to one file at a time
    assert good['state']['iteration'] == 3


START_UP_SIGNAL = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train
real = train.build_loaders

def build_loaders(*args, **kwargs):  # the signal arrives while the data lists load
    os.kill(os.getpid(), signal.{sig})
    return real(*args, **kwargs)

train.build_loaders = build_loaders
sys.exit(train.cli({argv!r}))
"""


def test_a_signal_during_start_up_is_one_line_and_exit_75(lists, tmp_path):
    expected = ('train.py: {} during start-up, before the first step: nothing new to save; run the same command again '
                'to start (with --resume auto, to continue from the checkpoint)\n')
    for sig in ('SIGTERM', 'SIGINT'):  # while the data lists load
        code = START_UP_SIGNAL.format(repo=REPO, sig=sig, argv=run_args(lists, tmp_path / sig, '--epochs', '1'))
        proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 75 and proc.stderr.endswith(expected.format(sig)), proc.stderr
        assert 'Traceback' not in proc.stderr and 'epoch:' not in proc.stdout
    # while PyTorch itself is loading: the handler runs inside Python that C++ called, where an
    # exception could not unwind (it aborted the process)
    proc = subprocess.Popen([sys.executable, 'train.py', *run_args(lists, tmp_path, '--epochs', '1')], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and err == expected.format('SIGINT'), err
