"""Fake torch_npu.npu.amp: GradScaler re-implemented in _grad_scaler.py (torch_npu/npu/amp/
grad_scaler.py); torch_npu._upstream can substitute upstream's file."""
from ._grad_scaler import GradScaler  # noqa: F401
