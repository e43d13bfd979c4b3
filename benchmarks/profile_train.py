"""Where a training step's time and memory traffic go: bench_train.py's step under
torch.profiler, its device time split by phase and by kind of operator, next to the bytes
each kind reads and writes.

    python benchmarks/profile_train.py --device gpu --batch_size 16 --channels_last
    python benchmarks/profile_train.py --device gpu --batch_size 16 --channels_last --compile
    python benchmarks/profile_train.py --device cpu --batch_size 1 --input_size 160 --steps 1

Prints one JSON object:
  step_time_s      wall time of one step without the profiler (mean over --steps);
  profiled_step_s  the same under the profiler;
  device_busy      device time of all operators / profiled wall time (well below 1 when the
                   device waits for the host);
  phases_ms        device time per step in forward, loss, backward, optimizer;
  kinds            per kind of operator: device ms per step; GB read + written per step,
                   counted operator by operator on one uncompiled step; and, where the
                   device's memory bandwidth is known, the ms that traffic takes at that
                   bandwidth (a floor for the memory-bound kinds). Kinds: convolution, relu,
                   pooling, cast (autocast's copies), l2norm, heads (the loc/conf convolutions),
                   loss, optimizer, compiled (torch.compile's kernels), other;
  saved_for_backward_gb  what autograd keeps from the forward for the backward (activations,
                   autocast's weight copies; not the parameters), on the uncompiled step;
  top_ops          the operators with the most device time.
On the CPU "device time" is the aten operators' own CPU time (the C++ kernels of a compiled
network are not aten operators and are left out there). --trace writes a Chrome trace.
"""
import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import add_step_arguments, device_spec  # noqa: E402
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_step_arguments(p)
    p.add_argument('--channels_last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the network (not the data path)')
    p.add_argument('--lr', default=1e-4, type=float, help='SGD learning rate (small: the weights must stay finite)')
    p.add_argument('--warmup', default=3, type=int, help='untimed steps first (compilation, cuDNN autotuning)')
    p.add_argument('--steps', default=5, type=int, help='profiled steps, and as many timed without the profiler')
    p.add_argument('--top', default=15, type=int, help='operators listed in top_ops')
    p.add_argument('--trace', default=None, help='write a Chrome trace of the profiled steps to this file')
    return p.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from s3fd import build_s3fd, init_weights_from_scratch  # noqa: E402
from benchmarks.bench_train import prepare_training, synthetic_batches  # noqa: E402
from utils.training.engine import training_step  # noqa: E402
from utils import device as devices  # noqa: E402

PHASES = ('forward', 'loss', 'backward', 'optimizer')
KINDS = ('convolution', 'relu', 'pooling', 'cast', 'l2norm', 'heads', 'loss', 'optimizer', 'compiled', 'other')
LABEL = 'S3FD|'  # prefix of the profiler ranges this tool opens: S3FD|phase|scope|module type
# aten operators that only make views or read metadata: they move no bytes.
NO_TRAFFIC_OPS = {'detach', 'view', '_unsafe_view', 'expand', 'permute', 't', 'alias', 'slice', 'select',
                  'unsqueeze', 'squeeze', 'transpose', 'as_strided', 'reshape', 'split', 'unbind',
                  'split_with_sizes', 'empty', 'empty_like', 'empty_strided', 'lift_fresh', 'set_', 'resize_',
                  '_local_scalar_dense', 'is_nonzero', 'size', 'stride'}


def kind_of(op, phase, scope, module_type):
    """Kind of an operator (aten name without 'aten::', or a kernel/range name) from the phase
    and the module (qualified name, type) it ran for; in the backward the module is the one
    whose forward made the autograd node."""
    if phase in ('loss', 'optimizer'):
        return phase
    if op in ('_to_copy', 'copy_', 'to'):
        return 'cast'
    if module_type == 'L2Norm':
        return 'l2norm'
    if scope.startswith(('loc.', 'conf.')):
        return 'heads'
    if 'conv' in op or module_type == 'Conv2d':
        return 'convolution'
    if scope == 'compiled' or op.startswith(('triton', 'CompiledFunction', 'Torch-Compiled')):
        return 'compiled'
    if op in ('relu', 'relu_', 'threshold_backward') or module_type == 'ReLU':
        return 'relu'
    if 'pool' in op or module_type == 'MaxPool2d':
        return 'pooling'
    return 'other'


