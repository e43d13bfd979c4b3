"""Run torch_npu's own pure-Python files instead of this fake's re-implementations.

The modules below can be executed from a folder holding the files of the torch-npu wheel (the
folder into which `torch_npu/...` was extracted), under their upstream names, on top of this
fake's stubs for the compiled parts (torch_npu._core: device, copies, float status;
torch_npu.npu_change_data_ptr, get_npu_format, ...). `activate(root)` makes them the public
names (torch_npu.optim.NpuFusedSGD, torch_npu.npu.amp.GradScaler, torch_npu.utils.*combine*).
When FAKE_ASCEND_UPSTREAM names such a folder, `import torch_npu` activates it. tests/test_npu.py runs both variants.
"""
import importlib.util
import os
import sys

FILES = {
    'torch_npu.utils.combine_tensors': 'torch_npu/utils/combine_tensors.py',
    'torch_npu.optim.npu_fused_optim_base': 'torch_npu/optim/npu_fused_optim_base.py',
    'torch_npu.optim.npu_fused_sgd': 'torch_npu/optim/npu_fused_sgd.py',
    'torch_npu.npu.amp.common': 'torch_npu/npu/amp/common.py',
    'torch_npu.npu.amp.grad_scaler': 'torch_npu/npu/amp/grad_scaler.py',
}
# public name -> (module holding it, attribute)
PUBLIC = {
    ('torch_npu.utils', 'npu_combine_tensors'): ('torch_npu.utils.combine_tensors', 'npu_combine_tensors'),
    ('torch_npu.utils', 'get_part_combined_tensor'): ('torch_npu.utils.combine_tensors', 'get_part_combined_tensor'),
    ('torch_npu.utils', 'is_combined_tensor_valid'): ('torch_npu.utils.combine_tensors', 'is_combined_tensor_valid'),
    ('torch_npu.optim', 'NpuFusedOptimizerBase'): ('torch_npu.optim.npu_fused_optim_base', 'NpuFusedOptimizerBase'),
    ('torch_npu.optim', 'NpuFusedSGD'): ('torch_npu.optim.npu_fused_sgd', 'NpuFusedSGD'),
    ('torch_npu.npu.amp', 'GradScaler'): ('torch_npu.npu.amp.grad_scaler', 'GradScaler'),
}
_active = [None]


def root():
    """The folder of the upstream files in use, or None (the re-implementations)."""
    return _active[0]


def _load(name, folder):
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(folder, FILES[name])
    if not os.path.isfile(path):
        raise ImportError(f'{folder} has no {FILES[name]} (torch-npu wheel files)')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def activate(folder):
    """Use upstream's files from `folder` (loaded once; combine_tensors first, so that the
    optimizers bind to upstream's combining functions)."""
    _active[0] = folder
    _load('torch_npu.npu.amp.common', folder)  # grad_scaler.py imports it
    for (package, attribute), (name, source) in PUBLIC.items():
        setattr(sys.modules[package], attribute, getattr(_load(name, folder), source))

