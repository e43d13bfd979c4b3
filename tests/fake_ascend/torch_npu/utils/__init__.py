"""Fake torch_npu.utils: tensor combining (torch_npu/utils/combine_tensors.py, re-implemented
in _combine_tensors.py; torch_npu._upstream can substitute upstream's file)."""
from . import _error_code  # noqa: F401
from ._combine_tensors import get_part_combined_tensor, is_combined_tensor_valid, npu_combine_tensors  # noqa: F401
