"""The fake NPU device: real tensors on a PrivateUse1 device named 'npu', computed on the CPU.

How it is built, and why this way:

* PrivateUse1 is renamed 'npu' and registered as a Python backend
  (`torch.utils.backend_registration._setup_privateuseone_for_python_backend`, the API PyTorch's
  own test_privateuseone_python_backend.py uses), exactly as torch_npu renames PrivateUse1 and
  registers `torch_npu.npu` as the device module (torch_npu/_init/registry/backend.py). So
  `torch.device('npu', n)`, `Tensor.npu()`, `Tensor.is_npu`, `Module.npu()`, `torch.npu`,
  `torch.get_device_module('npu')` and `torch.autocast('npu')` are torch's own code paths.
* Every npu tensor is an `NpuTensor`: a wrapper subclass whose TensorImpl really is on the
  PrivateUse1 device (dispatch keys PrivateUse1, AutogradPrivateUse1, AutocastPrivateUse1), holding
  its values in a CPU tensor. The real dispatcher, autograd engine (with its per-device queue
  thread), autocast key, DDP reducer and optimizers run on it; only the kernels are CPU kernels,
  called from `__torch_dispatch__` and from a PrivateUse1 backend fallback (factories and copies
  that reach the backend key directly). A TorchDispatchMode would bypass the device type
  altogether (no autocast key, no device autograd queue, no DDP device path): less of the real
  path. A C++ PrivateUse1 extension (as PyTorch's open_registration_extension test) would need a
  compiler and a build in CI.
* Autocast: torch_npu registers its own AutocastPrivateUse1 kernels
  (torch_npu/csrc/aten/AutoCastOps.cpp: a fallthrough for every op, then lower_precision_fp /
  fp32 / promote lists). They are re-registered here from Python with the same lists.
* Limits of the Python backend (torch/csrc/acc/Module.cpp): its device guard reports one device
  and no streams or events, so every TensorImpl sits on C++ index 0 and `tensor.device` reports
  the index chosen with `torch.npu.set_device`: one NPU per process, as HCCL requires
  ("HCCL support one NPU per process only", torch_npu/csrc/distributed/ProcessGroupHCCL.cpp).
  Work is synchronous, so a missing host synchronisation cannot be caught; the transfers that
  torch_npu turns into stream synchronisations are recorded in `LEDGER` instead.
* Streams (torch_npu/npu/streams.py, utils.py: Stream, current_stream, stream(), wait_stream,
  Event) are emulated as ordering only: every kernel counts on the current stream, an event
  records how far a stream (and the streams it waited for) had got, and waiting for it carries
  that over. What the fake HCCL writes from its own stream is "pending" there until the stream
  touching it is ordered after it (or the host synchronised past it): any kernel touching
  pending memory from an unordered stream is refused as the race it would be on an NPU (see
  `check_pending`).
* Host memory: torch_npu's host allocator pins what `Tensor.pin_memory()` returns; a
  non_blocking copy from memory it did not allocate is turned into a stream synchronisation
  (torch_npu/csrc/core/npu/CachingHostAllocator.cpp, process_non_blocking_copy and
  process_unregistered_mem_location_type), and a blocking copy synchronises the stream first
  (torch_npu/csrc/aten/common/CopyKernel.cpp, copy_between_host_and_device). The Python hooks
  cannot provide a pinned allocator, so `Tensor.pin_memory` / `Tensor.is_pinned` are replaced by
  a registry of the host storages this fake "pinned".
* Before the 910B the NPU computes in saturation mode: an fp16 overflow gives +-65504, not inf,
  and raises the float-status flag that torch_npu reads (IsSupportInfNan in
  torch_npu/csrc/core/npu/NpuVariables.cpp; op-plugin
  op_plugin/ops/opapi/AmpForeachNonFiniteCheckAndUnscaleKernelNpuOpApi.cpp). With FAKE_NPU_SOC
  set to a 910A, fp16 results that overflow are saturated and raise the flag here too.
* Cube operators (convolution, matmul) take fp16/bf16 operands, accumulate in float32 and round
  the result: computed so here, which is closer to the NPU than the CPU's half kernels and many
  times faster.

Environment read at import: FAKE_NPU_SOC (default Ascend910B1), FAKE_NPU_DEVICES (default 8).
"""
import os
import sys
import sysconfig
import threading
import weakref

