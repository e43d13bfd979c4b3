"""Fake HCCL: the 'hccl' process-group backend, carried by Gloo on the NPU tensors' CPU twins.

Registered as torch_npu registers it (torch_npu/_init/registry/distributed.py:
Backend.register_backend('hccl', ..., extended_api=True, devices=['npu'])). It follows
ProcessGroupHCCL (torch_npu/csrc/distributed/ProcessGroupHCCL.cpp, HCCLUtils.cpp):
* check_npu_tensors_different_devices: dense NPU tensors only, one per call (one NPU per
  process), identical dtype, size and strides, contiguous;
* data types: a dtype HCCL has no type for is refused ("Unsupported data type for HCCL process
  group", getHcclDataType); allreduce and reduce also refuse the types checkSupportedDataType
  leaves out: float64 and the unsigned 16/32/64-bit integers (only the Ascend950 takes uint64
  and float64, not one of the fake's SoCs). allreduce casts bool and uint8 to int32 first (its
  pre-processing), so those pass, a bool SUM becoming a MAX; AVG is a SUM then a division;
  BAND/BOR/BXOR are refused (getHcclReduceOp);
* allgather with outputs of one size: each output takes one rank's input, reshaped; every
  output must have the input's number of elements (flatten_for_scatter_gather);
* streams (syncStreams, WorkHCCL::synchronizeStreams): each group has its own HCCL stream,
  which first waits for the caller's current stream; what the collective writes is then
  pending on the HCCL stream (torch_npu._core.PENDING) and the caller's current stream waits
  for it, as the work's wait() does. The fake takes that wait at once: torch.distributed's
  synchronous calls make it straight away on the same stream; an async_op caller that waited
  later on another stream is not modelled. Stricter than the hardware: a collective issued
  from a stream other than the default one must follow all work queued so far on the other
  streams (the fake does not track which kernel wrote which tensor), as Apex's combine_ddp
  does with wait_stream before each of its all-reduces.
Each collective then runs on a Gloo group, in place on the tensors' CPU twins, and has completed
when it returns.
"""
import datetime
import os

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

from . import _core
from .utils._error_code import ErrCode
from .utils._error_code import dist_error as _dist_error

# HCCLUtils.cpp kScalarTypeToHcclDataType (the dtypes HCCL has a type for) and the names its
# error messages give them (kHcclDataTypeToStringMap).
HCCL_TYPES = {torch.uint8: 'at::kByte/at::kBool', torch.int8: 'at::kChar', torch.int16: 'at::kShort',
              torch.int32: 'at::kInt', torch.int64: 'at::kLong', torch.float16: 'at::kHalf',
              torch.float32: 'at::kFloat', torch.uint16: 'at::ScalarType::UInt16',
              torch.uint32: 'at::ScalarType::UInt32', torch.uint64: 'at::ScalarType::UInt64',
              torch.float64: 'at::kDouble', torch.bool: 'at::kByte/at::kBool', torch.bfloat16: 'at::kBFloat16',
              torch.float8_e4m3fn: 'at::ScalarType::Float8_e4m3fn', torch.float8_e5m2: 'at::ScalarType::Float8_e5m2'}
# ProcessGroupHCCL.cpp checkSupportedDataType (reductions)
REDUCIBLE = {torch.int8, torch.int16, torch.int32, torch.float16, torch.float32, torch.bfloat16, torch.int64}
UNSUPPORTED_OPS = {dist.ReduceOp.RedOpType.BAND: 'BAND', dist.ReduceOp.RedOpType.BOR: 'BOR',
                   dist.ReduceOp.RedOpType.BXOR: 'BXOR'}


def _check(tensors, one_per_process=True):
    if not tensors:
        raise RuntimeError('Tensor list must be nonempty' + _dist_error(ErrCode.PARAM))
    if one_per_process and len(tensors) != 1:
        raise RuntimeError("Tensor list mustn't be larger than the number of available NPUs" + _dist_error(ErrCode.VALUE))
    first = tensors[0]
    for t in tensors:
        if not isinstance(t, _core.NpuTensor) or t.is_sparse:
            raise RuntimeError('Tensors must be NPU and dense' + _dist_error(ErrCode.TYPE))
        if t.dtype != first.dtype:
            raise RuntimeError('Tensors must have identical type' + _dist_error(ErrCode.TYPE))
        if one_per_process and t.size() != first.size():
            raise RuntimeError('Tensors must have identical size' + _dist_error(ErrCode.TYPE))
        if one_per_process and t.stride() != first.stride():
            raise RuntimeError('Tensors must have identical strides' + _dist_error(ErrCode.TYPE))
        if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
            raise RuntimeError('Tensors must be contiguous' + _dist_error(ErrCode.TYPE))
    return [t._data for t in tensors]


def _hccl_type(dtype, function=None):
    """getHcclDataType, and for a reduction (function given) checkSupportedDataType."""
    if dtype not in HCCL_TYPES:
        raise RuntimeError('Unsupported data type for HCCL process group' + _dist_error(ErrCode.NOT_SUPPORT))
    if function is not None and dtype not in REDUCIBLE:
        raise RuntimeError(f'HCCL {function}: Unsupported data type {HCCL_TYPES[dtype]}'
                           + _dist_error(ErrCode.NOT_SUPPORT))


