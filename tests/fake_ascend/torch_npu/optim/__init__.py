"""Fake torch_npu.optim: NpuFusedSGD re-implemented in _fused_sgd.py (torch_npu/optim/
npu_fused_optim_base.py, npu_fused_sgd.py); torch_npu._upstream can substitute upstream's files."""
from ._fused_sgd import NpuFusedOptimizerBase, NpuFusedSGD  # noqa: F401