import torch
from torch.utils._pytree import tree_map
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

# SocVersion order of torch_npu/csrc/core/npu/NpuVariables.h (the values that matter here).
SOC_VERSIONS = {'Ascend910PremiumA': 100, 'Ascend910ProA': 101, 'Ascend910A': 102, 'Ascend910ProB': 103,
                'Ascend910B': 104, 'Ascend310P3': 202, 'Ascend910B1': 220, 'Ascend910B2': 221,
                'Ascend910B3': 223, 'Ascend910B4': 224, 'Ascend910_9391': 250, 'Ascend910_9392': 251}
ASCEND910B1 = 220
FP16_MAX = 65504.0
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_STDLIB = sysconfig.get_paths()['stdlib']
_HERE = os.path.abspath(__file__)


class _State:
    def __init__(self):
        soc = os.environ.get('FAKE_NPU_SOC', 'Ascend910B1')
        if soc not in SOC_VERSIONS:
            raise RuntimeError(f'Unsupported soc version: {soc}')  # NpuVariables.cpp SetSocVersion
        self.soc_name = soc
        self.soc = SOC_VERSIONS[soc]
        self.device_count = int(os.environ.get('FAKE_NPU_DEVICES', '8'))
        self.current = 0
        self.allocated = False
        self.float_status = False
        self.initialized = False
        self.options = {}  # torch_npu._C._npu_setOption's record
        self.stream = 0  # the current stream's id (0: the device's default stream)


STATE = _State()


def supports_inf_nan():
    """IsSupportInfNan (NpuVariables.cpp): inf/nan mode from the 910B1 on, saturation mode before."""
    return STATE.soc >= ASCEND910B1


class Ledger:
    """What the fake saw that a test may assert on: host synchronisations by cause, options set.

    `phase` is set by a test driver (e.g. 'step' around each training step) and stored with
    every event, so that a test can ask about steady-state steps only.
    """

    def __init__(self):
        self.events = []
        self.phase = None
        self._lock = threading.Lock()

    def add(self, kind, detail='', outside=None):
        """Record an event at its caller (the first frame outside `outside`, a folder, if given)."""
        where = _caller(outside)
        with self._lock:
            self.events.append({'kind': kind, 'detail': detail, 'where': where, 'phase': self.phase})

    def count(self, kind, phase=None):
        return sum(e['kind'] == kind and (phase is None or e['phase'] == phase) for e in self.events)

    def clear(self):
        with self._lock:
            self.events.clear()


LEDGER = Ledger()


