"""Test-only stand-in for Ascend Apex's compiled extension `change_data_ptr`
(Ascend/apex src/csrc/combine_tensors/change_dataptr.cpp, master 49a7994e, the commit
../shared/ascend-apex was built from), which apex/contrib/combine_tensors/combine_tensors.py
imports. It is the one part of Ascend Apex that is C++; everything else runs from upstream.

change_data_ptr(dst, src, offset): dst's storage now begins `offset` elements into src's
storage. Its checks, in its order (std::runtime_error, a RuntimeError in Python):
* offset < 0: "Expect offset equal or greater than zero, got: <offset>";
* dtypes differ, or are not float16/float32: "Expect src and dst tensors having the same dtype
  in float16 or float32.";
* dst.numel() * dst.element_size() + offset > src.numel() * src.element_size(): "Offsets
  overflow in change_data_ptr." (upstream adds an element offset to a byte count: the check is
  looser than the memory it guards; a view that still runs past src's memory fails in the fake
  torch_npu's re-pointing, where an NPU would corrupt memory).
The re-pointing itself is the fake torch_npu's (`_core.repoint_storage`).
"""
import torch

from torch_npu import _core


def change_data_ptr(dst, src, offset):
    if offset < 0:
        raise RuntimeError(f'Expect offset equal or greater than zero, got: {offset}')
    if src.dtype != dst.dtype or src.dtype not in (torch.float16, torch.float32):
        raise RuntimeError('Expect src and dst tensors having the same dtype in float16 or float32.')
    if dst.numel() * dst.element_size() + offset > src.numel() * src.element_size():
        raise RuntimeError('Offsets overflow in change_data_ptr.')
    _core.repoint_storage(dst, src, offset)
