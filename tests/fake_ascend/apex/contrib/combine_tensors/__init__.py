"""Re-implementation of Ascend Apex src/apex/contrib/combine_tensors/combine_tensors.py.

Unlike torch_npu's npu_combine_tensors, every tensor takes an aligned slot of
ceil(numel / 16) * 16 + 32 elements (get_aligned_storage_size), and only float32 and float16
are accepted. The storage re-pointing is Apex's C++ change_data_ptr (which checks nothing),
done here with the fake torch_npu.npu_change_data_ptr, which also refuses mixed dtypes and
out-of-range offsets: stricter than Apex, never more lenient.
"""
import math

import torch

import torch_npu


def get_aligned_storage_size(tensor, align=16, pad=32):
    if tensor.dtype not in (torch.float32, torch.float16):
        raise RuntimeError('Fused optimizers only support weights and grads with dtype torch.float or torch.float16.')
    return math.ceil(torch_npu.get_storage_size(tensor) / align) * align + pad


def combine_npu(list_of_tensor, require_copy_value=True):
    slots = [get_aligned_storage_size(t) for t in list_of_tensor]
    if sum(slots) == 0:
        return None
    combined = torch.zeros(sum(slots), dtype=list_of_tensor[0].dtype).npu()
    offset = 0
    for tensor, slot in zip(list_of_tensor, slots):
        kept = tensor.clone() if require_copy_value else None
        torch_npu.npu_change_data_ptr(tensor, combined, offset)
        if kept is not None:
            tensor.copy_(kept)
        offset += slot
    return combined


def get_part_combined_tensor(combined_tensor, index, size):
    if combined_tensor is None or size == 0:
        return None
    total = torch_npu.get_storage_size(combined_tensor)
    if index + size > total:
        raise RuntimeError(f'(index + size) ({index + size}) > torch_npu.get_storage_size(combined_tensor) ({total})')
    part = torch.zeros(size, dtype=combined_tensor.dtype).npu()
    torch_npu.npu_change_data_ptr(part, combined_tensor, index)
    return part
