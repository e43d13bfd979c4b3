"""The operators a training step dispatches on an Ascend NPU against benchmarks/npu_ops.json, the
list verified against torch_npu's registrations (benchmarks/check_npu_ops.py, no NPU needed)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.check_npu_ops import (KNOWN_HOST_COPIES, check, needs_replacement, parse_native_yaml,
                                 parse_op_plugin_yaml, reached, read_list)
from conftest import extract_torch_npu_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIED = os.path.join(REPO, 'benchmarks', 'npu_ops.json')
APEX_DIR = os.path.join(os.path.dirname(REPO), 'shared', 'ascend-apex')


def _python_backends():
    from torch.utils import backend_registration
    return hasattr(backend_registration, '_setup_privateuseone_for_python_backend') and hasattr(torch._C, '_acc')


@pytest.mark.skipif(not _python_backends(), reason='this torch cannot serve a PrivateUse1 backend from Python')
def test_training_step_dispatches_only_operators_verified_on_the_npu(tmp_path):
    """With the loss scaling and optimizers a real NPU run uses: Ascend Apex's own code (from
    ../shared/ascend-apex when present) and torch_npu's GradScaler and NpuFusedSGD (the wheel's own
    files when downloaded, else the fake's re-implementations)."""
    # In a process of its own: the emulated NPU renames PyTorch's PrivateUse1 backend for good.
    command = [sys.executable, 'benchmarks/check_npu_ops.py', '--apex', APEX_DIR, '--input_size', '32', '32']
    upstream = extract_torch_npu_files(tmp_path)
    if upstream:
        command += ['--torch_npu_files', upstream]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert 'native_fp16' in out['configs'] and ('apex' in out['configs']) == os.path.isdir(APEX_DIR), out['skipped']
    verified = read_list(VERIFIED)
    new = sorted(set(out['ops']) - set(verified['ops']))
    assert not new, (f'the training step now dispatches {new} on the NPU, not checked against torch_npu: '
                     f'{verified["about"]}')
    for name in out['ops']:
        columns = verified['ops'][name]['by_version']
        assert set(columns) == set(verified['versions']), f'{name}: not checked for every torch_npu version'
        on_cpu = {v: st for v, st in columns.items() if st in ('missing', 'host_copy')}
        assert not on_cpu, f'{name} runs on the CPU in {on_cpu}'
    # The emulated NPU takes the accelerator code paths and must give the CPU's loss.
    assert out['first_loss_rel_diff'] < 1e-6
    assert {'forward', 'loss', 'backward', 'grad_scaler', 'optimizer'} <= {p for r in out['ops'].values()
                                                                          for p in r['phases']}
    # the loss scaling of both libraries is recorded: Apex's in its scale_loss (backward; only where Ascend Apex's
    # files are beside the repository), torch_npu's GradScaler
    expected = {'grad_scaler'} | ({'backward'} if 'apex' in out['configs'] else set())
    assert expected <= set(out['ops']['aten::_amp_foreach_non_finite_check_and_unscale_']['phases'])
    # no stand-in optimizer: torch.optim.SGD's foreach kernels are not what an NPU run steps with
    assert not [name for name in out['ops'] if name.startswith('aten::_foreach_')]


YAML = """all_version: [v2.1, v2.2, v2.3, v2.4, v2.5]
official:
  - func: add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor
    acl_op: all_version
    op_api: [v2.2, newest]

  - func: scatter_reduce_.two(Tensor(a!) self, int dim, Tensor index, Tensor src, str reduce) -> Tensor(a!)
    op_api: [v2.4, v2.5]

  - func: sub.out(Tensor self, Tensor other, *, Scalar alpha=1, Tensor(a!) out) -> Tensor(a!)
    acl_op: v2.1, v2.3

symint:
  - func: zeros(SymInt[] size, *, ScalarType? dtype=None) -> Tensor
    op_api: v2.5
tocpu:
  - func: median
    version: v2.1
"""


def test_op_plugin_yaml_versions():
    v21 = parse_op_plugin_yaml(YAML, '2.1.0')
    assert v21 == {'add.Tensor': ['acl_op'], 'sub.out': ['acl_op'], 'median': ['tocpu']}
    v25 = parse_op_plugin_yaml(YAML, '2.5')
    assert v25 == {'add.Tensor': ['acl_op', 'op_api'], 'scatter_reduce_.two': ['op_api'], 'zeros': ['op_api']}
    assert parse_op_plugin_yaml(YAML, '2.3')['sub.out'] == ['acl_op']
    with pytest.raises(ValueError, match='not among'):
        parse_op_plugin_yaml(YAML, '2.6')
    native = parse_native_yaml('backend: NPU\nsupported:\n  - view\n  - func: copy_\n    op_api: True\n'
                               'autograd:\n  - not_this\n')
    assert native == {'view', 'copy_'}


def _op(composite=None, calls=(), direct=1, dtypes=('float32',), strings=()):
    return {'composite': composite, 'calls_ops': list(calls), 'direct_calls': direct, 'dtypes': list(dtypes),
            'strings': list(strings)}


def test_check_resolves_composites_and_known_host_copies():
    union = {
        # a structured in-place op without an NPU kernel runs its out= variant
        'aten::sub_.Tensor': _op('CompositeExplicitAutogradNonFunctional', ['aten::sub.out']),
        'aten::sub.out': _op(direct=0),
        # an op with an NPU kernel: what its composite would call is not reached
        'aten::add.Tensor': _op('CompositeExplicitAutogradNonFunctional', ['aten::add.out']),
        'aten::add.out': _op(direct=0),
        'aten::scatter_reduce_.two': _op('CompositeExplicitAutogradNonFunctional', ['aten::scatter_reduce.two_out'],
                                         dtypes=['float32', 'int64'], strings=['amax']),
        'aten::scatter_reduce.two_out': _op(direct=0, dtypes=['float32', 'int64'], strings=['amax']),
        'aten::view': _op(),
    }
    registered = {'add.Tensor': ['acl_op'], 'sub.out': ['acl_op']}
    status = check(union, registered, {'view'})
    assert status['aten::sub_.Tensor']['status'] == 'composite'
    assert status['aten::view'] == {'status': 'npu', 'kernel': ['torch_npu']}
    assert status['aten::add.out']['status'] == 'missing' and 'aten::add.out' not in reached(union, status)
    assert needs_replacement(union, status) == ['aten::scatter_reduce_.two']
    # op-plugin's kernel (torch_npu 2.13+) copies amax to the host; a float32 sum stays on the NPU
    registered['scatter_reduce_.two'] = ['op_api']
    status = check(union, registered, {'view'})
    assert status['aten::scatter_reduce_.two']['status'] == 'host_copy'
    assert needs_replacement(union, status) == ['aten::scatter_reduce_.two']
    assert not KNOWN_HOST_COPIES['aten::scatter_reduce_.two'][0](['float32', 'int64'], ['sum'])
