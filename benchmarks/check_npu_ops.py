"""Which aten operators an S3FD training step dispatches on an Ascend NPU, and whether torch_npu
has an NPU kernel for each of them (an operator without one falls back to the CPU, with a copy
of its tensors to the host and back, every step).

    python benchmarks/check_npu_ops.py > ops.json                       # record them
    python benchmarks/check_npu_ops.py --recorded ops.json --torch 2.5 --yaml op_plugin_functions.yaml \
        --native npu_native_functions.yaml                        # check them for one torch_npu
    ... --label 'torch_npu 2.5.1' --source '<files>' --update benchmarks/npu_ops.json   # the committed list

No NPU is needed. The step runs on the CPU against an emulated device called 'npu': PyTorch's
PrivateUse1 backend renamed and served from Python, every operator running on the CPU
underneath (so it renames PrivateUse1 for the rest of the process: run it as a process of its
own). The code takes its accelerator branches (device.type not 'cpu'), tensors that stay on the
host in training stay there and are left out, and the dispatcher decides as under torch_npu,
short of torch_npu's own kernels:
  - CompositeImplicitAutograd operators decompose above the backend, as on the NPU unless
    torch_npu registers them itself (then the NPU runs fewer, larger operators);
  - an operator whose PrivateUse1 slot holds a CompositeExplicitAutograd(NonFunctional) kernel
    runs that composite on an NPU without a kernel of its own for it: it is recorded with the
    operators the composite calls, and it is fine if torch_npu registers it or all of those;
  - any other operator needs an NPU kernel: op-plugin's op_plugin_functions.yaml (acl_op,
    op_api; entries per torch version), or torch_npu's own npu_native_functions.yaml (views,
    copies, allocation); without one, torch_npu's PrivateUse1 fallback runs it on the CPU;
  - autocast on the NPU follows torch_npu's policy (AutoCastOps.cpp), reproduced here, so the
    casts and dtypes are those of the NPU.
An operator with a kernel can still copy to the host for some arguments: KNOWN_HOST_COPIES holds
the cases found in op-plugin's sources among the operators this step uses.

Configurations on this emulated NPU (the network, the loss, the backward): fp32; autocast fp16;
autocast bf16; a half-precision network without autocast (Ascend Apex O2's forward). Each runs
the step with both scale-compensation modes of the matcher and a batch without faces.
Configurations whose loss scaling and optimizer are the libraries' own code, as a real NPU run
steps (recorded in a child process on the test suite's fake torch_npu, tests/fake_ascend, which
holds real tensors on a Python-served 'npu' device, through utils.device as train.py calls it,
two steps each: the second has momentum buffers):
  apex         Ascend Apex O2 + combine_grad at the static scale 32 + apex.optimizers.NpuFusedSGD,
               Ascend Apex's own Python files from --apex (default ../shared/ascend-apex; without
               them this configuration is skipped and the output says so);
  native_fp16  torch.autocast fp16 + torch_npu's GradScaler + torch_npu.optim.NpuFusedSGD, torch_npu's
               own files from --torch_npu_files (a folder holding the torch-npu wheel's
               torch_npu/..., e.g. unzipped), else the fake's re-implementations of them.

Prints one JSON object: per operator its phases, calls, input dtypes, string arguments, the
composite kernel it runs without an NPU kernel of its own and what that calls; the losses, and
first_loss_rel_diff, the first fp32 loss on the emulated NPU against the CPU's (the accelerator
code paths must train on the same loss). With --yaml: each operator's status for that version
('npu' with where its kernel comes from, 'composite', 'host_copy' or 'missing', and whether the
NPU reaches it) and `missing`, the outermost operators that run on the CPU; exit status 1 then.
"""
import argparse
import collections
import contextlib
import copy
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EMULATED_CONFIGS = ('fp32', 'fp16', 'bf16', 'half')
UPSTREAM_CONFIGS = ('apex', 'native_fp16')  # recorded on the fake torch_npu (tests/fake_ascend)
CONFIGS = EMULATED_CONFIGS + UPSTREAM_CONFIGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_ASCEND = os.path.join(REPO, 'tests', 'fake_ascend')
DEFAULT_APEX = os.path.join(os.path.dirname(REPO), 'shared', 'ascend-apex')
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--configs', default=','.join(CONFIGS), help=f'comma-separated, of {CONFIGS}')
    p.add_argument('--batch_size', default=2, type=int)
    p.add_argument('--input_size', default=[64, 64], type=int, nargs=2, metavar=('H', 'W'),
                   help='the operators do not depend on it (32x32, 64x64 and 160x224 record the same ones)')
    p.add_argument('--steps', type=int, help='steps per configuration (default: 2 in fp32, 1 in the others)')
    p.add_argument('--yaml', help="op-plugin's op_plugin_functions.yaml to check against")
    p.add_argument('--torch', help='the torch version of the torch_npu checked (e.g. 2.5): picks the yaml entries')
    p.add_argument('--native', help="torch_npu's torch_npu/csrc/aten/npu_native_functions.yaml (views, copies, "
                                    'allocation); without it those operators count as missing')
    p.add_argument('--label', help='name of the torch_npu version checked (the column of --update)')
    p.add_argument('--source', default='', help='where the yaml files came from (recorded by --update)')
    p.add_argument('--update', help='committed list (JSON) to add this version\'s column to')
    p.add_argument('--per_config', action='store_true', help='also print each configuration\'s operators')
    p.add_argument('--recorded', help='check the operators of an earlier run\'s output (its JSON) instead of '
                                      'recording them again')
    p.add_argument('--apex', default=DEFAULT_APEX,
                   help="Ascend Apex's Python files (the folder holding apex/) for the apex configuration")
    p.add_argument('--torch_npu_files', default=None, metavar='DIR',
                   help="torch_npu's own Python files (a folder holding the torch-npu wheel's torch_npu/...) for "
                        'native_fp16; default: the fake torch_npu\'s re-implementations')
    p.add_argument('--upstream_child', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.yaml and not args.torch:
        p.error('--yaml needs --torch')
    if args.update and not (args.yaml and args.label):
        p.error('--update needs --yaml and --label')
    return args


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DEVICE_TYPE = 'npu'
PHASES = ('to_device', 'forward', 'loss', 'finite_check', 'backward', 'grad_scaler', 'optimizer')

# torch_npu's autocast policy (torch_npu/csrc/aten/AutoCastOps.cpp; torch_npu 2.1 to 2.15 differ
# only in Dimname overloads), by overload name. Not reproduced: fp32_append_dtype (aten::norm),
# which this step does not call.
AUTOCAST_LOWER = ['_convolution.deprecated', '_convolution', 'conv1d', 'conv2d', 'conv3d', 'conv_tbc',
                  'conv_transpose1d', 'conv_transpose2d.input', 'conv_transpose3d.input', 'convolution',
                  'cudnn_convolution', 'cudnn_convolution_transpose', 'prelu', 'addmm', 'addmv', 'addr',
                  'matmul', 'einsum', 'mm', 'mv', 'linear', 'addbmm', 'baddbmm', 'bmm', 'chain_matmul',
                  'linalg_multi_dot', '_thnn_fused_lstm_cell', '_thnn_fused_gru_cell', 'lstm_cell', 'gru_cell',
                  'rnn_tanh_cell', 'rnn_relu_cell', '_scaled_dot_product_flash_attention',
                  'scaled_dot_product_attention']
AUTOCAST_FP32 = ['acos', 'asin', 'cosh', 'erfinv', 'exp', 'expm1', 'log', 'log10', 'log2', 'log1p',
                 'reciprocal', 'rsqrt', 'sinh', 'tan', 'pow.Tensor_Scalar', 'pow.Tensor_Tensor', 'pow.Scalar',
                 'softplus', 'layer_norm', 'native_layer_norm', 'group_norm', 'frobenius_norm.dim',
                 'nuclear_norm', 'nuclear_norm.dim', 'cosine_similarity', 'poisson_nll_loss',
                 'cosine_embedding_loss', 'nll_loss', 'nll_loss2d', 'hinge_embedding_loss', 'kl_div', 'l1_loss',
                 'smooth_l1_loss', 'huber_loss', 'mse_loss', 'margin_ranking_loss', 'multilabel_margin_loss',
                 'soft_margin_loss', 'triplet_margin_loss', 'multi_margin_loss',
                 'binary_cross_entropy_with_logits', 'dist', 'pdist', 'cdist', 'renorm', 'logsumexp']
AUTOCAST_FP32_SET_OPT_DTYPE = ['prod', 'prod.dim_int', 'softmax.int', 'log_softmax.int', 'cumprod', 'cumsum',
                               'linalg_vector_norm', 'linalg_matrix_norm', 'linalg_matrix_norm.str_ord',
                               'sum', 'sum.dim_IntList']
AUTOCAST_PROMOTE = ['addcdiv', 'addcmul', 'atan2', 'bilinear', 'cross', 'dot', 'grid_sampler', 'index_put',
                    'tensordot', 'scatter_add']

# Composites run as one operator here: they only make a new tensor object over the same
# storage (no storage behind the emulated tensors to do that with), and need no kernel on the NPU.
METADATA_COMPOSITES = {'aten::alias', 'aten::detach', 'aten::lift_fresh', 'aten::_unsafe_view'}
# Composites run as one operator here that need a kernel on the NPU all the same: copy_'s
# composite calls _copy_from, the backend's copy between devices; torch_npu registers copy_.
OPAQUE_COMPOSITES = {'aten::copy_'}

# Operators with an NPU kernel that copies to the host for some arguments, from op-plugin's
# sources: name -> (predicate over one call's (dtypes, string args), why).
KNOWN_HOST_COPIES = {
    # op_plugin/ops/opapi/ScatterReduceKernelNpuOpApi.cpp (op-plugin master, torch_npu 2.13-2.15):
    # only include_self sum/add on float32 (and SoC below Ascend950) runs aclnnScatterReduce;
    # every other case calls at::scatter_reduce on .cpu() copies.
    'aten::scatter_reduce_.two': (
        lambda dtypes, strings: not (set(strings) <= {'sum', 'add'} and set(dtypes) <= {'float32', 'int64'}),
        'op-plugin ScatterReduceKernelNpuOpApi.cpp runs it on .cpu() copies except sum/add on float32'),
    'aten::scatter_reduce.two': (
        lambda dtypes, strings: not (set(strings) <= {'sum', 'add'} and set(dtypes) <= {'float32', 'int64'}),
        'op-plugin ScatterReduceKernelNpuOpApi.cpp runs it on .cpu() copies except sum/add on float32'),
}


# -- the emulated device --------------------------------------------------------------------


class EmulatedTensor(torch.Tensor):
    """A tensor on the emulated 'npu' device; `elem` holds its data on the CPU."""

    @staticmethod
    def __new__(cls, elem):
        # An empty tensor is usually an out= argument about to be resized: its sizes and strides
        # are read from elem (slow: through Python). Any other keeps the sizes it was made with.
        t = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=torch.device(DEVICE_TYPE, 0),
                                                dispatch_sizes_strides_policy='sizes' if elem.numel() == 0 else None)
        t.elem = elem
        t.resizable = elem.numel() == 0
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA_QUERIES:
            return func(args[0].elem, *args[1:], **(kwargs or {}))
        raise RuntimeError(f'{func}: emulated NPU tensors only work under OpRecorder')


