"""Test-only fake of torch_npu (Huawei's Ascend adapter for PyTorch) for machines without an NPU.

Only the surface this repository touches, with upstream's behaviour, refusals and call order;
each module names the upstream file it follows. Tests put tests/fake_ascend on PYTHONPATH; it
is never importable from the repository itself. See _core.py for how the device is emulated.

Stubs for compiled parts of torch_npu (torch_npu/csrc): the device and its kernels (_core),
get_npu_format / npu_format_cast (every tensor has the base ND format here),
get_storage_size, npu_change_data_ptr (aten/common/ChangeDataPtr.cpp), and the float-status
operators of the NPUs before the 910B.
"""
import os

import torch

from . import _core
from . import npu

__version__ = '2.14.0+fake'

_core.install(npu)

ACL_FORMAT_ND = 2


def get_npu_format(tensor):
    return ACL_FORMAT_ND


def npu_format_cast(tensor, acl_format):
    if acl_format != ACL_FORMAT_ND:
        raise NotImplementedError('fake torch_npu: only the ND format exists here')
    return tensor


def get_storage_size(tensor):
    return _core.storage_size(tensor)


def npu_change_data_ptr(dst, src, index):
    """aten/common/ChangeDataPtr.cpp: dst's storage now starts `index` elements into src's
    storage (its own storage size unchanged). Same dtype, float32/float16/bfloat16 only."""
    from .utils._error_code import ErrCode, pta_error
    if index < 0:
        raise RuntimeError(f'Expect offset(index) equal or greater than zero, got: {index}' + pta_error(ErrCode.VALUE))
    if src.dtype != dst.dtype:
        raise RuntimeError(f'Expect src and dst tensors having the same dtype, got: src with dtype {src.dtype}, '
                           f'dst with dtype {dst.dtype}' + pta_error(ErrCode.TYPE))
    if src.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError('Only supports src and dst tensors with dtype float32, float16 or bfloat16, got: '
                           f'{src.dtype}' + pta_error(ErrCode.TYPE))
    dst_size, src_size = get_storage_size(dst), get_storage_size(src)
    if index + dst_size > src_size:
        raise RuntimeError(f'Offsets overflow, got: offset(index) {index}, dst storage size {dst_size}, '
                           f'src storage size {src_size}' + pta_error(ErrCode.PARAM))
    _core.repoint_storage(dst, src, index)
    return 0


def npu_get_float_status(tensor):
    """The float-status register of the NPUs before the 910B: element 0 is non-zero after an
    overflow (op-plugin npu_get_float_status)."""
    _core.LEDGER.add('float_status', 'npu_get_float_status')
    out = torch.zeros(8).npu()
    if _core.STATE.float_status:
        out.fill_(1.0)
    return out


def npu_clear_float_status(tensor):
    _core.STATE.float_status = False
    return torch.zeros(8).npu()


from . import utils  # noqa: E402,F401
from . import optim  # noqa: E402,F401
from .npu import amp as _amp  # noqa: E402,F401
from . import distributed  # noqa: E402,F401
from . import _upstream  # noqa: E402

if os.environ.get('FAKE_ASCEND_UPSTREAM'):
    _upstream.activate(os.environ['FAKE_ASCEND_UPSTREAM'])