def _caller(outside=None):
    """Where a transfer was asked for: the innermost frame outside torch, the standard library
    and this file, as a path relative to the repository ('utils/training/engine.py:80 to_device',
    'tests/fake_ascend/torch_npu/...'), or the absolute path of code from elsewhere (Ascend
    Apex's files, upstream's files run from the torch-npu wheel:
    '/.../ascend-apex/apex/amp/scaler.py:135 check_grads_overflow_with_inf')."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name == _HERE or name.startswith(_STDLIB) or 'site-packages' in name
                or (outside is not None and name.startswith(outside + os.sep))):
            where = os.path.relpath(name, _REPO) if name.startswith(_REPO + os.sep) else name
            return f'{where}:{frame.f_lineno} {frame.f_code.co_name}'
        frame = frame.f_back
    return '?'


# -- host memory --------------------------------------------------------------------------------

_PINNED = {}  # data_ptr of a host storage "allocated by torch_npu's host allocator" -> weakref
_original_pin_memory = torch.Tensor.pin_memory
_original_is_pinned = torch.Tensor.is_pinned


def _forget(ptr):
    _PINNED.pop(ptr, None)


def _pin_memory(self, device=None):
    if isinstance(self, NpuTensor) or self.device.type != 'cpu':
        # torch's own message for a tensor that is not on the host
        raise RuntimeError(f"cannot pin '{self.type()}' only dense CPU tensors can be pinned")
    if _is_pinned(self):
        return self
    out = torch.empty_strided(self.size(), self.stride(), dtype=self.dtype) if self.is_contiguous() \
        else torch.empty_like(self, memory_format=torch.contiguous_format)
    out.copy_(self)
    storage = out.untyped_storage()
    ptr = storage.data_ptr()
    _PINNED[ptr] = weakref.ref(storage)
    weakref.finalize(storage, _forget, ptr)
    return out


def _is_pinned(self, device=None):
    if isinstance(self, NpuTensor) or self.device.type != 'cpu':
        return False
    ref = _PINNED.get(self.untyped_storage().data_ptr())
    return ref is not None and ref() is not None


def host_transfer(kind, host, non_blocking):
    """Record what torch_npu does for a copy between `host` memory and the NPU."""
    if not non_blocking:
        LEDGER.add('sync', f'{kind} blocking copy')  # CopyKernel.cpp: synchronise, then aclrtMemcpy
        host_waits(current_stream().snapshot())
    elif not _is_pinned(host):
        LEDGER.add('sync', f'{kind} non_blocking copy from unpinned host memory')
        LEDGER.add('unpinned', kind)
        host_waits(current_stream().snapshot())
    else:
        LEDGER.add('async', kind)


# -- streams (ordering only) --------------------------------------------------------------------

class StreamState:
    """One stream: `queued` kernels so far, and `frontier`, how far each other stream had got
    when this one last waited for it (an event carries the waited stream's own frontier too)."""

    def __init__(self, sid):
        self.id = sid
        self.queued = 0
        self.frontier = {}

    def snapshot(self):
        """What an event recorded now on this stream waits for."""
        mark = dict(self.frontier)
        mark[self.id] = self.queued
        return mark

    def wait(self, mark):
        """aclrtStreamWaitEvent: later work on this stream runs after everything in `mark`."""
        for sid, count in mark.items():
            if sid != self.id and count > self.frontier.get(sid, 0):
                self.frontier[sid] = count

    def after(self, sid, count):
        """Whether work queued on this stream from now on runs after stream `sid`'s first `count`."""
        return sid == self.id or self.frontier.get(sid, 0) >= count or HOST.get(sid, 0) >= count


STREAMS = {0: StreamState(0)}
HOST = {}  # how far the host has synchronised each stream (everything it queues later runs after)
PENDING = []  # (storage ptr, first element, end element, stream id, count, what): written by another stream


def new_stream():
    state = StreamState(len(STREAMS))
    STREAMS[state.id] = state
    return state


def current_stream():
    return STREAMS[STATE.stream]


def host_waits(mark):
    """The host synchronised with `mark` (a stream or event synchronisation, a blocking copy)."""
    for sid, count in mark.items():
        if count > HOST.get(sid, 0):
            HOST[sid] = count
    PENDING[:] = [p for p in PENDING if HOST.get(p[3], 0) < p[4]]


def _extent(data):
    """(storage ptr, first element, end element) of the memory a CPU twin covers."""
    if data.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(data.size(), data.stride()) if size)
    start = data.storage_offset()
    return data.untyped_storage().data_ptr(), start, start + last + 1


def mark_pending(tensors, stream, what):
    """`stream` wrote `tensors` (its `queued` count so far): other streams must be ordered after it."""
    for t in tensors:
        extent = _extent(t._data)
        if extent is not None:
            PENDING.append((*extent, stream.id, stream.queued, what))


def check_pending(tensors, stream, doing):
    """Refuse `stream` touching memory another stream wrote without `stream` being ordered after
    that write: on an NPU the two would race (the fake runs everything at once and cannot)."""
    for t in tensors:
        extent = _extent(t._data)
        if extent is None:
            continue
        ptr, lo, hi = extent
        for p_ptr, p_lo, p_hi, sid, count, what in PENDING:
            if p_ptr == ptr and lo < p_hi and p_lo < hi and not stream.after(sid, count):
                race(f'fake torch_npu: {doing} on stream {stream.id} touches memory that {what} on stream {sid} '
                     'writes, with no wait_stream/wait_event ordering it after that write: a race on an NPU')