def _metadata_queries():
    names = ['sym_size.default', 'sym_size.int', 'sym_stride.default', 'sym_stride.int', 'sym_numel.default',
             'sym_storage_offset.default', 'size.default', 'size.int', 'stride.default', 'stride.int',
             'numel.default', 'storage_offset.default', 'dim.default', 'is_contiguous.default',
             'is_contiguous.memory_format', 'is_strides_like_format.default',
             'is_non_overlapping_and_dense.default']
    ops = set()
    for name in names:
        base, overload = name.split('.')
        op = getattr(getattr(torch.ops.aten, base, None), overload, None)
        if op is not None:
            ops.add(op)
    return ops


_METADATA_QUERIES = _metadata_queries()  # answered from the CPU data, not recorded


class _BackendModule:
    """What torch.npu has to offer for autocast, device counts and seeding."""

    def is_initialized(self):
        return True

    def is_available(self):
        return True

    def current_device(self):
        return 0

    def device_count(self):
        return 1

    def _is_in_bad_fork(self):
        return False

    def manual_seed_all(self, seed):
        pass

    def get_amp_supported_dtype(self):
        return [torch.float16, torch.bfloat16]


_emulation_ready = False
_on_fake_npu = False  # set in the child that records the upstream configurations


def setup_emulated_npu():
    """Serve PrivateUse1, renamed 'npu', from Python in this process (irreversibly: run it in a
    process of its own) with torch_npu's autocast policy."""
    global _emulation_ready
    if _emulation_ready:
        return
    if 'torch_npu' in sys.modules:
        raise RuntimeError('torch_npu is loaded: this tool emulates the NPU and needs a process without it')
    name = torch._C._get_privateuse1_backend_name()
    if name != 'privateuseone':
        raise RuntimeError(f'the PrivateUse1 backend is already taken ({name!r})')
    from torch.utils import backend_registration
    backend_registration._setup_privateuseone_for_python_backend(DEVICE_TYPE, backend_module=_BackendModule())
    # A backend served from Python has no pinned host allocator, and the step pins its host
    # buffers bound for the NPU (utils.device.pins_host_memory). Pinning is a host operation,
    # not an NPU operator: here it leaves the tensor as it is.
    torch.Tensor.pin_memory = lambda self, device=None: self
    _register_autocast_policy()
    _emulation_ready = True