class Scopes:
    """The phase and module the step is in, kept as a stack and mirrored in profiler ranges.

    Forward: module hooks enter the module's range. Backward: each autograd node enters, while
    it runs, the range of the module whose forward created it (else the node's class name).
    Loss and optimizer: wrappers around the criterion and optimizer.step.
    """

    def __init__(self):
        self.stack = [('forward', 'S3FD', 'S3FD')]
        self.ranges = []
        self.node_scope = {}  # autograd node -> (module name, module type)
        self.hooked_leaves = set()  # the parameters' AccumulateGrad nodes live across steps
        self.open_nodes = set()  # keys of the backward nodes whose range is open
        self.handles = []

    def current(self):
        return self.stack[-1]

    def enter(self, phase, scope, module_type):
        self.stack.append((phase, scope, module_type))
        rf = record_function(f'{LABEL}{phase}|{scope}|{module_type}')
        rf.__enter__()
        self.ranges.append(rf)

    def exit(self):
        self.stack.pop()
        self.ranges.pop().__exit__(None, None, None)

    def attach(self, net, criterion, optimizer, module_hooks=True):
        if module_hooks:
            for name, module in net.named_modules():
                if name:
                    self.handles.append(module.register_forward_pre_hook(
                        lambda m, a, name=name: self.enter('forward', name, type(m).__name__)))
                    self.handles.append(module.register_forward_hook(
                        lambda m, a, out, name=name: self._after_forward(name, m, out)))
        criterion_forward, optimizer_step = criterion.forward, optimizer.step

        def loss_forward(*args, **kwargs):
            self.enter('loss', 'loss', 'MultiBoxLoss')
            try:
                loss_l, loss_c = criterion_forward(*args, **kwargs)
            finally:
                self.exit()
            self._watch_backward([loss_l.grad_fn, loss_c.grad_fn])
            return loss_l, loss_c

        def step(*args, **kwargs):
            self.enter('optimizer', 'optimizer', type(optimizer).__name__)
            try:
                return optimizer_step(*args, **kwargs)
            finally:
                self.exit()
        criterion.forward, optimizer.step = loss_forward, step
        self.detach_wrappers = lambda: (delattr(criterion, 'forward'), delattr(optimizer, 'step'))

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.detach_wrappers()

    def _after_forward(self, name, module, out):
        self.exit()
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            self.node_scope.setdefault(out.grad_fn, (name, type(module).__name__))

    def _watch_backward(self, roots):
        """Hooks on every node of this step's graph, each node once."""
        seen, todo = set(), list(roots)
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in self.hooked_leaves:
                continue
            seen.add(node)
            if not node.next_functions:  # a leaf's AccumulateGrad: the same node every step
                self.hooked_leaves.add(node)
            scope, module_type = self.node_scope.get(node, ('compiled' if 'Compiled' in node.name() else
                                                            node.name(), node.name()))
            key = len(self.handles)
            self.handles.append(node.register_prehook(
                lambda grads, k=key, s=scope, t=module_type: self._enter_node(k, s, t)))
            self.handles.append(node.register_hook(lambda grad_in, grad_out, k=key: self._exit_node(k)))
            todo.extend(next_node for next_node, _ in node.next_functions)
        self.node_scope.clear()

    def _enter_node(self, key, scope, module_type):
        self.open_nodes.add(key)
        self.enter('backward', scope, module_type)

    def _exit_node(self, key):
        # torch 2.5 and 2.6 skip the pre-hook of a parameter's AccumulateGrad node when the
        # parameter was saved under saved-tensor hooks, but run its post-hook: close only what opened.
        if key in self.open_nodes:
            self.open_nodes.remove(key)
            self.exit()


class TrafficCounter(TorchDispatchMode):
    """Bytes of every tensor each aten operator reads or writes, summed per kind."""

    def __init__(self, scopes):
        super().__init__()
        self.scopes = scopes
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_TRAFFIC_OPS:
            return out
        moved = sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                    if isinstance(t, torch.Tensor))
        phase, scope, module_type = self.scopes.current()
        self.bytes[kind_of(name, phase, scope, module_type)] += moved
        return out


def scope_of(event):
    """(phase, scope, module type) from the innermost of this tool's ranges around `event`."""
    parent = event
    while parent is not None:
        if parent.name.startswith(LABEL):
            phase, scope, module_type = parent.name[len(LABEL):].split('|')
            return phase, scope, module_type
        parent = parent.cpu_parent
    return 'forward', 'S3FD', 'S3FD'


