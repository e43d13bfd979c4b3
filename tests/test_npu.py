"""train.py --device npu against test-only fakes of torch_npu and Ascend Apex (tests/fake_ascend).

The fakes follow upstream's behaviour, refusals and call order (each module names its upstream
file); the 'npu' device is a real PrivateUse1 device computed on the CPU (see
tests/fake_ascend/torch_npu/_core.py). Everything runs in child processes: the fake registers
the device for good.

Two variants of torch_npu's Python parts: the fake's re-implementations (always), and
torch_npu's own files (optimizer, tensor combining, GradScaler) from the torch-npu wheel when it
has been downloaded (.ci/run does: `pip download torch-npu==2.14.0 --no-deps -d .cache/torch-npu`);
without the wheel that variant is skipped, saying so.
"""
import glob
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import synthetic_lists
from s3fd import build_s3fd, init_weights_from_scratch
from utils.checkpoint import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(REPO, 'tests', 'fake_ascend')
WHEEL_DIR = os.environ.get('TORCH_NPU_WHEEL_DIR') or os.path.join(REPO, '.cache', 'torch-npu')
UPSTREAM_FILES = ['torch_npu/utils/combine_tensors.py', 'torch_npu/optim/npu_fused_optim_base.py',
                  'torch_npu/optim/npu_fused_sgd.py', 'torch_npu/npu/amp/common.py',
                  'torch_npu/npu/amp/grad_scaler.py']
OVERFLOW = 1e6  # loss factor: a finite loss whose fp16 gradients overflow at loss scale 32


def _python_backend():
    """Whether this torch can host the fake NPU: a PrivateUse1 backend written in Python."""
    from torch.utils import backend_registration
    return hasattr(backend_registration, '_setup_privateuseone_for_python_backend') and hasattr(torch._C, '_acc')


pytestmark = pytest.mark.skipif(
    not _python_backend(), reason=f'torch {torch.__version__} cannot register a PrivateUse1 backend in Python '
                                  '(torch._C._acc), on which the fake NPU is built')


@pytest.fixture(scope='module')
def upstream_dir(tmp_path_factory):
    """torch_npu's pure-Python files extracted from the downloaded wheel, or None."""
    wheels = sorted(glob.glob(os.path.join(WHEEL_DIR, 'torch_npu-*.whl')))
    if not wheels:
        return None
    root = tmp_path_factory.mktemp('torch_npu_wheel')
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in UPSTREAM_FILES:
            wheel.extract(name, root)
    return str(root)


def variant_env(variant, upstream_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([FAKE, REPO]), OMP_NUM_THREADS='1',
               FAKE_NPU_SOC='Ascend910B1')
    env.pop('FAKE_ASCEND_UPSTREAM', None)
    if variant == 'upstream':
        if upstream_dir is None:
            pytest.skip(f'no torch-npu wheel in {WHEEL_DIR}: torch_npu\'s own optimizer and GradScaler code is '
                        'not run (download it with `pip download torch-npu==2.14.0 --no-deps -d .cache/torch-npu`, '
                        'as .ci/run does)')
        env['FAKE_ASCEND_UPSTREAM'] = upstream_dir
    return env


# -- the fakes against upstream's behaviour, and utils/device.py on them ------------------------------

CHECK_NAMES = ['the_requested_variant_runs', 'fused_optimizer_refuses_set_to_none',
               'fused_optimizer_steps_every_group', 'fused_optimizer_matches_torch_sgd',
               'fused_optimizer_refuses_bfloat16', 'static_grad_scaler_steps_on_overflow',
               'dynamic_grad_scaler_skips_overflow', 'grad_scaler_refuses_host_outputs_and_double_unscale',
               'unpinned_non_blocking_copy_synchronises', 'hccl_refuses_host_tensors',
               'jit_compile_default_follows_the_soc', 'bf16_follows_the_soc_and_autocast_refuses_it_before_the_910b',
               'apex_fused_sgd_refuses_to_step_outside_amp', 'apex_o2_zero_grad_takes_no_argument',
               'apex_initialize_refuses_ddp_and_host_models', 'apex_initialize_refuses_what_it_cannot_do_faithfully',
               'apex_static_loss_scale_steps_on_overflow',
               'apex_pinned_dynamic_scale_skips_overflow_and_keeps_the_scale',
               'native_fp16_skips_overflow_and_keeps_the_scale', 'zero_grad_as_each_optimizer_accepts_it',
               'amp_auto_without_apex_on_910a_and_910b', 'setup_device_sets_the_compile_mode',
               'torch_npu_import_errors_are_one_line']