_autocast_libs = []


def _register_autocast_policy():
    # Every other operator falls through the autocast key, as under torch_npu.
    fallthrough = torch.library.Library('_', 'IMPL')
    fallthrough.fallback(torch.library.fallthrough_kernel, 'AutocastPrivateUse1')
    _autocast_lib = torch.library.Library('aten', 'IMPL')
    _autocast_libs.extend((fallthrough, _autocast_lib))
    for policy, names in (('lower', AUTOCAST_LOWER), ('fp32', AUTOCAST_FP32),
                          ('fp32_set_opt_dtype', AUTOCAST_FP32_SET_OPT_DTYPE), ('promote', AUTOCAST_PROMOTE)):
        for overload_name in names:
            base, _, overload = overload_name.partition('.')
            packet = getattr(torch.ops.aten, base, None)
            op = getattr(packet, overload or 'default', None) if packet is not None else None
            if op is None:
                continue  # not in this torch
            _autocast_lib.impl(overload_name, _autocast_kernel(op, policy), 'AutocastPrivateUse1')


def _autocast_kernel(op, policy):
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)

    def eligible(x):
        return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type == DEVICE_TYPE
                and x.dtype != torch.float64)

    def kernel(*args, **kwargs):
        leaves = [x for x in _leaves(args, kwargs) if eligible(x)]
        target = None
        if policy == 'lower':
            target = torch.get_autocast_dtype(DEVICE_TYPE)
        elif policy == 'fp32':
            target = torch.float32
        elif policy == 'promote' and leaves:
            target = leaves[0].dtype
            for x in leaves[1:]:
                target = torch.promote_types(target, x.dtype)
        elif policy == 'fp32_set_opt_dtype':
            if any(x.dtype != torch.float32 for x in leaves) and kwargs.get('dtype') is None:
                kwargs = dict(kwargs, dtype=torch.float32)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            if target is not None:
                args, kwargs = _map_args(lambda x: x.to(target) if eligible(x) else x, args, kwargs)
            return op(*args, **kwargs)

    return kernel


def to_device(x):
    """A host tensor (or module) on the emulated device: call under an OpRecorder."""
    return x.to(torch.device(DEVICE_TYPE, 0))


# -- recording ------------------------------------------------------------------------------


_composite_keys = {}


def _composite_key(func):
    """The composite kernel that fills the PrivateUse1 slot of `func` when no backend kernel is
    registered (the dispatcher's order), or None: then the NPU needs a kernel of its own."""
    if func not in _composite_keys:
        name = func.name()
        _composite_keys[func] = next(
            (key for key in (torch._C.DispatchKey.CompositeExplicitAutogradNonFunctional,
                             torch._C.DispatchKey.CompositeExplicitAutograd,
                             torch._C.DispatchKey.CompositeImplicitAutograd)
             if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)), None)
    return _composite_keys[func]


def _leaves(args, kwargs):
    """The flat arguments of an operator call (tensor lists included)."""
    out = []
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, (list, tuple)):
            out.extend(x)
        else:
            out.append(x)
    return out


def _map_args(fn, args, kwargs):
    def one(x):
        if isinstance(x, (list, tuple)):
            return type(x)(fn(y) for y in x)
        return fn(x)
    return tuple(one(x) for x in args), {k: one(v) for k, v in kwargs.items()}


def _is_device(x):
    """An NPU operand: an emulated tensor, a tensor of the fake torch_npu, or the device itself."""
    if isinstance(x, torch.Tensor):
        return isinstance(x, EmulatedTensor) or x.device.type == DEVICE_TYPE
    return isinstance(x, torch.device) and x.type == DEVICE_TYPE


def _dtype_name(dtype):
    return str(dtype).replace('torch.', '')