def device_times(prof, on_device):
    """Self device time (ms) per (phase, kind, operator) over the profiled steps, and (on a
    device) the kernels' own total, which the attributed times should add up to.

    On a device the profiler lists each kernel twice: as the device time of the host operator
    that launched it, and as an event of its own (device_type CUDA). Only the host operators
    are attributed; summing both would count every kernel twice."""
    times = collections.Counter()
    kernels_ms = 0.0
    for event in prof.events():
        if on_device and event.device_type != DeviceType.CPU:
            kernels_ms += event.self_device_time_total / 1e3
            continue
        if on_device:
            ms = event.self_device_time_total / 1e3
        elif event.name.startswith('aten::'):
            ms = event.self_cpu_time_total / 1e3
        else:
            continue
        if ms <= 0 or event.name.startswith(LABEL):
            continue
        phase, scope, module_type = scope_of(event)
        op = event.name.removeprefix('aten::')
        times[(phase, kind_of(op, phase, scope, module_type), event.name)] += ms
    return times, (kernels_ms if on_device else None)


def main(args):
    try:
        runtime = devices.setup_device(args.device, args.device_id, args.amp, args.amp_dtype)
    except devices.DeviceUnavailable as e:
        sys.exit(f'profile_train.py: error: {e}')
    torch.manual_seed(0)
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    net, optimizer, criterion, finite = prepare_training(net, runtime, args.lr, args.channels_last, False)
    run_net = torch.compile(net) if args.compile else net
    batches = [(images.to(runtime.device), targets)
               for images, targets in synthetic_batches(args, 2, torch.Generator().manual_seed(0))]

    def steps(count, start=0):
        for i in range(count):
            images, targets = batches[(start + i) % len(batches)]
            training_step(run_net, criterion, optimizer, runtime, finite, images, targets, args.channels_last)
        runtime.synchronize()

    steps(args.warmup)
    start = time.perf_counter()
    steps(args.steps)
    step_time = (time.perf_counter() - start) / args.steps

    on_device = runtime.type == 'cuda'
    scopes = Scopes()
    scopes.attach(net, criterion, optimizer, module_hooks=not args.compile)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    try:
        steps(1)  # the hooks' first call
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            steps(args.steps)
            profiled_step = (time.perf_counter() - start) / args.steps
        traffic = TrafficCounter(scopes)
        kept = {}  # storage -> bytes of what autograd keeps for the backward
        if not args.compile:
            def pack(t):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            with traffic, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                steps(1)
    finally:
        scopes.detach()
    if args.trace:
        prof.export_chrome_trace(args.trace)

    parameter_storages = {p.untyped_storage().data_ptr() for p in net.parameters()}
    times, kernels_ms = device_times(prof, on_device)
    per_step = {key: ms / args.steps for key, ms in times.items()}
    total = sum(per_step.values())
    name = torch.cuda.get_device_name(runtime.device) if on_device else runtime.type
    bandwidth = (device_spec(name) or {}).get('hbm_tbs')
    kinds = {}
    for kind in KINDS:
        ms = sum(v for (_, k, _), v in per_step.items() if k == kind)
        gb = traffic.bytes.get(kind, 0) / 1e9 if not args.compile else None
        if ms == 0 and not gb:
            continue
        kinds[kind] = {'ms': round(ms, 3), 'gb_moved': None if gb is None else round(gb, 3),
                       'ms_at_bandwidth': round(gb / bandwidth, 3) if gb is not None and bandwidth else None}
    by_op = collections.Counter()
    for (phase, kind, op), ms in per_step.items():
        by_op[(op, phase, kind)] += ms
    print(json.dumps({
        'device': runtime.describe(), 'device_name': name, 'batch_size': args.batch_size,
        'input_size': args.input_size, 'channels_last': args.channels_last, 'compile': args.compile,
        'step_time_s': round(step_time, 4), 'profiled_step_s': round(profiled_step, 4),
        'device_ms_per_step': round(total, 3), 'device_busy': round(total / 1e3 / profiled_step, 3),
        # The kernels' own device time per step; the attributed total above should match it.
        'kernel_ms_per_step': None if kernels_ms is None else round(kernels_ms / args.steps, 3),
        'bandwidth_tbs': bandwidth,
        'phases_ms': {phase: round(sum(v for (p, _, _), v in per_step.items() if p == phase), 3)
                      for phase in PHASES},
        'kinds': kinds,
        'gb_moved_per_step': None if args.compile else round(sum(traffic.bytes.values()) / 1e9, 3),
        'saved_for_backward_gb': None if args.compile else round(
            sum(b for ptr, b in kept.items() if ptr not in parameter_storages) / 1e9, 3),
        'top_ops': [{'op': op, 'phase': phase, 'kind': kind, 'ms': round(ms, 3)}
                    for (op, phase, kind), ms in by_op.most_common(args.top)],
    }))


if __name__ == '__main__':
    main(parse_args())
