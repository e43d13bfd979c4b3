"""Re-implementation of torch_npu/utils/combine_tensors.py (behaviour, refusals, order).

npu_combine_tensors(tensors, require_copy_value=True): one zero-filled NPU buffer of the
tensors' total storage size; every tensor's storage is re-pointed into it, in order
(torch_npu.npu_change_data_ptr), keeping its values when require_copy_value. Refused: a None
in the list, mixed dtypes, a tensor not on the NPU, and (as upstream from 2.7.1; earlier
versions accept it) a non-contiguous tensor: stricter, never more lenient. None for an empty
list or a total size of 0.
"""
import torch

import torch_npu
from torch_npu.utils._error_code import ErrCode, pta_error


def npu_combine_tensors(list_of_tensor, require_copy_value=True):
    if not list_of_tensor:
        return None
    if any(t is None for t in list_of_tensor):
        raise RuntimeError('Tensors to combine must not have `None`.' + pta_error(ErrCode.PARAM))
    dtype = list_of_tensor[0].dtype
    sizes = []
    for t in list_of_tensor:
        if t.dtype != dtype:
            raise RuntimeError('Tensors to combine must have the same dtype.' + pta_error(ErrCode.TYPE))
        if t.device.type != 'npu':
            raise RuntimeError(f'Tensors to combine must be on NPU, got {t.device.type}.' + pta_error(ErrCode.VALUE))
        if not t.is_contiguous():
            raise RuntimeError('Tensors to combine must be contiguous.' + pta_error(ErrCode.VALUE))
        sizes.append(torch_npu.get_storage_size(t))
    if sum(sizes) == 0:
        return None
    combined = torch.zeros(sum(sizes), dtype=dtype).npu()
    offset = 0
    for t, size in zip(list_of_tensor, sizes):
        kept = t.clone() if require_copy_value else None
        torch_npu.npu_change_data_ptr(t, combined, offset)
        if kept is not None:
            t.copy_(kept)
        offset += size
    return combined


def get_part_combined_tensor(combined_tensor, index, size):
    if combined_tensor is None or size == 0:
        return None
    total = torch_npu.get_storage_size(combined_tensor)
    if index + size > total:
        raise RuntimeError(f'(index + size) ({index + size}) > torch_npu.get_storage_size(combined_tensor) '
                           f'({total})' + pta_error(ErrCode.VALUE))
    part = torch.zeros(size, dtype=combined_tensor.dtype).npu()
    torch_npu.npu_change_data_ptr(part, combined_tensor, index)
    return part


def is_combined_tensor_valid(combined_tensor, list_of_tensor):
    if not list_of_tensor:
        return True
    if combined_tensor is None:
        return False
    start = combined_tensor.data_ptr()
    end = start + torch_npu.get_storage_size(combined_tensor) * combined_tensor.element_size()
    return all(t is not None and start <= t.data_ptr() < end and t.is_contiguous() for t in list_of_tensor)