class OpRecorder(TorchDispatchMode):
    """Runs operators on emulated NPU tensors on the CPU and records them.

    ops: {name: {'calls', 'phases', 'dtypes', 'strings', 'composite', 'calls_ops', 'host_inputs'}}
    where 'calls_ops' are the operators a composite called and 'host_inputs' counts calls that
    mixed host tensors (not 0-dim) into a device operator. Operators on host tensors only are
    counted in host_ops. `phase` labels what follows.
    """

    def __init__(self):
        super().__init__()
        self.ops = {}
        self.host_ops = collections.Counter()
        self.phase = None
        self._parents = []
        self._child_raised = []
        self.losses = []  # (loss_l, loss_c) of each step

    def _record(self, name, leaves, composite):
        rec = self.ops.setdefault(name, {'calls': 0, 'phases': set(), 'dtypes': set(), 'strings': set(),
                                         'composite': composite, 'calls_ops': set(), 'host_inputs': 0,
                                         'direct_calls': 0, 'stub': False})
        rec['calls'] += 1
        rec['direct_calls'] += not self._parents
        rec['phases'].add(self.phase)
        for x in leaves:
            if isinstance(x, torch.Tensor):
                rec['dtypes'].add(_dtype_name(x.dtype))
            elif isinstance(x, str):
                rec['strings'].add(x)
        if name not in ('aten::_to_copy', 'aten::copy_') and any(
                type(x) is torch.Tensor and x.dim() > 0 for x in leaves):
            rec['host_inputs'] += 1
        if self._parents:
            self.ops[self._parents[-1]]['calls_ops'].add(name)
        return rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_QUERIES:  # answered from the data, not recorded
            if isinstance(args[0], EmulatedTensor):
                return func(args[0].elem, *args[1:], **kwargs)
            return func(*args, **kwargs)
        leaves = _leaves(args, kwargs)
        if not any(_is_device(x) for x in leaves):
            self.host_ops[func.name()] += 1
            return func(*args, **kwargs)
        if self.phase is None:  # set-up, not recorded
            return _run_on_cpu(func, args, kwargs)
        name = func.name()
        key = _composite_key(func)
        self._record(name, leaves, _dispatch_key_name(key))
        if name in METADATA_COMPOSITES or name in OPAQUE_COMPOSITES:
            key = None
        if key is not None:
            # The composite's own calls come back through this mode. Some composites are stubs
            # that raise for backends other than CPU/CUDA (convolution_overrideable): the NPU
            # needs a kernel for them or for a composite above them; that one runs on the CPU here.
            self._parents.append(name)
            self._child_raised.append(False)
            try:
                with self:
                    return func._op_dk(key, *args, **kwargs)
            except NotImplementedError:
                if not self._child_raised[-1]:
                    self.ops[name]['stub'] = True
                    if len(self._child_raised) > 1:
                        self._child_raised[-2] = True
                    raise
            finally:
                self._parents.pop()
                self._child_raised.pop()
        return _run_on_cpu(func, args, kwargs)

    def summary(self):
        out = {}
        for name in sorted(self.ops):
            rec = self.ops[name]
            out[name] = {'calls': rec['calls'], 'phases': [p for p in PHASES if p in rec['phases']],
                         'dtypes': sorted(rec['dtypes']), 'strings': sorted(rec['strings']),
                         'composite': rec['composite'], 'calls_ops': sorted(rec['calls_ops']),
                         'direct_calls': rec['direct_calls']}
            if rec['stub']:
                out[name]['stub'] = True
            if rec['host_inputs']:
                out[name]['host_inputs'] = rec['host_inputs']
        return out


def _dispatch_key_name(key):
    return None if key is None else key.name


_SLOW_IN_HALF = {'aten::_convolution', 'aten::convolution_backward'}


def _run_on_cpu(func, args, kwargs):
    """Run `func` on the CPU data of its emulated arguments; its new tensors are emulated ones
    unless it put them on the host (a device kwarg of 'cpu'). On the fake torch_npu (the upstream
    configurations) the fake runs it."""
    if _on_fake_npu:
        return func(*args, **kwargs)
    def unwrap(x):
        if isinstance(x, EmulatedTensor):
            return x.elem
        if isinstance(x, torch.device) and x.type == DEVICE_TYPE:
            return torch.device('cpu')
        return x

    cpu_args, cpu_kwargs = _map_args(unwrap, args, kwargs)
    half = func.name() in _SLOW_IN_HALF and any(
        isinstance(x, torch.Tensor) and x.dtype == torch.float16 for x in _leaves(cpu_args, cpu_kwargs))
    if half:  # the CPU's fp16 convolutions are naive loops: compute in float32, return fp16
        cpu_args, cpu_kwargs = _map_args(
            lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.float16 else x,
            cpu_args, cpu_kwargs)
    out = func(*cpu_args, **cpu_kwargs)
    if half:
        out = (type(out)(x.half() if isinstance(x, torch.Tensor) else x for x in out)
               if isinstance(out, (list, tuple)) else out.half())
    target = kwargs.get('device')
    to_host = isinstance(target, torch.device) and target.type == 'cpu'
    leaves = _leaves(args, kwargs)
    originals = {id(x.elem): x for x in leaves if isinstance(x, EmulatedTensor)}
    hosts = {id(x) for x in leaves if type(x) is torch.Tensor}

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in originals:  # in place or out=: the argument itself
            return originals[id(x)]
        if id(x) in hosts or to_host:
            return x
        return EmulatedTensor(x)

    if func._schema.is_mutable:
        for x in originals.values():
            if not x.resizable and (x.shape != x.elem.shape or x.stride() != x.elem.stride()):
                raise RuntimeError(f'{func} resized an emulated NPU tensor made with {tuple(x.shape)}: '
                                   'only empty ones follow their data\'s sizes')
    if isinstance(out, (list, tuple)):
        return type(out)(wrap(x) for x in out)
    return wrap(out)


# -- the training step ----------------------------------------------------------------------


