"""train.py end to end on a tiny synthetic WIDER FACE, on the CPU."""
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import prepare_wider_data
import train
from data.synthetic import generate
from s3fd import build_s3fd
from utils import device as devices
from utils.checkpoint import atomic_save, load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp('wider')
    generate(str(root / 'WIDER'), 10, 4, seed=3)
    prepare_wider_data.main(prepare_wider_data.parse_args(
        ['--dataset_dir', str(root / 'WIDER'), '--out_dir', str(root)]))
    return str(root / 'face_train.txt'), str(root / 'face_val.txt')


def run_args(lists, save_folder, *extra):
    train_file, val_file = lists
    return ['--device', 'cpu', '--basenet', 'none', '--input_size', '64', '--batch_size', '2',
            '--num_workers', '0', '--train_file', train_file, '--val_file', val_file,
            '--save_folder', str(save_folder), *extra]


def run_main(lists, save_folder, *extra):
    return train.main(train.parse_args(run_args(lists, save_folder, *extra)))


LOG_PATTERNS = [r'Timer: \d+\.\d{4}', r'epoch:\d+ \|\| iter:\d+ \|\| Loss:\d+\.\d{4}',
                r'->> conf loss:\d+\.\d{4} \|\| loc loss:\d+\.\d{4}', r'->>lr:\d+\.\d{6}']


def test_end_to_end_logs_and_files(lists, tmp_path, capsys):
    state = run_main(lists, tmp_path, '--epochs', '2')
    out = capsys.readouterr().out.splitlines()
    # The original four lines, in order, at iteration 0.
    start = next(i for i, line in enumerate(out) if line.startswith('epoch:0 || iter:0 ')) - 1
    for pattern, line in zip(LOG_PATTERNS, out[start:start + 4]):
        assert re.fullmatch(pattern, line), (pattern, line)
    assert re.fullmatch(r'->> speed:\d+\.\d img/s \|\| data wait:\d+\.\d{4}s/iter \|\| eta:\d+:\d\d:\d\d',
                        out[start + 4])
    assert any(re.fullmatch(r'test epoch:1 \|\| Loss:\d+\.\d{4}', line) for line in out)
    assert 'Saving best state,epoch 0' in out
    assert state['epoch'] == 2 and state['iteration'] == 8  # 9 images with faces -> 4 batches of 2
    best = tmp_path / 'sfd_face.pth'
    ckpt = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert ckpt['epoch'] == 2 and set(ckpt['weight']) == set(build_s3fd('train').state_dict())
    net = build_s3fd('test')
    net.load_state_dict(torch.load(best, weights_only=True), strict=True)
    assert ckpt['state']['iteration'] == 8 and ckpt['step_index'] == 0
    assert ckpt['args']['batch_size'] == 2 and ckpt['cfg']['ANCHOR_SIZES'] == [16, 32, 64, 128, 256, 512]
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


@pytest.fixture(scope='module')
def uninterrupted(lists, tmp_path_factory):
    folder = tmp_path_factory.mktemp('full')
    run_main(lists, folder, '--epochs', '2')
    return load_file(str(folder / 'sfd_face_checkpoint.pth'))


@pytest.mark.parametrize('stop_at', [3, 4], ids=['mid-epoch', 'epoch-end'])
def test_resume_is_exact(lists, uninterrupted, tmp_path, stop_at):
    run_main(lists, tmp_path, '--epochs', '2', '--max_iter', str(stop_at))
    stopped = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert stopped['state']['iteration'] == stop_at
    assert stopped['state']['batch_in_epoch'] == stop_at % 4
    run_main(lists, tmp_path, '--epochs', '2', '--resume', str(tmp_path / 'sfd_face_checkpoint.pth'))
    resumed = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert uninterrupted['state']['iteration'] == resumed['state']['iteration'] == 8
    for key, value in uninterrupted['weight'].items():
        assert torch.equal(value, resumed['weight'][key]), key
    assert uninterrupted['state']['best_loss'] == pytest.approx(resumed['state']['best_loss'], rel=1e-6)
    for key, value in uninterrupted['optimizer']['state'].items():
        assert torch.equal(value['momentum_buffer'], resumed['optimizer']['state'][key]['momentum_buffer'])


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(lists, tmp_path):
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
    assert proc.returncode == 0, ''.join(lines) + rest
    assert 'checkpoint saved' in rest
    ckpt = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert ckpt['state']['iteration'] >= 4