@pytest.fixture(scope='module')
def checks(upstream_dir):
    """One child process runs every check, with each variant (tests/fake_ascend/check_fakes.py)."""
    command = [sys.executable, os.path.join(FAKE, 'check_fakes.py')]
    if upstream_dir:
        command += ['--upstream', upstream_dir]
    proc = subprocess.run(command, cwd=REPO, env=variant_env('reimplemented', None), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('variant', ['reimplemented', 'upstream'])
@pytest.mark.parametrize('name', CHECK_NAMES)
def test_fake(name, variant, checks, upstream_dir):
    variant_env(variant, upstream_dir)  # skips the upstream variant without the wheel
    assert set(checks[variant]) == set(CHECK_NAMES)
    assert checks[variant][name] == 'ok', checks[variant][name]


# -- train.py end to end ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp('wider_npu')
    train_list, val_list = synthetic_lists(root)
    one = root / 'val_one.txt'
    one.write_text((root / 'face_val.txt').read_text().splitlines()[0] + '\n')
    return train_list, val_list, str(one)


def npu_args(lists, amp, folder, *extra, val=1, batch=2, workers=0):
    return ['--device', 'npu', '--amp', amp, '--amp_dtype', 'fp16', '--basenet', 'none', '--input_size', '32',
            '--batch_size', str(batch), '--num_workers', str(workers), '--train_file', lists[0],
            '--val_file', lists[val], '--save_folder', str(folder), *extra]


def drive(runs, env, torchrun=False, report=None, timeout=600):
    spec = json.dumps({'runs': runs, 'report': report})
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'] \
        if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, os.path.join(FAKE, 'drive_train.py'), spec], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope='module', params=['apex', 'native'])
def npu_run(request, lists, upstream_dir, tmp_path_factory):
    """One child process per recipe (Ascend Apex O2; torch.autocast fp16 + torch_npu's GradScaler,
    run from the torch-npu wheel's own files when downloaded, else re-implemented): an
    uninterrupted epoch; the same stopped by --max_iter 2 and resumed; steps whose fp16 gradients
    overflow (in inf/nan mode, and in the saturation mode of the 910A); under Apex also
    --npu_jit_compile. Returns (recipe, folder, reports, each run's stdout)."""
    amp = request.param
    env = variant_env('upstream' if upstream_dir and amp == 'native' else 'reimplemented', upstream_dir)
    root = tmp_path_factory.mktemp(f'npu_{amp}')
    part = root / 'part'
    runs = [{'argv': npu_args(lists, amp, root / 'full', '--epochs', '1', workers=int(amp == 'apex'))},
            {'argv': npu_args(lists, amp, part, '--epochs', '1', '--max_iter', '2')},
            {'argv': npu_args(lists, amp, part, '--epochs', '1', '--resume', str(part / 'sfd_face_checkpoint.pth'))},
            {'argv': npu_args(lists, amp, root / 'saturation', '--epochs', '1', '--max_iter', '2'),
             'loss_factor': OVERFLOW, 'soc': 'Ascend910A'}]
    if amp == 'apex':  # ten overflowing steps in a row stop the run
        runs.append({'argv': npu_args(lists, amp, root / 'overflow', '--epochs', '2', val=2, batch=1),
                     'loss_factor': OVERFLOW, 'soc': 'Ascend910B1'})
        runs.append({'argv': npu_args(lists, amp, root / 'jit', '--epochs', '1', '--max_iter', '1',
                                      '--npu_jit_compile')})
    else:
        runs.append({'argv': npu_args(lists, amp, root / 'overflow', '--epochs', '1', '--max_iter', '2'),
                     'loss_factor': OVERFLOW, 'soc': 'Ascend910B1'})
    proc = drive(runs, env)
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r['upstream'] == env.get('FAKE_ASCEND_UPSTREAM') for r in reports)
    return amp, root, reports, run_outputs(proc.stdout)


