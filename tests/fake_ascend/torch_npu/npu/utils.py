"""Fake torch_npu.npu.utils (torch_npu/npu/utils.py): device selection, synchronisation, the
current stream (StreamContext, stream, set_stream, current_stream, default_stream), SoC
capabilities and the float-status overflow flag of the NPUs before the 910B."""
import warnings

import torch

import torch_npu
from torch_npu import _core
from torch_npu.utils._error_code import ErrCode, pta_error


def _get_device_index(device, optional=False, allow_cpu=False):
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if allow_cpu and device.type == 'cpu':
            return -1
        if device.type != 'npu':
            raise ValueError(f'Expected a npu device, but got: {device}' + pta_error(ErrCode.VALUE))
        device = device.index
    if device is None:
        if optional:
            return current_device()
        raise ValueError('Expected a npu device with a specified index or an integer, but got: None'
                         + pta_error(ErrCode.VALUE))
    return device


def set_device(device):
    index = _get_device_index(device, optional=True)
    if index < 0:
        return
    if index >= _core.STATE.device_count:
        raise RuntimeError(f'aclrtSetDevice: invalid device id {index} '
                           f'({_core.STATE.device_count} NPUs)' + pta_error(ErrCode.ACL))
    if _core.STATE.allocated and index != _core.STATE.current:
        raise RuntimeError(f'fake torch_npu: one NPU per process (tensors already live on npu:'
                           f'{_core.STATE.current}); cannot switch to npu:{index}')
    _core.STATE.current = index
    _core.STATE.initialized = True


def current_device():
    return _core.STATE.current


def synchronize(device=None):
    _core.STATE.initialized = True
    _core.LEDGER.add('sync', 'synchronize')
    for state in _core.STREAMS.values():  # aclrtSynchronizeDevice: every stream
        _core.host_waits(state.snapshot())


def current_stream(device=None):
    from .streams import Stream
    return Stream(stream_id=_core.STATE.stream)


def default_stream(device=None):
    from .streams import Stream
    return Stream(stream_id=0)


def set_stream(stream):
    if stream is None:
        return
    _core.STATE.stream = stream.stream_id


class StreamContext:
    """Selects `stream` for the kernels queued inside (a no-op for None); restores the previous one."""

    def __init__(self, stream):
        self.stream = stream
        self.previous = None

    def __enter__(self):
        if self.stream is None:
            return
        self.previous = current_stream()
        set_stream(self.stream)

    def __exit__(self, *exc):
        if self.stream is None:
            return
        set_stream(self.previous)


def stream(stream):
    return StreamContext(stream)


def is_bf16_supported(including_emulation=False):
    """IsBF16Supported (torch_npu/csrc/core/npu/NpuVariables.cpp): SocVersion >= Ascend910B1."""
    _core.STATE.initialized = True
    return _core.STATE.soc >= _core.ASCEND910B1


def is_support_inf_nan():
    _core.STATE.initialized = True
    return _core.supports_inf_nan()


def get_npu_overflow_flag():
    if is_support_inf_nan():
        raise RuntimeError('Unsupported api when soc_version >= Ascend910B1, please use npu_check_overflow'
                           + pta_error(ErrCode.NOT_SUPPORT))
    float_status = torch_npu.npu_get_float_status(torch.zeros(8).npu())
    return bool(float_status.cpu()[0] != 0)


def clear_npu_overflow_flag():
    if is_support_inf_nan():
        warnings.warn('When soc_version >= Ascend910B1, clear_npu_overflow_flag is useless. Please remove it.')
        return
    torch_npu.npu_clear_float_status(torch.zeros(8).npu())


def npu_check_overflow(grad):
    if is_support_inf_nan():
        total = grad if isinstance(grad, float) else float(grad.float().sum())
        return total != total or total in (float('inf'), float('-inf'))
    overflow = get_npu_overflow_flag()
    if overflow:
        clear_npu_overflow_flag()
    return overflow