def test_torchrun_two_processes_one_log_stream(lists, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           'train.py', *run_args(lists, tmp_path, '--epochs', '1')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert sum(line.startswith('epoch:0 || iter:0 ') for line in out) == 1
    assert sum(line.startswith('test epoch:0 ') for line in out) == 1
    assert '2 processes, batch 2 each' in proc.stdout
    ckpt = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    assert ckpt['state']['iteration'] == 2  # 9 images / (2 processes x 2) -> 2 iterations
    assert 'module.vgg.0.weight' not in ckpt['weight']


def _run_cli(*args):
    return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


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
    with pytest.raises(SystemExit) as exc:
        train.main(train.parse_args(run_args(lists, tmp_path) + ['--basenet', 'vgg16_reducedfc.pth']))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'vgg16_reducedfc.pth' in err and 'tools/make_basenet.py' in err and '--basenet none' in err


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
    with pytest.raises(SystemExit):
        run_main(lists, tmp_path, '--resume', str(garbage))
    assert 'garbage.pth' in capsys.readouterr().err
    wrong = tmp_path / 'wrong.pth'
    sd = build_s3fd('train').state_dict()
    sd.pop('conf.0.weight')
    sd['extra.weight'] = torch.zeros(1)
    atomic_save(sd, str(wrong))
    with pytest.raises(SystemExit):
        run_main(lists, tmp_path, '--resume', str(wrong))
    err = capsys.readouterr().err
    assert 'conf.0.weight' in err and 'extra.weight' in err


def test_empty_train_list(lists, tmp_path, capsys):
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    args = run_args(lists, tmp_path)
    args[args.index('--train_file') + 1] = str(empty)
    with pytest.raises(SystemExit):
        train.main(train.parse_args(args))
    assert 'empty.txt' in capsys.readouterr().err


def test_nonfinite_losses_are_skipped_then_stop_the_run(lists, tmp_path, capsys, monkeypatch):
    class NanLoss(torch.nn.Module):
        def __init__(self, *a, **k):
            super().__init__()

        def forward(self, predictions, targets):
            loc = predictions[0]
            nan = loc.sum() * float('nan')
            return nan, nan

    monkeypatch.setattr(train, 'MultiBoxLoss', NanLoss)
    with pytest.raises(SystemExit) as exc:
        run_main(lists, tmp_path, '--epochs', '5')
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out.count('step skipped') == 10 and '10 in a row' in captured.out
    ckpt = load_file(str(tmp_path / 'sfd_face_checkpoint.pth'))
    torch.manual_seed(0)
    reference = build_s3fd('train')
    train.init_weights_from_scratch(reference)
    for key, value in reference.state_dict().items():  # no step was applied
        assert torch.equal(value, ckpt['weight'][key]), key


def _fake_npu(monkeypatch):
    """Stand-in torch_npu: like the real one, it makes 'npu' a torch device type."""
    calls = {}
    if torch._C._get_privateuse1_backend_name() != 'npu':
        torch.utils.rename_privateuse1_backend('npu')

    class FakeScaler:
        def __init__(self, **kwargs):
            calls['scaler'] = kwargs

    class NpuFusedSGD(torch.optim.SGD):
        pass

    torch_npu = types.ModuleType('torch_npu')
    torch_npu.npu = types.SimpleNamespace(amp=types.SimpleNamespace(GradScaler=FakeScaler),
                                          is_bf16_supported=lambda: False)
    torch_npu.optim = types.SimpleNamespace(NpuFusedSGD=NpuFusedSGD)
    monkeypatch.setitem(sys.modules, 'torch_npu', torch_npu)
    monkeypatch.setattr(torch, 'npu', types.SimpleNamespace(is_available=lambda: True,
                                                            set_device=lambda d: calls.setdefault('device', d)),
                        raising=False)
    return calls, NpuFusedSGD


def test_npu_with_apex_uses_o2_loss_scale_and_fused_sgd(monkeypatch):
    calls, _ = _fake_npu(monkeypatch)

    class ApexSGD(torch.optim.SGD):
        pass

    def initialize(model, optimizer, **kwargs):
        calls['initialize'] = kwargs
        return model, optimizer

    apex = types.ModuleType('apex')
    apex.amp = types.SimpleNamespace(initialize=initialize, state_dict=lambda: {'loss_scaler0': 32.0})
    optimizers = types.ModuleType('apex.optimizers')
    optimizers.NpuFusedSGD = ApexSGD
    apex.optimizers = optimizers
    monkeypatch.setitem(sys.modules, 'apex', apex)
    monkeypatch.setitem(sys.modules, 'apex.optimizers', optimizers)

    ctx = devices.setup_device('npu', 3, amp='apex', loss_scale=32.0)
    assert ctx.device == torch.device('npu', 3) and calls['device'] == torch.device('npu', 3)
    assert ctx.amp == 'apex' and ctx.autocast().__class__.__name__ == 'nullcontext'
    net = torch.nn.Linear(2, 2)
    opt = ctx.make_optimizer(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    assert isinstance(opt, ApexSGD) and len(opt.param_groups) == 1
    ctx.initialize(net, opt)
    assert calls['initialize'] == {'opt_level': 'O2', 'loss_scale': 32.0, 'combine_grad': True}
    assert ctx.state_dict() == {'apex': {'loss_scaler0': 32.0}}
    assert train.parse_args(['--device', 'npu']).loss_scale == 32.0


def test_npu_without_apex_falls_back_to_native_autocast(monkeypatch):
    calls, npu_sgd = _fake_npu(monkeypatch)
    monkeypatch.setitem(sys.modules, 'apex', None)
    ctx = devices.setup_device('npu', 0, amp='auto', loss_scale=32.0)
    assert ctx.amp == 'native' and ctx.amp_dtype == torch.float16
    assert calls['scaler'] == {'init_scale': 32.0, 'dynamic': False}
    opt = ctx.make_optimizer(torch.nn.Linear(2, 2).parameters(), 1e-3, 0.9, 5e-4)
    assert isinstance(opt, npu_sgd)
    with pytest.raises(devices.DeviceUnavailable, match='Apex'):
        devices.setup_device('npu', 0, amp='apex')