def run_outputs(stdout):
    """Each run's stdout, split at the driver's '-- drive_train.py: run <i>' lines."""
    return re.split(r'^-- drive_train\.py: run \d+\n', stdout, flags=re.M)[1:]


def events(report, phase=None, kind=None):
    return [e for e in report['events'] if (phase is None or e[0] == phase) and (kind is None or e[1] == kind)]


def test_npu_stop_and_resume_reach_the_uninterrupted_weights(npu_run):
    """k steps, checkpoint, stop (--max_iter), --resume, more steps, validation: bitwise the same
    as one uninterrupted run; under Apex O2 that includes the fp32 master weights, which live in
    the optimizer and are saved with the loss scaler."""
    mode, root, reports, out = npu_run
    assert [r['exit'] for r in reports[:3]] == [None, None, None], reports
    assert reports[0]['steps'] == 4 and reports[1]['steps'] == 2 and reports[2]['steps'] == 2
    assert 'test epoch:0 || Loss:' in out[0] and 'reached --max_iter 2: checkpoint saved' in out[1]
    assert 'Resuming training' in out[2] and 'test epoch:0 || Loss:' in out[2]
    a, b = load_file(str(root / 'full' / 'sfd_face_checkpoint.pth')), load_file(str(root / 'part' / 'sfd_face_checkpoint.pth'))
    assert a['state'] == b['state'] and a['state']['iteration'] == 4
    for key, value in a['weight'].items():
        assert torch.equal(value, b['weight'][key]), key
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for key, value in a['optimizer']['state'].items():
        assert torch.equal(value['momentum_buffer'], b['optimizer']['state'][key]['momentum_buffer']), key
        assert value['momentum_buffer'].dtype == torch.float32
    if mode == 'apex':
        assert a['weight']['vgg.0.weight'].dtype == torch.float16  # O2: the model is fp16
        masters_a, masters_b = a['amp']['apex_master_params'], b['amp']['apex_master_params']
        assert len(masters_a) == 65 and all(m.dtype == torch.float32 for m in masters_a)
        assert all(torch.equal(x, y) for x, y in zip(masters_a, masters_b))
        assert a['amp']['apex'] == b['amp']['apex'] == {'loss_scaler0': {'loss_scale': 32.0, 'unskipped': 4}}
    else:
        assert a['amp'] == b['amp'] and a['amp']['scaler']['scale'] == 32.0


def test_npu_host_copies_are_pinned(npu_run):
    """torch_npu synchronises the stream for a non_blocking copy from unpinned host memory: in a
    training step (after the first) every host-to-device copy the repository asks for must come
    from pinned memory. (Copies inside the libraries are theirs: Apex's dynamic scaler copies
    torch.tensor(1.).npu() every step, blocking.)"""
    mode, _, reports, _ = npu_run
    for report in reports[:3]:
        steps = events(report, phase='step')
        ours = [e for e in steps if not e[3].startswith('tests/') and not e[3].startswith('/')]
        assert not [e for e in ours if e[1] == 'unpinned' or 'h2d blocking' in e[2]], steps
        assert [e for e in ours if e[1] == 'async' and e[3].startswith('utils/training/engine.py') and 'to_device' in e[3]], steps
        assert [e for e in ours if e[1] == 'async' and e[3].startswith('layers/modules/multibox_loss.py')], steps
        library = [e for e in steps if e not in ours and e[1] == 'sync']
        if mode == 'apex':
            assert {e[3].split(':')[0] for e in library} == {'tests/fake_ascend/apex/amp/__init__.py'}, library


def test_npu_operators_run_precompiled_unless_asked(npu_run):
    mode, _, reports, _ = npu_run
    assert all(r['options'].get('jitCompile') == 'disable' for r in reports[:5]), [r['options'] for r in reports]
    if mode == 'apex':
        assert reports[5]['exit'] is None and reports[5]['options']['jitCompile'] == 'enable'


