"""Test-only fake of Ascend Apex (github.com/Ascend/apex: NVIDIA apex + patch/npu.patch + src/).

The `apex` package on PyPI is an unrelated project; Ascend's installs from source
(scripts/build.sh). Only apex.amp (O2), apex.optimizers.NpuFusedSGD and
apex.contrib.combine_tensors are emulated. Importing it needs torch_npu, as the real one does
(patched amp/handle.py, scaler.py and _process_optimizer.py import torch_npu).
"""
import torch_npu  # noqa: F401

from . import amp, contrib, optimizers  # noqa: F401