def race(message):
    """Refuse a race. Also printed: raised inside a gradient hook or a process group called from
    C++, the exception can reach the caller without its message (a SystemError, or an abort)."""
    print(message, file=sys.stderr, flush=True)
    raise RuntimeError(message)


# -- the device tensor --------------------------------------------------------------------------

_CXX_DEVICE = None  # torch.device('npu', 0), set by install() once 'npu' names PrivateUse1


class NpuTensor(torch.Tensor):
    """A tensor on the fake NPU; `_data` is its CPU twin (same shape, strides and values)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, data):
        # An empty tensor is usually an out= argument about to be resized (a composite kernel's
        # empty() then its out= variant): its sizes are read from its twin, which the resize changes.
        out = torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=data.dtype, layout=data.layout, device=_CXX_DEVICE, requires_grad=False,
            dispatch_sizes_strides_policy='sizes' if data.numel() == 0 else None)
        out._data = data
        out._storage_size = None
        STATE.allocated = True
        return out

    @property
    def device(self):
        return torch.device('npu', STATE.current)

    @property
    def data(self):
        return NpuTensor(self._data)

    @data.setter
    def data(self, new):
        # `param.data = x` (Module.half(), Apex's model cast) swaps the TensorImpl's metadata in
        # C++; the CPU twin must follow.
        torch._C.TensorBase.data.__set__(self, new)
        self._data = new._data
        self._storage_size = new._storage_size

    def data_ptr(self):
        return self._data.data_ptr()

    def tolist(self):
        LEDGER.add('sync', 'd2h tolist()')
        host_waits(current_stream().snapshot())
        return self._data.tolist()

    def storage(self):
        return _StorageView(self)

    def __repr__(self, *, tensor_contents=None):
        return f'{self._data!r} on npu:{STATE.current}'

    def __reduce_ex__(self, protocol):
        # torch_npu saves an NPU storage with its location; a load with map_location='cpu' (what
        # this repository does) gives the same CPU tensor as this.
        return self._data.__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types_, args=(), kwargs=None):
        return run(func, args, kwargs or {})


class _StorageView:
    """`tensor.storage()` as torch_npu's fused optimizers read it: its size in elements."""

    def __init__(self, tensor):
        self._tensor = tensor

    def size(self):
        return storage_size(self._tensor)

    def __len__(self):
        return self.size()


def storage_size(tensor):
    """Elements of the NPU allocation behind `tensor` (torch_npu.get_storage_size)."""
    if tensor._storage_size is not None:
        return tensor._storage_size
    return tensor._data.untyped_storage().nbytes() // tensor._data.element_size()


def repoint_storage(dst, src, offset):
    """What torch_npu's ChangeDataPtr.cpp and Ascend Apex's change_dataptr.cpp do after their
    checks: dst's storage now begins `offset` elements into src's storage (from its start, not
    from src's storage offset); dst keeps its sizes, strides, storage offset and storage size.
    A view that would run past src's memory fails here (on an NPU it would corrupt memory)."""
    dst_size = storage_size(dst)
    base = src._data.as_strided((storage_size(src),), (1,), 0)  # src's whole storage from its start
    dst._data = base.as_strided(dst.size(), dst.stride(), offset + dst.storage_offset())
    dst._storage_size = dst_size


def _unwrap(x):
    if isinstance(x, NpuTensor):
        return x._data
    if isinstance(x, torch.device) and x.type == 'npu':
        return torch.device('cpu')
    return x


def _is_device_arg(x):
    return isinstance(x, NpuTensor) or (isinstance(x, torch.device) and x.type == 'npu')


def _check_devices(func, args, kwargs):
    """The NPU refuses a host tensor (other than a 0-dim one) among a kernel's device operands,
    as every accelerator does ('Expected all tensors to be on the same device')."""
    tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    host = [t for t in tensors if not isinstance(t, NpuTensor) and t.device.type == 'cpu' and t.dim() > 0]
    if host and len(host) < len(tensors):
        raise RuntimeError(f'Expected all tensors to be on the same device, but found at least two devices, '
                           f'npu:{STATE.current} and cpu! (when checking arguments for {func})')


