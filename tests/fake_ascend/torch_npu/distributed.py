"""Fake HCCL: the 'hccl' process-group backend, carried by Gloo on the NPU tensors' CPU twins.

Registered as torch_npu registers it (torch_npu/_init/registry/distributed.py:
Backend.register_backend('hccl', ..., extended_api=True, devices=['npu'])). Like
ProcessGroupHCCL (torch_npu/csrc/distributed/ProcessGroupHCCL.cpp, check_npu_tensors_*) it
refuses tensors that are not dense NPU tensors, a list of more than one tensor per call (one
NPU per process), mixed dtypes, sizes and non-contiguous tensors. Each collective runs on a
Gloo group in place on the tensors' CPU twins and completes before it returns.
"""
import datetime

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

from . import _core
from .utils._error_code import ErrCode
from .utils._error_code import dist_error as _dist_error


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
        if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
            raise RuntimeError('Tensors must be contiguous' + _dist_error(ErrCode.TYPE))
    return [t._data for t in tensors]


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

    def getBackendName(self):
        return 'hccl'

    def allreduce(self, tensors, opts=None):
        host = _check(tensors)
        options = dist.AllreduceOptions()
        if opts is not None:
            options.reduceOp = opts.reduceOp
        self._gloo.allreduce(host, options).wait()
        return _done(tensors)

    def broadcast(self, tensors, opts=None):
        host = _check(tensors)
        options = dist.BroadcastOptions()
        if opts is not None:
            options.rootRank, options.rootTensor = opts.rootRank, opts.rootTensor
        self._gloo.broadcast(host, options).wait()
        return _done(tensors)

    def allgather(self, output_tensors, input_tensors, opts=None):
        host_in = _check(input_tensors)
        host_out = [_check(outputs, one_per_process=False) for outputs in output_tensors]
        self._gloo.allgather(host_out, host_in).wait()
        return _done(output_tensors)

    def _allgather_base(self, output, input_, opts=None):
        host_out, host_in = _check([output])[0], _check([input_])[0]
        self._gloo._allgather_base(host_out, host_in).wait()
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
