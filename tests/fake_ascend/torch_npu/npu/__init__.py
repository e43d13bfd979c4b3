"""Fake torch_npu.npu, registered as torch.npu (torch_npu/npu/__init__.py exports it so).

Sources of each behaviour: utils.py (set_device, synchronize, streams, is_bf16_supported, float
status), npu_config.py (set_compile_mode), autocast_utils.py (get_amp_supported_dtype),
streams.py (Stream, Event), memory.py (memory statistics; the fake allocates nothing on a device
and reports 0), and the legacy tensor types torch.npu.FloatTensor, HalfTensor, ... that
torch_npu/csrc/utils/TensorType.cpp creates (see _LegacyTensorType).
"""
import os

import torch

from torch_npu import _core
from torch_npu.utils._error_code import ErrCode, pta_error
from . import utils  # noqa: F401
from .utils import (_get_device_index, clear_npu_overflow_flag, current_device, current_stream,  # noqa: F401
                    default_stream, get_npu_overflow_flag, is_bf16_supported, npu_check_overflow, set_device,
                    set_stream, stream, StreamContext, synchronize)
from .streams import Event, Stream  # noqa: F401


def is_available():
    return _core.STATE.device_count > 0


def device_count():
    return _core.STATE.device_count


def is_initialized():
    return _core.STATE.initialized


def _lazy_init():
    _core.STATE.initialized = True


init = _lazy_init


def _is_in_bad_fork():
    return False


_seed = [0]


def manual_seed(seed):
    _seed[0] = int(seed)


manual_seed_all = manual_seed


def initial_seed():
    return _seed[0]


def get_amp_supported_dtype():
    """autocast_utils.py: bfloat16 only where is_bf16_supported()."""
    if is_bf16_supported():
        return [torch.float16, torch.bfloat16, torch.float32]
    return [torch.float16, torch.float32]


class _LegacyTensorType(type):
    """torch.npu.<Type>Tensor (torch_npu/csrc/utils/TensorType.cpp, on torch's legacy constructor,
    torch/csrc/utils/tensor_new.cpp legacy_tensor_ctor): called with a sequence, a tensor of
    those values; with sizes, an uninitialised tensor of that shape; with nothing, an empty one,
    all on the current NPU. isinstance() holds for an NPU tensor of that dtype."""

    def __call__(cls, *args):
        if len(args) == 1 and not isinstance(args[0], int):
            return torch.tensor(args[0], dtype=cls.dtype).to(torch.device('npu', _core.STATE.current))
        if not all(isinstance(a, int) for a in args):
            raise TypeError(f'{cls.__name__}(): expected a sequence or sizes, got {args}')
        return torch.empty(args, dtype=cls.dtype).to(torch.device('npu', _core.STATE.current))

    def __instancecheck__(cls, obj):
        return isinstance(obj, _core.NpuTensor) and obj.dtype == cls.dtype


def _legacy_type(name, dtype):
    return _LegacyTensorType(name, (), {'dtype': dtype, '__module__': 'torch.npu'})


FloatTensor = _legacy_type('FloatTensor', torch.float32)
HalfTensor = _legacy_type('HalfTensor', torch.float16)
BFloat16Tensor = _legacy_type('BFloat16Tensor', torch.bfloat16)
DoubleTensor = _legacy_type('DoubleTensor', torch.float64)
LongTensor = _legacy_type('LongTensor', torch.int64)
IntTensor = _legacy_type('IntTensor', torch.int32)
ShortTensor = _legacy_type('ShortTensor', torch.int16)
CharTensor = _legacy_type('CharTensor', torch.int8)
ByteTensor = _legacy_type('ByteTensor', torch.uint8)
BoolTensor = _legacy_type('BoolTensor', torch.bool)


def max_memory_allocated(device=None):
    return 0


def memory_allocated(device=None):
    return 0


def reset_peak_memory_stats(device=None):
    pass


def set_option(option):
    if not isinstance(option, dict):
        raise TypeError('npu option must be a dict.' + pta_error(ErrCode.PARAM))
    for name, value in option.items():
        if name == 'jitCompile' and os.environ.get('ACL_OP_INIT_MODE') == '2' \
                and _jit_disabled() != (value == 'disable'):
            # framework/interface/EnvVariables.cpp, the jitCompile option hook
            raise RuntimeError('Jit compile set is disabled! If you want to set, please change the '
                               'environment variable ACL_OP_INIT_MODE to 0 or 1.' + pta_error(ErrCode.NOT_SUPPORT))
        _core.STATE.options[name] = str(value)
        _core.LEDGER.add('option', f'{name}={value}')


def set_compile_mode(jit_compile=False):
    """npu_config.py: synchronise if initialised, then option jitCompile enable/disable."""
    if is_initialized():
        synchronize()
    set_option({'jitCompile': 'enable' if jit_compile else 'disable'})


def _jit_disabled():
    """CheckJitDisableInner (framework/interface/EnvVariables.cpp): the option when set, else
    disabled from the 910B1 on and enabled before it."""
    value = _core.STATE.options.get('jitCompile')
    if value in ('enable', 'disable'):
        return value == 'disable'
    return _core.STATE.soc >= _core.ASCEND910B1


def is_jit_compile_false():
    return _jit_disabled()