def _saturate(out):
    """Saturation mode (before the 910B): an fp16 overflow gives +-max and sets the float status."""
    if isinstance(out, torch.Tensor) and out.dtype == torch.float16 and out.numel():
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            STATE.float_status = True
            out.nan_to_num_(nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


# Cube-unit operators: fp16/bf16 operands, float32 accumulation, a result rounded to the operands'
# dtype (see the module's docstring).
_CUBE = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default,
         torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten.baddbmm.default}
_LOW = (torch.float16, torch.bfloat16)


def _cube(func, args, kwargs):
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    low = next((t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.dtype in _LOW), None)
    if low is None:
        return func(*args, **kwargs)
    up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOW else t  # noqa: E731
    down = lambda t: t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return tree_map(down, func(*tree_map(up, args), **tree_map(up, kwargs)))


def run(func, args, kwargs):
    """Run an aten op for NPU operands on their CPU twins and wrap the device results."""
    stream = STREAMS[STATE.stream]
    if PENDING:
        check_pending([a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, NpuTensor)],
                      stream, str(func))
    stream.queued += 1
    special = SPECIAL.get(func)
    if special is not None:
        return special(*args, **kwargs)
    on_device = any(_is_device_arg(a) for a in torch.utils._pytree.tree_leaves((args, kwargs)))
    if not on_device:
        raise NotImplementedError(f'fake torch_npu: {func} reached the NPU backend without an NPU operand')
    _check_devices(func, args, kwargs)
    originals = {id(a._data): a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(a, NpuTensor)}
    if func in _CUBE:
        out = _cube(func, tree_map(_unwrap, args), tree_map(_unwrap, kwargs))
    else:
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    saturate = not supports_inf_nan()

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if saturate:
            _saturate(x)
        same = originals.get(id(x))
        if same is not None:  # an in-place op or out= returns its argument itself
            return same
        return NpuTensor(x)

    return tree_map(wrap, out)


def _copy_(dst, src, non_blocking=False):
    if isinstance(dst, NpuTensor) and isinstance(src, NpuTensor):
        dst._data.copy_(src._data)
    elif isinstance(dst, NpuTensor):
        host_transfer('h2d', src, non_blocking)
        dst._data.copy_(src)
    else:
        host_transfer('d2h', dst, non_blocking)
        dst.copy_(src._data)
    return dst


def _copy_from(src, dst, non_blocking=False):
    _copy_(dst, src, non_blocking)
    return dst


def _copy_from_and_resize(src, dst):
    if dst.size() != src.size():
        raise NotImplementedError('fake torch_npu: _copy_from_and_resize to another size')
    return _copy_from(src, dst)