def make_batch(batch_size, height, width, seed=0):
    """uint8 images on the host (as the loader delivers them) and 1-6 faces per image."""
    from benchmarks.bench_layers import random_faces
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=gen)
    counts = torch.randint(1, 7, (batch_size,), generator=gen).tolist()
    return images, [random_faces(gen, n, max(height, width)) for n in counts]


_initial_nets = {}


def initial_net(seed=0):
    """A copy of S3FD initialised from scratch with `seed` (made once per process)."""
    from s3fd import build_s3fd, init_weights_from_scratch
    if seed not in _initial_nets:
        torch.manual_seed(seed)
        net = build_s3fd('train')
        init_weights_from_scratch(net)
        _initial_nets[seed] = net
    return copy.deepcopy(_initial_nets[seed])


def record_training(recorder, config, batch_size=2, height=64, width=64, steps=None, loss_scale=32.0, seed=0):
    """Run `steps` training steps of S3FD in an emulated `config` on the emulated NPU under
    `recorder`: train.py's step rebuilt from its pieces (to_device, forward under autocast,
    MultiBoxLoss, the finiteness flag, backward), plus the matcher's 'face' mode and a batch
    without faces. The loss scaling and the optimizer are the upstream configurations' (see
    record_upstream): no stand-in for them here. Default steps: 1."""
    from data.config import cfg
    from layers.modules.multibox_loss import MultiBoxLoss
    from utils.transforms import subtract_mean

    if config not in EMULATED_CONFIGS:
        raise ValueError(f'unknown configuration {config!r}: choose from {EMULATED_CONFIGS}')
    if steps is None:
        steps = 1
    setup_emulated_npu()
    net = initial_net(seed)
    images_u8, targets = make_batch(batch_size, height, width, seed)
    autocast_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(config)
    criterion = MultiBoxLoss(cfg)
    face_mode = MultiBoxLoss(cfg, match_mode='face')
    with recorder:
        recorder.phase = None  # set-up: not recorded
        if config == 'half':
            net = net.half()  # Apex O2: the network in fp16, no autocast
        net = to_device(net)  # (converted on the host: .data of an emulated parameter cannot be reassigned)
        net.train()
        for _ in range(steps):
            recorder.phase = 'to_device'
            images = to_device(images_u8)
            images = subtract_mean(images, cfg.img_mean, torch.contiguous_format).contiguous()
            if config == 'half':
                images = images.half()
            net.zero_grad(set_to_none=True)
            recorder.phase = 'forward'
            amp = (torch.autocast(DEVICE_TYPE, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
            with amp:
                out = net(images)
            recorder.phase = 'loss'
            loss_l, loss_c = criterion(out, targets)
            loss = loss_l + loss_c
            detached = tuple(t.detach() for t in out)
            face_mode(detached, targets)
            criterion(detached, [t[:0] for t in targets])
            recorder.phase = None
            recorder.losses.append((float(loss_l.detach()), float(loss_c.detach())))
            recorder.phase = 'finite_check'
            bool(torch.isfinite(loss.detach()).int().cpu())  # the finiteness flag, read on the host
            float(loss.detach())  # the logged loss, read at log steps
            recorder.phase = 'backward'
            (loss * loss_scale if config in ('fp16', 'half') else loss).backward()
        recorder.phase = None
    return recorder


class _Phases:
    """Labels the recorder's phase while train.py's step (utils.training.engine.training_step)
    calls into `target`: each method named in `phases` runs under its phase, as do calls of the
    object itself (the loss, the network) under `call_phase`; everything else passes through."""

    def __init__(self, recorder, target, phases, call_phase=None):
        self._recorder, self._target, self._phases, self._call_phase = recorder, target, phases, call_phase

    def _run(self, phase, fn, *args, **kwargs):
        self._recorder.phase = phase
        return fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._run(self._call_phase, self._target, *args, **kwargs)

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if name in self._phases:
            return lambda *args, **kwargs: self._run(self._phases[name], value, *args, **kwargs)
        return value


def record_upstream(recorder, config, batch_size=2, height=64, width=64, steps=2, seed=0):
    """Run `steps` training steps of an upstream `config` (UPSTREAM_CONFIGS) on the fake torch_npu,
    in a process where it is imported: train.py's own step (utils.training.engine.training_step)
    with utils.device's Runtime (its optimizer, initialize, zero_grad, autocast, backward,
    step), the objects it calls wrapped to label the recorder's phases. torch_npu's GradScaler
    unscales in a phase of its own, before the step, as GradScaler.step would."""
    from data.config import cfg
    from layers.modules.multibox_loss import MultiBoxLoss
    from utils import device as devices
    from utils.training import engine

    amp = {'apex': ('apex', 'fp16'), 'native_fp16': ('native', 'fp16')}[config]
    runtime = devices.setup_device('npu', 0, *amp)
    images_u8, targets = make_batch(batch_size, height, width, seed)

    def step(optimizer):  # GradScaler.step unscales first when nothing did: the same operators
        if runtime.scaler is not None:
            recorder.phase = 'grad_scaler'
            runtime.scaler.unscale_(optimizer)
        recorder.phase = 'optimizer'
        return runtime.step(optimizer)

    labelled = _Phases(recorder, runtime, {'zero_grad': 'optimizer', 'autocast': 'forward', 'step': 'optimizer',
                                           'backward': 'backward', 'discard': 'optimizer'})
    labelled.step = step
    real_to_device = engine.to_device

    def to_device(*args, **kwargs):
        recorder.phase = 'to_device'
        return real_to_device(*args, **kwargs)

    with recorder:
        recorder.phase = None  # set-up: not recorded
        model = initial_net(seed).to(runtime.device)
        model.train()
        optimizer = runtime.make_optimizer(model.parameters(), 1e-3, 0.9, 5e-4)
        model, optimizer = runtime.initialize(model, optimizer)
        net = _Phases(recorder, model, {}, call_phase='forward')
        criterion = _Phases(recorder, MultiBoxLoss(cfg), {}, call_phase='loss')
        finite = _Phases(recorder, engine.FiniteCheck(runtime.device), {'submit': 'finite_check', 'ok': 'finite_check'})
        engine.to_device = to_device
        try:
            for _ in range(steps):
                _, loss_l, loss_c, stepped = engine.training_step(net, criterion, optimizer, labelled, finite,
                                                                  images_u8.pin_memory(), targets)
                recorder.phase = None
                if not stepped:
                    raise RuntimeError(f'{config}: the recorded step was skipped (a non-finite loss or an overflow)')
                recorder.losses.append((float(loss_l), float(loss_c)))
        finally:
            engine.to_device = real_to_device
        recorder.phase = None
    return recorder


def cpu_first_loss(batch_size=2, height=64, width=64, seed=0, **_):
    """(loss_l, loss_c) of the first fp32 step of record_training, computed on the CPU."""
    from data.config import cfg
    from layers.modules.multibox_loss import MultiBoxLoss
    from utils.transforms import subtract_mean

    net = initial_net(seed)
    images_u8, targets = make_batch(batch_size, height, width, seed)
    images = subtract_mean(images_u8, cfg.img_mean, torch.contiguous_format).contiguous()
    with torch.no_grad():
        loss_l, loss_c = MultiBoxLoss(cfg)(net(images), targets)
    return float(loss_l), float(loss_c)


def record_all(configs=CONFIGS, steps=None, apex=DEFAULT_APEX, torch_npu_files=None, **kwargs):
    """({operator: record} over all configs, {config: OpRecorder.summary()}, the losses of each
    config's steps, {config: why it was skipped}). The upstream configurations run in a child
    process on the fake torch_npu (record_upstream)."""
    per_config, losses, skipped = {}, {}, {}
    for config in configs:
        if config in EMULATED_CONFIGS:
            recorder = record_training(OpRecorder(), config, steps=steps, **kwargs)
            per_config[config], losses[config] = recorder.summary(), recorder.losses
    upstream = [c for c in configs if c in UPSTREAM_CONFIGS]
    if 'apex' in upstream and not os.path.isfile(os.path.join(apex, 'apex', '__init__.py')):
        upstream.remove('apex')
        skipped['apex'] = f"no Ascend Apex in {apex} (--apex: the folder holding Ascend Apex's apex/)"
    if upstream:
        child = run_upstream_child(upstream, apex, torch_npu_files, steps=steps or 2, **kwargs)
        for config, recorded in child.items():
            per_config[config], losses[config] = recorded['ops'], recorded['losses']
    union = {}
    for config, summary in per_config.items():
        for name, rec in summary.items():
            merged = union.setdefault(name, {'calls': 0, 'phases': [], 'dtypes': [], 'strings': [],
                                             'composite': rec['composite'], 'calls_ops': [], 'configs': []})
            merged['calls'] += rec['calls']
            merged['direct_calls'] = merged.get('direct_calls', 0) + rec['direct_calls']
            for key in ('phases', 'dtypes', 'strings', 'calls_ops'):
                merged[key] = sorted(set(merged[key]) | set(rec[key]),
                                     key=PHASES.index if key == 'phases' else None)
            merged['configs'].append(config)
            if rec.get('stub'):
                merged['stub'] = True
            if rec.get('host_inputs'):
                merged['host_inputs'] = merged.get('host_inputs', 0) + rec['host_inputs']
    return union, per_config, losses, skipped


def run_upstream_child(configs, apex, torch_npu_files, **kwargs):
    """Record the upstream `configs` in a child process on the fake torch_npu (Ascend Apex's files
    from `apex` first on its path; torch_npu's own files from `torch_npu_files` when given):
    {config: {'ops': summary, 'losses': [...]}}."""
    import subprocess
    path = ([apex] if 'apex' in configs else []) + [FAKE_ASCEND, REPO]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop('FAKE_ASCEND_UPSTREAM', None)
    if torch_npu_files:
        env['FAKE_ASCEND_UPSTREAM'] = os.path.abspath(torch_npu_files)
    spec = json.dumps({'configs': configs, **kwargs})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--upstream_child', spec], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'recording {configs} on the fake torch_npu failed:\n{proc.stderr[-4000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _describe_apex(folder):
    """Ascend Apex's build as its README (../shared/ascend-apex/README.md) names it, else the folder."""
    readme = os.path.join(folder, 'README.md')
    if os.path.isfile(readme):
        with open(readme, encoding='utf-8') as f:
            text = f.read()
        match = re.search(r'NVIDIA/apex at commit (\w+).*?Ascend/apex branch (\w+) \(commit (\w+)', text, re.S)
        if match:
            return f'Ascend Apex: NVIDIA/apex {match.group(1)[:12]} + Ascend/apex {match.group(2)} @ {match.group(3)}'
    return os.path.basename(os.path.abspath(folder))


def _describe_torch_npu(folder):
    """The torch_npu version of the files in `folder` (its version.py), else the folder's name."""
    version = os.path.join(folder, 'torch_npu', 'version.py')
    if os.path.isfile(version):
        with open(version, encoding='utf-8') as f:
            match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
        if match:
            return f"torch_npu {match.group(1)}'s own Python files (the torch-npu wheel)"
    return os.path.basename(os.path.abspath(folder))


def upstream_child(spec):
    """The child of run_upstream_child: record each configuration on the fake torch_npu, print JSON."""
    global _on_fake_npu
    import torch_npu
    if not hasattr(torch_npu, '_core'):
        raise RuntimeError(f'{torch_npu.__file__} is not the test fake of torch_npu (tests/fake_ascend)')
    _on_fake_npu = True
    spec = json.loads(spec)
    out = {}
    for config in spec.pop('configs'):
        recorder = record_upstream(OpRecorder(), config, **spec)
        out[config] = {'ops': recorder.summary(), 'losses': recorder.losses}
    print(json.dumps(out))


# -- what torch_npu registers ----------------------------------------------------------------


def _version_key(v):
    return tuple(int(p) for p in v.lstrip('v').split('.'))


def _parse_versions(spec, all_versions):
    """op-plugin's version field: 'all_version', a closed range '[v2.1, newest]', or a
    comma-separated list 'v2.1, v2.2'."""
    spec = spec.strip()
    if spec == 'all_version':
        return set(all_versions)
    if spec.startswith('['):
        lo, hi = (p.strip() for p in spec.strip('[]').split(','))
        hi = all_versions[-1] if hi == 'newest' else hi
        return {v for v in all_versions if _version_key(lo) <= _version_key(v) <= _version_key(hi)}
    return {p.strip() for p in spec.split(',') if p.strip()}


def parse_op_plugin_yaml(text, torch_version):
    """{overload name: sorted implementations ('acl_op', 'op_api', 'tocpu')} that op-plugin's
    op_plugin_functions.yaml registers for torch `torch_version` ('2.5')."""
    want = 'v' + '.'.join(torch_version.split('.')[:2])
    all_versions = None
    section = None
    entries = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        top = re.match(r'^([a-z_]+):\s*(.*)$', line)
        if top:
            section = top.group(1)
            if section == 'all_version':
                all_versions = [v.strip() for v in top.group(2).strip('[] ').split(',')]
            continue
        item = re.match(r'^\s*-\s+func:\s*([A-Za-z0-9_.]+)', line)
        if item:
            entries.append({'name': item.group(1), 'section': section})
            continue
        field = re.match(r'^\s+(acl_op|op_api|version):\s*(.+)$', line)
        if field and entries:
            entries[-1][field.group(1)] = field.group(2)
    if not all_versions:
        raise ValueError('not an op_plugin_functions.yaml: no all_version line')
    if want not in all_versions:
        raise ValueError(f'torch {torch_version}: not among this file\'s versions {all_versions}')
    registered = collections.defaultdict(set)
    for e in entries:
        if e['section'] == 'unsupported':
            continue
        if e['section'] == 'tocpu':
            if want in _parse_versions(e.get('version', ''), all_versions):
                registered[e['name']].add('tocpu')
            continue
        for impl in ('acl_op', 'op_api'):
            if impl in e and want in _parse_versions(e[impl], all_versions):
                registered[e['name']].add(impl)
    return {name: sorted(impls) for name, impls in registered.items()}


def parse_native_yaml(text):
    """The overload names torch_npu registers itself (npu_native_functions.yaml's supported,
    symint and custom lists)."""
    names = set()
    section = None
    for line in text.splitlines():
        top = re.match(r'^([a-z_]+):', line)
        if top:
            section = top.group(1)
            continue
        if section not in ('supported', 'symint', 'custom'):
            continue
        item = re.match(r'^\s*-\s+(?:func:\s*)?([A-Za-z0-9_.]+)', line)
        if item:
            names.add(item.group(1))
    return names


def check(union, registered, native):
    """Status of every recorded operator given op-plugin's and torch_npu's registrations."""
    status = {}

    def resolve(name, seen=()):
        if name in status:
            return status[name]
        short = name.split('::', 1)[1]
        rec = union[name]
        impls = list(registered.get(short, []))
        if short in native:
            impls.append('torch_npu')
        if 'tocpu' in impls:
            result = {'status': 'host_copy', 'why': "op-plugin lists it under 'tocpu'"}
        elif impls:
            result = {'status': 'npu', 'kernel': impls}
            host = KNOWN_HOST_COPIES.get(name)
            if host is not None and host[0](rec['dtypes'], rec['strings']):
                result = {'status': 'host_copy', 'kernel': impls, 'why': host[1]}
        elif name in METADATA_COMPOSITES:
            result = {'status': 'composite', 'calls': []}
        elif rec['composite'] and name not in OPAQUE_COMPOSITES and not rec.get('stub'):
            bad = [c for c in rec['calls_ops']
                   if c not in seen and resolve(c, seen + (name,))['status'] not in ('npu', 'composite')]
            result = ({'status': 'composite', 'calls': rec['calls_ops']} if not bad else
                      {'status': 'missing', 'why': f'{rec["composite"]} kernel calling {bad}'})
        else:
            result = {'status': 'missing', 'why': 'no NPU kernel: the PrivateUse1 fallback runs it on the CPU'}
        status[name] = result
        return result

    for name in union:
        resolve(name)
    return status


def reached(union, status):
    """The operators the NPU runs: those called outside any composite, and what the composites
    among them call (a composite that torch_npu registers runs as one kernel: its callees are
    not reached through it)."""
    seen = set()
    todo = [name for name, rec in union.items() if rec['direct_calls']]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if status[name]['status'] != 'npu':
            todo.extend(union[name]['calls_ops'])
    return seen


def needs_replacement(union, status):
    """The operators that run on the CPU in an NPU step, outermost first: the ones to replace
    (a missing composite is listed, not its missing callees)."""
    on_npu = reached(union, status)
    out = []
    for name in sorted(on_npu):
        if status[name]['status'] in ('missing', 'host_copy'):
            callers = [n for n in on_npu if name in union[n]['calls_ops'] and status[n]['status'] != 'npu']
            if not callers:
                out.append(name)
    return out


# -- the committed list ---------------------------------------------------------------------


LIST_ABOUT = ('The aten operators an S3FD training step dispatches on an Ascend NPU (recorded by '
              'benchmarks/check_npu_ops.py on its emulated NPU) and, per torch_npu version, where the NPU kernel '
              'comes from: acl_op / op_api (op-plugin\'s op_plugin_functions.yaml), torch_npu (its '
              'npu_native_functions.yaml), composite (no kernel of its own: runs operators that have one), '
              'unreached (only called inside an operator that has an NPU kernel), missing / host_copy (runs on '
              'the CPU). Refresh a column: python benchmarks/check_npu_ops.py --yaml <op_plugin_functions.yaml> '
              '--native <npu_native_functions.yaml> --torch <x.y> --label "torch_npu <version>" '
              '--source "<where the files came from>" --update benchmarks/npu_ops.json')


def list_column(status, is_reached):
    """One operator's entry in a version's column of the committed list."""
    if not is_reached and status['status'] != 'npu':
        return 'unreached'
    if status['status'] == 'npu':
        return '+'.join(status['kernel'])
    return status['status']


def read_list(path):
    """The committed list with each operator's statuses expanded to {version label: status}."""
    with open(path) as f:
        data = json.load(f)
    labels = list(data['versions'])
    for entry in data['ops'].values():
        by_version = {}
        for st, where in entry.pop('npu').items():
            for label in (labels if where == 'all' else where):
                by_version[label] = st
        entry['by_version'] = by_version
    return data


def write_list(path, data):
    """One line per version and per operator; an operator's statuses grouped by value."""
    labels = list(data['versions'])

    def op_line(entry):
        groups = {}
        for label in labels:
            if label in entry['by_version']:
                groups.setdefault(entry['by_version'][label], []).append(label)
        if len(groups) == 1 and len(next(iter(groups.values()))) == len(labels):
            groups = {next(iter(groups)): 'all'}
        return json.dumps({'composite': entry['composite'], 'phases': entry['phases'], 'npu': groups})

    def block(key, items):
        body = ',\n'.join(f'  {json.dumps(k)}: {v}' for k, v in items)
        return f' {json.dumps(key)}: {{\n{body}\n }}'

    parts = [f' "about": {json.dumps(data["about"])}',
             f' "recorded_with": {json.dumps(data["recorded_with"])}',
             block('versions', [(k, json.dumps(v)) for k, v in data['versions'].items()]),
             block('ops', [(k, op_line(v)) for k, v in sorted(data['ops'].items())])]
    with open(path, 'w') as f:
        f.write('{\n' + ',\n'.join(parts) + '\n}\n')


def update_list(path, result, status, on_npu, label, source):
    """Write `label`'s column of the committed list at `path` (other versions' columns are
    kept); the operators are those of this recording: ones no longer dispatched are dropped,
    new ones have only the columns written since."""
    data = read_list(path) if os.path.exists(path) else {'versions': {}, 'ops': {}}
    data['about'] = LIST_ABOUT
    data['recorded_with'] = {k: result[k] for k in ('torch', 'configs', 'batch_size', 'input_size', 'upstream_files')
                             if k in result}
    data['versions'][label] = source
    ops = {}
    for name, rec in result['ops'].items():
        by_version = data['ops'].get(name, {}).get('by_version', {})
        by_version[label] = list_column(status[name], name in on_npu)
        ops[name] = {'composite': rec['composite'], 'phases': rec['phases'], 'by_version': by_version}
    data['ops'] = ops
    write_list(path, data)


def main(args):
    if args.upstream_child:
        upstream_child(args.upstream_child)
        return 0
    if args.recorded:
        with open(args.recorded) as f:
            result = json.load(f)
        result = {k: result[k] for k in ('torch', 'configs', 'batch_size', 'input_size', 'ops', 'upstream_files')
                  if k in result}
        union = result['ops']
        for rec in union.values():
            rec.pop('npu', None)
    else:
        configs = [c for c in args.configs.split(',') if c]
        sizes = dict(batch_size=args.batch_size, height=args.input_size[0], width=args.input_size[1])
        unknown = sorted(set(configs) - set(CONFIGS))
        if unknown:
            raise SystemExit(f'check_npu_ops.py: error: unknown configurations {unknown}: choose from {CONFIGS}')
        union, per_config, losses, skipped = record_all(configs, steps=args.steps, apex=args.apex,
                                                        torch_npu_files=args.torch_npu_files, **sizes)
        configs = [c for c in configs if c not in skipped]
        result = {'torch': torch.__version__, 'configs': configs, 'batch_size': args.batch_size,
                  'input_size': args.input_size, 'ops': union, 'losses': losses, 'skipped': skipped,
                  'upstream_files': {'apex': _describe_apex(args.apex) if 'apex' in configs else None,
                                     'torch_npu': (_describe_torch_npu(args.torch_npu_files) if args.torch_npu_files
                                                   else "the fake torch_npu's re-implementations")}}
        if 'fp32' in losses:
            # The emulated NPU takes the accelerator branches (the matcher by sorting, hard
            # negatives ranked over the whole row) and must train on the same loss as the CPU.
            cpu = cpu_first_loss(**sizes)
            result['cpu_first_loss'] = cpu
            result['first_loss_rel_diff'] = max(abs(a - b) / max(abs(b), 1e-12)
                                                for a, b in zip(losses['fp32'][0], cpu))
        if args.per_config:
            result['per_config'] = {c: sorted(s) for c, s in per_config.items()}
    failed = False
    if args.yaml:
        with open(args.yaml) as f:
            registered = parse_op_plugin_yaml(f.read(), args.torch)
        native = set()
        if args.native:
            with open(args.native) as f:
                native = parse_native_yaml(f.read())
        status = check(union, registered, native)
        on_npu = reached(union, status)
        for name, st in status.items():
            union[name]['npu'] = dict(st, reached=name in on_npu)
        missing = needs_replacement(union, status)
        result.update(checked=args.label or args.torch, missing=missing,
                      all_on_cpu=sorted(n for n in on_npu if status[n]['status'] in ('missing', 'host_copy')))
        failed = bool(missing)
        if args.update:
            update_list(args.update, result, status, on_npu, args.label, args.source)
    print(json.dumps(result, indent=1))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main(parse_args()))
