"""train.py --device npu against a test-only fake of torch_npu (tests/fake_ascend) and Ascend
Apex's own code.

The fake follows upstream's behaviour, refusals and call order (each module names its upstream
file); the 'npu' device is a real PrivateUse1 device computed on the CPU (see
tests/fake_ascend/torch_npu/_core.py). Everything runs in child processes: the fake registers
the device for good.

Ascend Apex runs from its own Python files in ../shared/ascend-apex (never copied into the
repository; its one compiled part, change_data_ptr, is tests/fake_ascend/change_data_ptr.py);
without them the Apex tests are skipped, saying so. Two variants of torch_npu's Python parts:
the fake's re-implementations (always), and torch_npu's own files (optimizer, tensor combining,
GradScaler) from the torch-npu wheel when it has been downloaded (.ci/run does: `pip download
torch-npu==2.14.0 --no-deps -d .cache/torch-npu`); without the wheel that variant is skipped,
saying so.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from conftest import TORCH_NPU_WHEEL_DIR as WHEEL_DIR, computed_once as shared, extract_torch_npu_files, synthetic_lists
from s3fd import build_s3fd, init_weights_from_scratch
from utils.files.weights import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(REPO, 'tests', 'fake_ascend')
# Ascend Apex's own Python files (never copied into the repository): ../shared/ascend-apex
APEX_DIR = os.environ.get('ASCEND_APEX_DIR') or os.path.join(os.path.dirname(REPO), 'shared', 'ascend-apex')
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
    return extract_torch_npu_files(tmp_path_factory.mktemp('torch_npu_wheel'))


def apex_present():
    return os.path.isfile(os.path.join(APEX_DIR, 'apex', '__init__.py'))


def require_apex():
    if not apex_present():
        pytest.skip(f'no Ascend Apex sources in {APEX_DIR} (../shared/ascend-apex beside the repository, or '
                    'ASCEND_APEX_DIR): Ascend Apex\'s own amp and NpuFusedSGD are not run')


def variant_env(variant, upstream_dir):
    """The child's environment: the fake torch_npu (and the compiled parts Apex needs), Ascend
    Apex's own files when present, the repository."""
    path = ([APEX_DIR] if apex_present() else []) + [FAKE, REPO]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS='1', FAKE_NPU_SOC='Ascend910B1')
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
               'hccl_refuses_the_dtypes_and_ops_upstream_refuses', 'streams_order_a_side_stream_collective',
               'change_data_ptr_refuses_what_upstream_refuses',
               'jit_compile_default_follows_the_soc', 'bf16_follows_the_soc_and_autocast_refuses_it_before_the_910b',
               'apex_fused_sgd_refuses_to_step_outside_amp', 'apex_o2_zero_grad_takes_no_argument',
               'apex_initialize_refuses_ddp_and_host_models', 'apex_is_ascend_apex_own_code',
               'apex_initialize_refuses_an_optimizer_it_already_patched',
               'apex_static_loss_scale_steps_on_overflow',
               'apex_pinned_dynamic_scale_skips_overflow_and_keeps_the_scale',
               'native_fp16_skips_overflow_and_keeps_the_scale', 'zero_grad_as_each_optimizer_accepts_it',
               'amp_auto_without_apex_on_910a_and_910b', 'amp_auto_falls_back_from_a_broken_or_nvidia_apex',
               'combine_ddp_needs_apex_on_the_npu_and_several_processes',
               'native_fp16_dynamic_loss_scale', 'apex_dynamic_loss_scale',
               'native_fp16_resume_keeps_the_loss_scale', 'apex_resume_keeps_the_loss_scale',
               'setup_device_sets_the_compile_mode', 'torch_npu_import_errors_are_one_line']