def _to_copy(x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    if device is not None and device.type == 'cpu' and isinstance(x, NpuTensor):
        out = torch.empty_like(x._data, dtype=dtype or x.dtype,
                               memory_format=memory_format or torch.preserve_format)
        if pin_memory:
            out = _pin_memory(out)
        return _copy_(out, x, non_blocking)
    kwargs = {'dtype': dtype, 'layout': layout, 'device': device, 'pin_memory': pin_memory,
              'non_blocking': non_blocking, 'memory_format': memory_format}
    if isinstance(x, NpuTensor):
        return NpuTensor(torch.ops.aten._to_copy.default(x._data, **{**kwargs, 'device': torch.device('cpu')}))
    return torch.ops.aten._to_copy.default(x, **kwargs)


def _local_scalar_dense(x):
    LEDGER.add('sync', 'd2h item()')
    host_waits(current_stream().snapshot())
    return x._data.item()


def _amp_foreach_non_finite_check_and_unscale_(scaled_grads, found_inf, inv_scale):
    """op-plugin op_plugin/ops/opapi/AmpForeachNonFiniteCheckAndUnscaleKernelNpuOpApi.cpp (the
    aclnn path of the 910B and later): inv_scale must be a 1-element float32 NPU tensor and found_inf
    a 1-element float32 tensor. In inf/nan mode aclnnForeachNonFiniteCheckAndUnscale runs on the
    device: found_inf = 1 if any gradient holds inf/nan, and every gradient is unscaled. In
    saturation mode the float-status flag is read on the host (a stream synchronisation) and reset;
    on overflow found_inf = 1 and nothing is unscaled."""
    if not isinstance(inv_scale, NpuTensor):
        raise RuntimeError('inv_scale must be NPU-Tensor')
    if inv_scale.numel() != 1:
        raise RuntimeError('inv_scale must be a 1-element tensor')
    if found_inf.numel() != 1:
        raise RuntimeError('found_inf must be a 1-element tensor')
    if inv_scale.dtype != torch.float32:
        raise RuntimeError('inv_scale must be a float tensor')
    if found_inf.dtype != torch.float32:
        raise RuntimeError('found_inf must be a float tensor')
    if not scaled_grads:
        return
    for grad in scaled_grads:
        if not isinstance(grad, NpuTensor):
            raise RuntimeError('one of scaled_grads was not a NPU tensor.')
        if grad.dtype != scaled_grads[0].dtype:
            raise RuntimeError('scaled_grads must have the same dtype.')
    if supports_inf_nan():
        if not all(bool(torch.isfinite(g._data).all()) for g in scaled_grads):
            found_inf._data.fill_(1.0)
        for grad in scaled_grads:
            grad._data.mul_(inv_scale._data)
        return
    LEDGER.add('sync', 'd2h float status')
    LEDGER.add('float_status', '_amp_foreach_non_finite_check_and_unscale_')
    overflow, STATE.float_status = STATE.float_status, False
    if overflow:
        found_inf._data.fill_(1.0)
        return
    for grad in scaled_grads:
        grad._data.mul_(inv_scale._data)


aten = torch.ops.aten
SPECIAL = {
    aten.copy_.default: _copy_,
    aten._copy_from.default: _copy_from,
    aten._copy_from_and_resize.default: _copy_from_and_resize,
    aten._to_copy.default: _to_copy,
    aten._local_scalar_dense.default: _local_scalar_dense,
    aten._amp_foreach_non_finite_check_and_unscale_.default: _amp_foreach_non_finite_check_and_unscale_,
}


def _backend_fallback(op, *args, **kwargs):
    """Ops that reach the PrivateUse1 key itself: factories (no tensor operand)."""
    return run(op, args, kwargs)


# Ops that reach the PrivateUse1 key with NPU tensor operands, the Python key being excluded
# (e.g. the copy inside torch.tensor(..., device='npu')). They get kernels of their own: torch
# 2.14's Python fallback cannot take tensor operands (python_op_registration_trampoline_impl
# looks for a per-op registration).
BACKEND_KERNELS = ['copy_', '_copy_from', '_copy_from_and_resize']


def _backend_kernel(op):
    def kernel(*args, **kwargs):
        return run(op, args, kwargs)
    return kernel


# -- autocast: torch_npu/csrc/aten/AutoCastOps.cpp ------------------------------------------------

LOWER_PRECISION_FP = [
    '_convolution.deprecated', '_convolution', 'conv1d', 'conv2d', 'conv3d', 'conv_tbc', 'conv_transpose1d',
    'conv_transpose2d.input', 'conv_transpose3d.input', 'convolution', 'cudnn_convolution',
    'cudnn_convolution_transpose', 'prelu', 'addmm', 'addmv', 'addr', 'matmul', 'einsum', 'mm', 'mv', 'linear',
    'addbmm', 'baddbmm', 'bmm', 'chain_matmul', 'linalg_multi_dot', '_thnn_fused_lstm_cell',
    '_thnn_fused_gru_cell', 'lstm_cell', 'gru_cell', 'rnn_tanh_cell', 'rnn_relu_cell',
    '_scaled_dot_product_flash_attention', 'scaled_dot_product_attention']
FP32 = [
    'acos', 'asin', 'cosh', 'erfinv', 'exp', 'expm1', 'log', 'log10', 'log2', 'log1p', 'reciprocal', 'rsqrt',
    'sinh', 'tan', 'pow.Tensor_Scalar', 'pow.Tensor_Tensor', 'pow.Scalar', 'softplus', 'layer_norm',
    'native_layer_norm', 'group_norm', 'frobenius_norm.dim', 'nuclear_norm', 'nuclear_norm.dim',
    'cosine_similarity', 'poisson_nll_loss', 'cosine_embedding_loss', 'nll_loss', 'nll_loss2d',
    'hinge_embedding_loss', 'kl_div', 'l1_loss', 'smooth_l1_loss', 'huber_loss', 'mse_loss',
    'margin_ranking_loss', 'multilabel_margin_loss', 'soft_margin_loss', 'triplet_margin_loss',
    'multi_margin_loss', 'binary_cross_entropy_with_logits', 'dist', 'pdist', 'cdist', 'renorm', 'logsumexp']
FP32_SET_OPT_DTYPE = ['prod', 'prod.dim_int', 'softmax.int', 'log_softmax.int', 'cumprod', 'cumsum',
                      'linalg_vector_norm', 'linalg_matrix_norm', 'linalg_matrix_norm.str_ord', 'sum',
                      'sum.dim_IntList']
FP32_APPEND_DTYPE = ['norm.Scalar', 'norm.ScalarOpt_dim']
PROMOTE = ['addcdiv', 'addcmul', 'atan2', 'bilinear', 'cross', 'dot', 'grid_sampler', 'index_put', 'tensordot',
           'scatter_add']


def _op(name):
    packet, _, overload = name.partition('.')
    return getattr(getattr(torch.ops.aten, packet), overload or 'default')


def _eligible(x):
    # at::autocast::is_autocast_eligible: floating point, on the autocast device, not double
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type == 'npu' \
        and x.dtype != torch.float64


def _autocast_kernel(op, policy):
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            if policy == 'lower':
                to = torch.get_autocast_dtype('npu')
            elif policy == 'promote':
                floats = [x.dtype for x in leaves if _eligible(x)]
                to = floats[0] if floats else None
                for dtype in floats[1:]:
                    to = torch.promote_types(to, dtype)
            elif policy in ('set_opt_dtype', 'append_dtype'):
                lower = any(_eligible(x) and x.dtype != torch.float32 for x in leaves)
                if lower and kwargs.get('dtype') is None and policy == 'set_opt_dtype':
                    return op(*args, **dict(kwargs, dtype=torch.float32))
                to = torch.float32 if lower else None
            else:
                to = torch.float32
            if to is not None:
                cast = lambda x: x.to(to) if _eligible(x) and x.dtype != to else x  # noqa: E731
                args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
            return op(*args, **kwargs)

    return kernel


# -- installation -------------------------------------------------------------------------------

class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self):
        return True

    def is_built(self):
        return True

    def has_primary_context(self, dev_id):
        return STATE.allocated