def test_npu_overflowing_steps_are_skipped_counted_and_stop_the_run(npu_run):
    """The recipe's fixed loss scale (32) must not apply a step whose fp16 gradients overflowed:
    skipped and counted like a non-finite loss, in inf/nan mode (910B) and in the saturation
    mode of the 910A (no inf: the float-status flag); ten in a row stop the run, state saved."""
    mode, root, reports, out = npu_run
    torch.manual_seed(0)
    reference = build_s3fd('train')
    init_weights_from_scratch(reference)
    reference = reference.state_dict()
    if mode == 'apex':
        reference = {k: v.half() for k, v in reference.items()}
    saturation, overflow = reports[3], reports[4]
    assert saturation['exit'] is None and saturation['steps'] == 2
    assert events(saturation, kind='float_status'), saturation  # read on the host, no inf to see
    ckpt = load_file(str(root / 'saturation' / 'sfd_face_checkpoint.pth'))
    assert ckpt['state']['nonfinite_in_a_row'] == 2
    for key, value in reference.items():
        assert torch.equal(value, ckpt['weight'][key]), key
    skips = r'^iter:\d+ gradient overflow at loss scale 32: step skipped \((\d+) in a row\)$'
    assert re.findall(skips, out[3], re.M) == ['1', '2'], out[3]
    skipped = re.findall(skips, out[4], re.M)
    if mode == 'apex':
        assert overflow['exit'] == 2 and overflow['steps'] == 10
        assert skipped == [str(n) for n in range(1, 11)], out[4]
        ckpt = load_file(str(root / 'overflow' / 'sfd_face_checkpoint.pth'))
        assert ckpt["state"]["nonfinite_in_a_row"] == 10 and ckpt["state"]["iteration"] == 9
        assert ckpt['amp']['apex']['loss_scaler0']['loss_scale'] == 32.0
        assert 'stopped after 10 skipped steps in a row: checkpoint saved' in out[4]
    else:
        assert overflow['exit'] is None and skipped == ['1', '2'], out[4]
        ckpt = load_file(str(root / 'overflow' / 'sfd_face_checkpoint.pth'))
        assert ckpt['amp']['scaler']['scale'] == 32.0
    for key, value in reference.items():
        assert torch.equal(value, ckpt['weight'][key]), key


def test_npu_torchrun_hccl_two_processes_stop_and_resume(lists, tmp_path):
    """torchrun --nproc_per_node 2, backend hccl (the fake carries it on Gloo), Apex O2: a step,
    checkpoint and stop, resume, a step, validation: the same weights as one uninterrupted run."""
    env = variant_env('reimplemented', None)
    part = tmp_path / 'part'
    runs = [{'argv': npu_args(lists, 'apex', tmp_path / 'full', '--epochs', '1')},
            {'argv': npu_args(lists, 'apex', part, '--epochs', '1', '--max_iter', '1')},
            {'argv': npu_args(lists, 'apex', part, '--epochs', '1', '--resume', str(part / 'sfd_face_checkpoint.pth'))}]
    out = run_outputs(drive(runs, env, torchrun=True, report=str(tmp_path)).stdout)
    assert all('2 processes, batch 2 each' in o for o in out), out
    assert 'test epoch:0 || Loss:' in out[0] and 'test epoch:0 || Loss:' in out[2]
    for rank in (0, 1):
        with open(tmp_path / f'report-{rank}.json') as f:
            reports = json.load(f)
        assert [r['steps'] for r in reports] == [2, 1, 1] and all(r['exit'] is None for r in reports)
    a, b = load_file(str(tmp_path / 'full' / 'sfd_face_checkpoint.pth')), load_file(str(part / 'sfd_face_checkpoint.pth'))
    assert a['world_size'] == b['world_size'] == 2 and a['state'] == b['state']
    for key, value in a['weight'].items():
        assert torch.equal(value, b['weight'][key]), key
    assert all(torch.equal(x, y) for x, y in zip(a['amp']['apex_master_params'], b['amp']['apex_master_params']))