@pytest.fixture(scope='module')
def checks(upstream_dir, tmp_path_factory):
    """One child process runs every check, with each variant (tests/fake_ascend/check_fakes.py)."""
    def compute(folder):
        command = [sys.executable, os.path.join(FAKE, 'check_fakes.py')]
        if upstream_dir:
            command += ['--upstream', upstream_dir]
        proc = subprocess.run(command, cwd=REPO, env=variant_env('reimplemented', None), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return shared(tmp_path_factory, 'checks', compute)


@pytest.mark.parametrize('variant', ['reimplemented', 'upstream'])
@pytest.mark.parametrize('name', CHECK_NAMES)
def test_fake(name, variant, checks, upstream_dir):
    variant_env(variant, upstream_dir)  # skips the upstream variant without the wheel
    assert set(checks[variant]) == set(CHECK_NAMES)
    if checks[variant][name].startswith('skipped:'):  # an Apex check without ../shared/ascend-apex
        require_apex()
    assert checks[variant][name] == 'ok', checks[variant][name]


# -- train.py end to end ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def lists(tmp_path_factory):
    """(train list, val list, a val list of one image) of a small synthetic WIDER."""
    def compute(root):
        train_list, val_list = synthetic_lists(root)
        one = root / 'val_one.txt'
        one.write_text((root / 'face_val.txt').read_text().splitlines()[0] + '\n')
        return train_list, val_list, str(one)
    return shared(tmp_path_factory, 'lists', compute)


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
    --npu_jit_compile, with autocast --loss_scale dynamic then a resume without it. Returns
    (recipe, folder, reports, each run's stdout)."""
    amp = request.param
    if amp == 'apex':
        require_apex()

    def compute(root):
        env = variant_env('upstream' if upstream_dir and amp == 'native' else 'reimplemented', upstream_dir)
        part = root / 'part'
        runs = [{'argv': npu_args(lists, amp, root / 'full', '--epochs', '1', workers=int(amp == 'apex'))},
                {'argv': npu_args(lists, amp, part, '--epochs', '1', '--max_iter', '2')},
                {'argv': npu_args(lists, amp, part, '--epochs', '1', '--resume',
                                  str(part / 'sfd_face_checkpoint.pth'))},
                {'argv': npu_args(lists, amp, root / 'saturation', '--epochs', '1', '--max_iter', '2'),
                 'loss_factor': OVERFLOW, 'soc': 'Ascend910A'}]
        if amp == 'apex':  # ten overflowing steps in a row stop the run
            runs.append({'argv': npu_args(lists, amp, root / 'overflow', '--epochs', '2', val=2, batch=1),
                         'loss_factor': OVERFLOW, 'soc': 'Ascend910B1'})
            runs.append({'argv': npu_args(lists, amp, root / 'jit', '--epochs', '1', '--max_iter', '1',
                                          '--npu_jit_compile')})
            # the first run again on the CPU in float32, and with a ten times larger learning rate
            for name, extra in (('cpu', ()), ('cpu_lr', ('--lr', '1e-2'))):
                argv = npu_args(lists, 'off', root / name, '--epochs', '1', *extra)
                runs.append({'argv': ['cpu' if a == 'npu' else a for a in argv]})
        else:  # --loss_scale dynamic: two overflowing steps back the scale off; a resume keeps the mode and scale
            runs.append({'argv': npu_args(lists, amp, root / 'overflow', '--epochs', '1', '--max_iter', '2',
                                          '--loss_scale', 'dynamic'), 'loss_factor': OVERFLOW, 'soc': 'Ascend910B1'})
            runs.append({'argv': npu_args(lists, amp, root / 'resumed', '--epochs', '1', '--resume',
                                          str(root / 'overflow' / 'sfd_face_checkpoint.pth'))})
        proc = drive(runs, env)
        reports = json.loads(proc.stdout.strip().splitlines()[-1])
        assert all(r['upstream'] == env.get('FAKE_ASCEND_UPSTREAM') for r in reports)
        return str(root), reports, run_outputs(proc.stdout)
    root, reports, outputs = shared(tmp_path_factory, f'npu_{amp}', compute)
    return amp, pathlib.Path(root), reports, outputs


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
        # O2: the model is fp16; Apex's state-dict hook (_initialize.py, O2StateDictHook) saves it as float32
        weight = a['weight']['vgg.0.weight']
        assert weight.dtype == torch.float32 and torch.equal(weight.half().float(), weight)
        masters_a, masters_b = a['amp']['apex_master_params'], b['amp']['apex_master_params']
        assert len(masters_a) == 65 and all(m.dtype == torch.float32 for m in masters_a)
        assert all(torch.equal(x, y) for x, y in zip(masters_a, masters_b))
        assert a['amp']['apex'] == b['amp']['apex'] == {'loss_scaler0': {'loss_scale': 32.0, 'unskipped': 4}}
    else:
        assert a['amp'] == b['amp'] and a['amp']['scaler']['scale'] == 32.0


@pytest.mark.parametrize('npu_run', ['apex'], indirect=True)
def test_compare_losses_cpu_float32_vs_npu_apex_fp16(npu_run, tmp_path):
    """The recipe's acceptance check with tools/compare_losses.py: npu_run's first run (4 steps and a
    validation, Apex O2 fp16 on the fake NPU) and the same seeded run on the CPU in float32 are
    aligned within the documented tolerance (5% mean relative difference), by their logs and by
    their metrics.jsonl; the CPU run with a ten times larger learning rate is not."""
    mode, root, reports, out = npu_run
    for name, text in (('npu', out[0]), ('cpu', out[6]), ('cpu_lr', out[7])):
        assert 'test epoch:0 || Loss:' in text, text
        (tmp_path / f'{name}.log').write_text(text)

    def compare(a, b, *extra):
        proc = subprocess.run([sys.executable, 'tools/compare_losses.py', str(a), str(b), *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stdout + proc.stderr

    status, text = compare(tmp_path / 'cpu.log', tmp_path / 'npu.log', '--plot', str(tmp_path / 'losses.png'))
    assert status == 0 and re.search(r'tolerance 5\.00%: aligned$', text, re.M), text
    assert re.search(r'^train +iter 0 ', text, re.M) and re.search(r'^val +epoch 0 ', text, re.M), text
    assert (tmp_path / 'losses.png').stat().st_size > 0
    status, text = compare(root / 'cpu' / 'metrics.jsonl', root / 'full' / 'metrics.jsonl')
    assert status == 0 and re.search(r': aligned$', text, re.M), text
    status, text = compare(tmp_path / 'cpu_lr.log', tmp_path / 'npu.log')
    assert status == 1 and re.search(r': NOT aligned$', text, re.M), text


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
            files = {e[3].split(':')[0] for e in library}
            amp_dir = os.path.join(os.path.abspath(APEX_DIR), 'apex', 'amp', '')
            assert files and all(f.startswith(amp_dir) for f in files), library


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
    else:  # --loss_scale dynamic: torch_npu's GradScaler starts at 2**16 and halves at each overflow
        assert overflow['exit'] is None and skipped == [], out[4]
        assert re.findall(r'^iter:(\d+) gradient overflow at loss scale (\d+): step skipped', out[4], re.M) == \
            [('0', '65536'), ('1', '32768')], out[4]
        ckpt = load_file(str(root / 'overflow' / 'sfd_face_checkpoint.pth'))
        assert ckpt['amp']['loss_scale'] == {'mode': 'dynamic', 'scale': 16384.0}, ckpt['amp']
    for key, value in reference.items():
        assert torch.equal(value, ckpt['weight'][key]), key


@pytest.mark.parametrize('npu_run', ['native'], indirect=True)
def test_npu_dynamic_loss_scale_is_logged_and_kept_on_resume(npu_run):
    """--loss_scale dynamic: the log shows the scale when it changes (one line); a --resume without
    --loss_scale continues in the checkpoint's mode from the scale it reached."""
    mode, root, reports, out = npu_run
    assert 'Device: npu:0 | autocast float16 + GradScaler (dynamic loss scale)' in out[4], out[4]
    assert re.findall(r'^->>loss scale:.*$', out[4], re.M) == ['->>loss scale:32768 (dynamic)'], out[4]
    resumed = out[5]
    assert reports[5]['exit'] is None and reports[5]['steps'] == 2 and 'Resuming training' in resumed
    assert "Loss scale: continuing the checkpoint's, a dynamic loss scale, at 16384" in resumed, resumed
    ckpt = load_file(str(root / 'resumed' / 'sfd_face_checkpoint.pth'))
    assert ckpt['state']['iteration'] == 4 and ckpt['amp']['loss_scale']['mode'] == 'dynamic', ckpt['amp']
    assert ckpt['amp']['scaler']['dynamic'] is True and ckpt['amp']['loss_scale']['scale'] <= 16384.0


@pytest.fixture(scope='module')
def torchrun(lists, upstream_dir, tmp_path_factory):
    """One `torchrun --nproc_per_node 2` launch, backend hccl (the fake carries it on Gloo), one
    run after another in the same two processes (torch_npu's own GradScaler and fused SGD when
    the wheel is there):
    0-2  Apex O2 under DDP: 2 steps and validation; the same stopped after 1 step and resumed;
    3-5  the same three with --combine_ddp (Apex's own gradient exchange, no DDP);
    6-9  one step whose fp16 gradients overflow on rank 1 only: Apex under DDP on a 910B
         (inf/nan mode), Apex with combine_ddp on a 910A (saturation mode), torch_npu's
         GradScaler (autocast fp16) under DDP on a 910B and on a 910A.
    Returns (folder, each run's stdout, {rank: reports})."""
    require_apex()

    def compute(root):
        env = variant_env('upstream' if upstream_dir else 'reimplemented', upstream_dir)
        runs = []
        for name, extra in (('ddp', ()), ('combine_ddp', ('--combine_ddp',))):
            part = root / f'{name}_part'
            runs += [{'argv': npu_args(lists, 'apex', root / name, '--epochs', '1', *extra)},
                     {'argv': npu_args(lists, 'apex', part, '--epochs', '1', '--max_iter', '1', *extra)},
                     {'argv': npu_args(lists, 'apex', part, '--epochs', '1', '--resume',
                                       str(part / 'sfd_face_checkpoint.pth'), *extra)}]
        for name, amp, soc, extra in (('apex_910b', 'apex', 'Ascend910B1', ()),
                                      ('apex_combine_ddp_910a', 'apex', 'Ascend910A', ('--combine_ddp',)),
                                      ('native_910b', 'native', 'Ascend910B1', ()),
                                      ('native_910a', 'native', 'Ascend910A', ())):
            runs.append({'argv': npu_args(lists, amp, root / f'overflow_{name}', '--epochs', '1', '--max_iter', '1',
                                          *extra, val=2), 'loss_factor': OVERFLOW, 'factor_ranks': [1], 'soc': soc})
        out = run_outputs(drive(runs, env, torchrun=True, report=str(root)).stdout)
        reports = {}
        for rank in (0, 1):
            with open(root / f'report-{rank}.json') as f:
                reports[rank] = json.load(f)
        return str(root), out, reports
    root, out, reports = shared(tmp_path_factory, 'torchrun', compute)
    return pathlib.Path(root), out, {int(rank): value for rank, value in reports.items()}


def test_npu_torchrun_two_processes(torchrun):
    """The torchrun launch's three findings (one test: its runs are made once, in one worker)."""
    check_stop_and_resume(*torchrun)
    check_combine_ddp_ranks_agree_and_match_ddp(*torchrun)
    check_one_rank_overflowing_makes_every_rank_skip(*torchrun)


def check_stop_and_resume(root, out, reports):
    """DDP and --combine_ddp: a step, checkpoint and stop, resume, a step, validation: the same
    weights (fp16 and fp32 masters) as one uninterrupted run, bit for bit."""
    assert all('2 processes, batch 2 each' in o for o in out), out
    assert all('combine_ddp' in o.splitlines()[0] for o in out[3:6]), out[3:6]
    for first in (0, 3):
        assert 'test epoch:0 || Loss:' in out[first] and 'test epoch:0 || Loss:' in out[first + 2]
        for rank in (0, 1):
            assert [r['steps'] for r in reports[rank][first:first + 3]] == [2, 1, 1]
            assert all(r['exit'] is None for r in reports[rank][first:first + 3])
    for name in ('ddp', 'combine_ddp'):
        a = load_file(str(root / name / 'sfd_face_checkpoint.pth'))
        b = load_file(str(root / f'{name}_part' / 'sfd_face_checkpoint.pth'))
        assert a['world_size'] == b['world_size'] == 2 and a['state'] == b['state']
        for key, value in a['weight'].items():
            assert torch.equal(value, b['weight'][key]), (name, key)
        assert all(torch.equal(x, y) for x, y in zip(a['amp']['apex_master_params'], b['amp']['apex_master_params']))
    for rank in (0, 1):  # the resumed run ends where the uninterrupted one did, on each process
        assert reports[rank][5]['weights'] == reports[rank][3]['weights'], rank


def check_combine_ddp_ranks_agree_and_match_ddp(root, out, reports):
    """--combine_ddp: Apex broadcasts rank 0's weights at amp.initialize and all-reduces the combined
    fp16 gradients itself, from the second step on bucket by bucket in gradient hooks on a side
    stream, the last bucket after the backward on the default stream. After k = 2 steps every
    rank holds the same weights, and they agree with the DDP run of the same seed within a bound
    from fp16 arithmetic: DDP multiplies each process's fp16 gradient by 1/2 into its bucket
    (Reducer::copy_grad_to_bucket) and sums; Apex divides the combined buffer by 2 (div_) and sums.
    x * 0.5 and x / 2 are the same correctly rounded value (exact unless subnormal, then rounded
    alike), and the sum of the two halves is one correctly rounded, commutative fp16 addition: the
    averaged gradients are equal element for element, and everything after them (Apex's unscale
    into the fp32 masters, NpuFusedSGD) is the same code on the same values. The bound is
    therefore 0: equal bit for bit."""
    for run in range(3, 6):
        assert reports[0][run]['weights'] == reports[1][run]['weights'], run  # fp16 weights and fp32 masters
    hooks = [e for e in reports[0][3]['events'] if e[0] == 'step' and e[1] == 'hccl']
    side = [e for e in hooks if not e[2].endswith('on stream 0')]
    assert side and all(e[2].startswith('allreduce on stream') and '_process_optimizer.py' in e[3]
                        and 'hook_function' in e[3] for e in side), hooks
    assert [e for e in hooks if e[2] == 'allreduce on stream 0' and 'combine_ddp_all_reduce' in e[3]], hooks
    first = [e for e in reports[0][3]['events'] if e[0] == 'first_step' and e[1] == 'hccl']
    assert [e for e in first if e[2].startswith('allgather')] and \
        [e for e in first if 'init_combine_ddp_common' in e[3]], first
    ddp = load_file(str(root / 'ddp' / 'sfd_face_checkpoint.pth'))
    combined = load_file(str(root / 'combine_ddp' / 'sfd_face_checkpoint.pth'))
    assert ddp['state']['iteration'] == combined['state']['iteration'] == 2
    bound = 0.0
    for x, y in zip(ddp['amp']['apex_master_params'], combined['amp']['apex_master_params']):
        assert float((x - y).abs().max()) <= bound
    for key, value in ddp['weight'].items():
        assert float((value - combined['weight'][key]).abs().max()) <= bound, key


def check_one_rank_overflowing_makes_every_rank_skip(root, out, reports):
    """fp16 gradients overflow on rank 1 only: every rank skips the step (both libraries), or the
    ranks' weights would part. On a 910B the inf reaches rank 0 through the gradient average (DDP,
    or Apex's combine_ddp all-reduce); on a 910A there is no inf, only rank 1's float-status flag,
    and the libraries all-reduce an overflow count (Apex scaler.py check_overflow_and_sync,
    torch_npu grad_scaler.py _sync_dist_overflow_count)."""
    torch.manual_seed(0)
    reference = build_s3fd('train')
    init_weights_from_scratch(reference)
    for run, name in zip(range(6, 10), ('apex_910b', 'apex_combine_ddp_910a', 'native_910b', 'native_910a')):
        assert re.findall(r'^iter:0 gradient overflow at loss scale 32: step skipped \(1 in a row\)$', out[run],
                          re.M), (name, out[run])
        ckpt = load_file(str(root / f'overflow_{name}' / 'sfd_face_checkpoint.pth'))
        assert ckpt['state']['nonfinite_in_a_row'] == 1 and ckpt['state']['iteration'] == 1, name
        for key, value in reference.state_dict().items():  # rank 0 did not step either
            expected = value.half().float() if name.startswith('apex') else value
            assert torch.equal(expected, ckpt['weight'][key].float()), (name, key)
        assert reports[0][run]['weights'] == reports[1][run]['weights'], name
        if name.endswith('910a'):
            assert events(reports[1][run], kind='float_status') and events(reports[0][run], kind='float_status')