class _Guard(torch._C._acc.DeviceGuard):
    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1


_LIBRARIES = []


def install(device_module):
    """Register the 'npu' device with torch (once per process, like `import torch_npu`)."""
    global _CXX_DEVICE
    if _LIBRARIES:
        return
    _setup_privateuseone_for_python_backend('npu', backend_module=device_module, hook=_Hooks(),
                                            device_guard=_Guard())
    _CXX_DEVICE = torch.device('npu', 0)
    torch.Tensor.pin_memory = _pin_memory
    torch.Tensor.is_pinned = _is_pinned
    backend = torch.library.Library('_', 'IMPL')
    backend.fallback(_backend_fallback, 'PrivateUse1')
    device_kernels = torch.library.Library('aten', 'IMPL')
    for name in BACKEND_KERNELS:
        device_kernels.impl(name, _backend_kernel(_op(name)), 'PrivateUse1')
    autocast = torch.library.Library('_', 'IMPL')
    autocast.fallback(torch.library.fallthrough_kernel, 'AutocastPrivateUse1')
    kernels = torch.library.Library('aten', 'IMPL')
    for names, policy in ((LOWER_PRECISION_FP, 'lower'), (FP32, 'fp32'), (FP32_SET_OPT_DTYPE, 'set_opt_dtype'),
                          (FP32_APPEND_DTYPE, 'append_dtype'), (PROMOTE, 'promote')):
        for name in names:
            kernels.impl(name, _autocast_kernel(_op(name), policy), 'AutocastPrivateUse1')
    _LIBRARIES.extend([backend, device_kernels, autocast, kernels])


def wrap_cpu(tensor):
    """A CPU tensor's values as a new NPU tensor (for the stubs of compiled torch_npu parts)."""
    return NpuTensor(tensor)