def _reduce_op(op, dtype):
    """getHcclReduceOp: the reduction Gloo runs for `op` on `dtype` (AVG: a SUM, divided after)."""
    kind = getattr(op, 'op', op)  # a ReduceOp or its RedOpType
    if kind == dist.ReduceOp.RedOpType.AVG:
        return dist.ReduceOp.SUM
    if kind in UNSUPPORTED_OPS:
        raise RuntimeError(f'Cannot use ReduceOp.{UNSUPPORTED_OPS[kind]} with HCCL' + _dist_error(ErrCode.NOT_SUPPORT))
    if kind == dist.ReduceOp.RedOpType.SUM and dtype == torch.bool:
        return dist.ReduceOp.MAX
    return op


def _done(result):
    future = torch.futures.Future()
    future.set_result(result)
    return _create_work_from_future(future)


class ProcessGroupHCCL(dist.ProcessGroup):
    created = 0  # groups made by this process: every process makes them in the same order

    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        ProcessGroupHCCL.created += 1
        prefix = f'fake_hccl/{ProcessGroupHCCL.created}/'  # a group made after another was destroyed
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, timeout)
        self._stream = None  # this group's HCCL stream, made at its first collective

    def getBackendName(self):
        return 'hccl'

    def _collective(self, name, tensors, run):
        """Order, refuse races, run and record one collective on this group's HCCL stream."""
        caller = _core.current_stream()
        if self._stream is None:
            self._stream = _core.new_stream()
        hccl = self._stream
        hccl.wait(caller.snapshot())  # syncStreams
        if caller.id != 0:
            for state in _core.STREAMS.values():
                if state is not caller and state is not hccl and not caller.after(state.id, state.queued):
                    _core.race(f'fake HCCL: {name} issued on stream {caller.id} while work queued on stream '
                               f'{state.id} is not ordered before it (no wait_stream/wait_event): its input may '
                               'not be written yet on an NPU')
        _core.check_pending(tensors, hccl, f'HCCL {name}')
        hccl.queued += 1
        run()
        _core.mark_pending(tensors, hccl, f'HCCL {name}')
        caller.wait(hccl.snapshot())  # the work's wait(): the caller's stream waits for the HCCL stream
        _core.LEDGER.add('hccl', f'{name} on stream {caller.id}', outside=os.path.dirname(os.path.abspath(__file__)))

    def allreduce(self, tensors, opts=None):
        _check(tensors)
        tensor = tensors[0]
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        gloo_op = _reduce_op(op, tensor.dtype)
        cast = tensor.dtype in (torch.bool, torch.uint8)  # pre-processing: _npu_dtype_cast to int32
        work = tensor._data.to(torch.int32) if cast else tensor._data
        _hccl_type(work.dtype, 'allreduce')

        def run():
            options = dist.AllreduceOptions()
            options.reduceOp = gloo_op
            self._gloo.allreduce([work], options).wait()
            if getattr(op, 'op', op) == dist.ReduceOp.RedOpType.AVG:
                work.div_(self.size())
            if cast:
                tensor._data.copy_(work)
        self._collective('allreduce', [tensor], run)
        return _done(tensors)

    def broadcast(self, tensors, opts=None):
        _check(tensors)
        _hccl_type(tensors[0].dtype)

        def run():
            options = dist.BroadcastOptions()
            if opts is not None:
                options.rootRank, options.rootTensor = opts.rootRank, opts.rootTensor
            self._gloo.broadcast([tensors[0]._data], options).wait()
        self._collective('broadcast', tensors, run)
        return _done(tensors)

    def allgather(self, output_tensors, input_tensors, opts=None):
        outputs = output_tensors[-1]
        _check(outputs, one_per_process=False)
        _check(input_tensors)
        tensor = input_tensors[0]
        _hccl_type(tensor.dtype)
        if len(outputs) != self.size():
            raise RuntimeError('Tensor list input to scatter/gather must match number of collective participants'
                               + _dist_error(ErrCode.PARAM))
        if any(o.numel() != tensor.numel() for o in outputs):
            raise RuntimeError('All tensor operands to scatter/gather must have the same size'
                               + _dist_error(ErrCode.PARAM))

        def run():
            flat = [o._data.view(-1) for o in outputs]
            self._gloo.allgather([flat], [tensor._data.reshape(-1)]).wait()
        self._collective('allgather', [tensor, *outputs], run)
        return _done(output_tensors)

    def _allgather_base(self, output, input_, opts=None):
        _check([output])
        _check([input_])
        _hccl_type(input_.dtype)

        def run():
            self._gloo._allgather_base(output._data, input_._data).wait()
        self._collective('_allgather_base', [input_, output], run)
        return _done([output])

    def barrier(self, opts=None):
        # ProcessGroupHCCL::barrier runs an allreduce on a tensor of the current NPU
        flag = torch.zeros(1).to(torch.device('npu', _core.STATE.current))
        return self.allreduce([flag])


def _create(dist_backend_opts, pg_options):
    timeout = getattr(dist_backend_opts, 'timeout', None) or datetime.timedelta(minutes=30)
    return ProcessGroupHCCL(dist_backend_opts.store, dist_backend_opts.group_rank, dist_backend_opts.group_size,
                            timeout)


if 'hccl' not in dist.Backend.backend_list:
    dist.Backend.register_backend('hccl', _create, extended_api=True, devices=['npu'])
