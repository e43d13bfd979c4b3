"""Device, mixed precision, optimizer and distributed set-up: every such choice lives here.

    ctx = setup_device('gpu'|'npu'|'cpu', device_id, amp='auto'|'apex'|'native'|'off',
                       amp_dtype='bf16'|'fp16', loss_scale=32.0, npu_jit_compile=False)
    model.to(ctx.device)
    optimizer = ctx.make_optimizer(model.parameters(), lr, momentum, weight_decay)
    model, optimizer = ctx.initialize(model, optimizer)      # Ascend Apex O2, else unchanged
    ctx.zero_grad(optimizer)                                # as this optimizer accepts it
    with ctx.autocast():
        loss = ...
    ctx.backward(loss, optimizer)                           # loss scaling handled here
    applied = ctx.step(optimizer)                           # False: an overflowing step was skipped
    # or, for a step not to take (non-finite loss): ctx.discard(optimizer)

Host memory to pin for the loader and host-to-device copies: `pins_host_memory(device_type)`.

`DeviceUnavailable` carries a one-line message for a device or package that is missing.
"""
import contextlib
import importlib
import os
import time

import torch
import torch.distributed as dist

from utils.cli import UserError


class DeviceUnavailable(UserError, RuntimeError):
    """The requested device, or a package it needs, is not available."""


DEVICE_TYPES = {'gpu': 'cuda', 'npu': 'npu', 'cpu': 'cpu'}
DIST_BACKENDS = {'cuda': 'nccl', 'npu': 'hccl', 'cpu': 'gloo'}
# A fp16 scaler's growth interval that is never reached: the NPU recipe's scale stays fixed.
NEVER = 2 ** 31 - 1


def pins_host_memory(device_type):
    """Whether host tensors bound for this device should be pinned. CUDA and torch_npu both copy
    asynchronously only from pinned memory: torch_npu turns a non_blocking copy from memory its
    host allocator did not allocate into a stream synchronisation (torch_npu/csrc/core/npu/
    CachingHostAllocator.cpp, process_non_blocking_copy), so the host waits for the NPU's queue."""
    return device_type in ('cuda', 'npu')


def _import_optional(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _import_torch_npu():
    """torch_npu, or DeviceUnavailable saying why not in one line: not installed; or installed but
    not loadable, typically CANN's environment not set (its torch_npu._C links CANN's libhccl.so,
    libascendcl.so...) or a CUDA build of torch with a GPU (torch_npu/__init__.py refuses "two
    accelerators")."""
    try:
        return importlib.import_module('torch_npu')
    except ModuleNotFoundError as e:
        if e.name == 'torch_npu':
            raise DeviceUnavailable('--device npu needs the torch_npu package (Ascend PyTorch adapter), '
                                    'which is not installed') from None
        reason = e
    except (ImportError, RuntimeError) as e:
        reason = e
    text = str(reason).strip()
    first = text.splitlines()[0] if text else type(reason).__name__
    raise DeviceUnavailable(f'--device npu: torch_npu is installed but cannot be loaded ({first}); set up '
                            "CANN's environment first (source /usr/local/Ascend/cann/set_env.sh, "
                            'ascend-toolkit/set_env.sh before CANN 9)') from None


class DeviceContext:
    """What the training loop needs to know about its device and precision.

    Attributes: device (torch.device), type ('cuda', 'npu', 'cpu'), amp ('apex', 'native',
    'off'), amp_dtype (torch dtype under autocast or None), scaler (GradScaler or None),
    apex_amp (the apex.amp module when amp == 'apex').
    """

    def __init__(self, device, amp, amp_dtype, loss_scale, apex_amp=None, torch_npu=None):
        self.device = device
        self.type = device.type
        self.amp = amp
        self.amp_dtype = amp_dtype if amp == 'native' else None
        self.loss_scale = loss_scale
        self.apex_amp = apex_amp
        self.torch_npu = torch_npu
        self.pin_memory = pins_host_memory(self.type)
        self.scaler = None
        # Whether step() skips a step whose gradients overflowed and says so: the NPU's fp16
        # recipes, whose fixed loss scale would otherwise apply every step (see step()).
        self.skips_overflow = amp == 'apex'
        if amp == 'native' and amp_dtype == torch.float16:
            if self.type == 'npu':
                # The recipe's fixed scale, checked like a dynamic one. With dynamic=False,
                # torch_npu's GradScaler unscales without a check and always steps
                # (torch_npu/npu/amp/grad_scaler.py: _unscale_grads_, step); its dynamic mode
                # finds overflows in inf/nan mode and, before the 910B, through the float-status
                # flag, and agrees on them across processes. The scale stays: no growth, and
                # step() restores it after a skip.
                self.scaler = torch_npu.npu.amp.GradScaler(init_scale=loss_scale, growth_interval=NEVER)
                self.skips_overflow = True
            else:
                self.scaler = torch.amp.GradScaler(self.type)
        self._applied = 0  # optimizer steps actually taken, counted by a post-step hook

    def describe(self):
        precision = {'apex': f'Apex O2 (loss scale {self.loss_scale})', 'off': 'float32'}.get(
            self.amp, f'autocast {str(self.amp_dtype).replace("torch.", "")}'
            + (' + GradScaler' if self.scaler is not None else ''))
        return f'{self.device} | {precision}'

    def autocast(self):
        if self.amp != 'native':
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=self.amp_dtype)

    def make_optimizer(self, params, lr, momentum, weight_decay, sgd_impl=None):
        """SGD over `params` in one parameter group (the NPU's fused optimizers step every group).

        sgd_impl picks PyTorch's SGD kernel on CPU/GPU: None (PyTorch's default: foreach on
        CUDA; fused under a CUDA GradScaler, which then skips an inf/NaN step on the device
        instead of reading found_inf on the host every step), 'foreach' or 'fused' (one
        kernel for all parameters). The NPU uses its own fused SGD whatever this says.
        """
        params = list(params)
        if sgd_impl not in (None, 'foreach', 'fused'):
            raise ValueError(f"sgd_impl must be None, 'foreach' or 'fused', not {sgd_impl!r}")
        if self.type == 'npu':
            optimizer = None
            if self.amp == 'apex':
                from apex.optimizers import NpuFusedSGD
                optimizer = NpuFusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
            else:
                fused = getattr(getattr(self.torch_npu, 'optim', None), 'NpuFusedSGD', None)
                if fused is not None:
                    optimizer = fused(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
            if optimizer is not None:
                if self.skips_overflow:
                    optimizer.register_step_post_hook(self._count_step)
                return optimizer
        if sgd_impl is None and self.scaler is not None and self.type == 'cuda':
            sgd_impl = 'fused'
        impl = {sgd_impl: True} if sgd_impl else {}
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)
        if self.skips_overflow:
            optimizer.register_step_post_hook(self._count_step)
        return optimizer

    def _count_step(self, optimizer, args, kwargs):
        self._applied += 1

    def initialize(self, model, optimizer):
        """Ascend Apex: amp.initialize(O2, combine_grad) with the recipe's loss scale held fixed:
        Apex's dynamic scaler (it checks for overflow and skips) pinned by min = max = the
        scale. A static loss_scale would apply every step unchecked (Apex scaler.py:
        check_overflow_and_sync sets _has_overflow = False when not dynamic). Else unchanged."""
        if self.amp == 'apex':
            self._apex_optimizer = optimizer
            return self.apex_amp.initialize(model, optimizer, opt_level='O2', loss_scale='dynamic',
                                            dynamic_init_scale=self.loss_scale, min_loss_scale=self.loss_scale,
                                            max_loss_scale=self.loss_scale, combine_grad=True)
        return model, optimizer

    def zero_grad(self, optimizer):
        """Clear the gradients the way this optimizer accepts. Apex O2 replaces zero_grad by a
        function without arguments (npu.patch, _process_optimizer.py); torch_npu's fused
        optimizers refuse set_to_none=True, their gradients living in one combined buffer
        (torch_npu/optim/npu_fused_optim_base.py); elsewhere None frees the memory."""
        if self.amp == 'apex':
            optimizer.zero_grad()
        elif getattr(optimizer, 'is_fused_optimizer', False):
            optimizer.zero_grad(set_to_none=False)
        else:
            optimizer.zero_grad(set_to_none=True)

    def backward(self, loss, optimizer):
        if self.amp == 'apex':
            with self.apex_amp.scale_loss(loss, optimizer) as scaled:
                scaled.backward()
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer):
        """Apply the update. Returns False when the step was skipped because its gradients
        overflowed, which only the NPU's fp16 recipes report (skips_overflow); True otherwise
        (a CUDA GradScaler skips and backs off on its own, unreported, as before)."""
        if not self.skips_overflow:
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            return True
        before = self._applied
        if self.scaler is not None:
            self.scaler.step(optimizer)
            applied = self._applied > before
            if applied:
                self.scaler.update()
            else:  # put the recipe's scale back instead of backing off
                self.scaler.update(new_scale=float(self.loss_scale))
            return applied
        # Apex: scale_loss replaced optimizer.step by a one-shot skip if the gradients
        # overflowed (handle.py); calling it consumes the skip.
        optimizer.step()
        return self._applied > before

    def discard(self, optimizer):
        """Do not take this step (its loss is not finite): drop the gradients, and leave the
        scaler ready for the next one."""
        if self.amp == 'apex' and optimizer._amp_stash.already_patched:
            optimizer.step()  # consume Apex's pending skip, or it would skip the next real step
        elif self.skips_overflow and self.scaler is not None:
            self.scaler.update(new_scale=float(self.loss_scale))  # ends the iteration scale() began
        self.zero_grad(optimizer)

    def state_dict(self):
        """Loss-scaler state for checkpoints (empty when there is none). Under Apex O2 also the
        fp32 master weights: they live in the optimizer, and the model holds only their fp16
        copies, from which Apex would rebuild them (losing their low bits) on a resume."""
        if self.amp == 'apex':
            state = {'apex': self.apex_amp.state_dict()}
            masters = list(self.apex_amp.master_params(self._apex_optimizer))
            if not any(p.dtype == torch.float16 for p in masters):  # built at the first zero_grad
                state['apex_master_params'] = [p.detach() for p in masters]
            return state
        if self.scaler is not None:
            return {'scaler': self.scaler.state_dict()}
        return {}

    def load_state_dict(self, state, optimizer=None):
        """Restore state_dict(). Call it before optimizer.load_state_dict: under Apex O2 it first
        has Apex build its fp32 master weights (from the model's weights, already loaded) so that
        the optimizer's state lands on them in fp32, not on the fp16 parameters, then restores
        the saved masters exactly. ValueError when the saved masters do not fit."""
        if self.amp == 'apex':
            optimizer = optimizer if optimizer is not None else self._apex_optimizer
            optimizer.zero_grad()  # Apex's lazy init: masters replace the fp16 params in the optimizer
            saved = state.get('apex_master_params')
            if saved is not None:
                masters = list(self.apex_amp.master_params(optimizer))
                if len(saved) != len(masters) or any(s.shape != m.shape for s, m in zip(saved, masters)):
                    raise ValueError(f'{len(saved)} saved Apex master weights do not match the '
                                     f'{len(masters)} of this model')
                with torch.no_grad():
                    for master, value in zip(masters, saved):
                        master.copy_(value)
            if 'apex' in state:
                self.apex_amp.load_state_dict(state['apex'])
        elif self.scaler is not None and 'scaler' in state:
            saved = state['scaler']
            if self.skips_overflow:  # a checkpoint of the unchecked static scaler: keep the check
                saved = dict(saved, dynamic=True, growth_interval=NEVER)
            self.scaler.load_state_dict(saved)

    def share_cpu(self, num_workers, processes=1):
        """On the CPU device, leave a core to each data-loading worker: OpenMP threads that
        compete with busy workers for the same cores slow training down many times over. An
        OMP_NUM_THREADS set by the user (or a job scheduler) is a ceiling, never raised."""
        if self.type != 'cpu':
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        threads = max(1, cores // max(1, processes) - num_workers)
        ceiling = os.environ.get('OMP_NUM_THREADS', '')
        if ceiling.isdigit() and int(ceiling) > 0:
            threads = min(threads, int(ceiling))
        torch.set_num_threads(threads)
        return threads

    def synchronize(self):
        if self.type == 'cuda':
            torch.cuda.synchronize(self.device)
        elif self.type == 'npu':
            torch.npu.synchronize(self.device)

    def max_memory_gb(self):
        if self.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.type == 'npu':
            return torch.npu.max_memory_allocated(self.device) / 2 ** 30
        return None


def setup_device(name, device_id=0, amp='auto', amp_dtype='bf16', loss_scale=32.0, npu_jit_compile=False):
    """Resolve --device/--amp into a DeviceContext; DeviceUnavailable with one line if not possible.

    On the NPU, operators run precompiled (torch.npu.set_compile_mode(jit_compile=False), as
    the Ascend model zoo sets it) unless npu_jit_compile: jit compilation is torch_npu's default
    before the 910B (CheckJitDisableInner, framework/interface/EnvVariables.cpp) and would
    compile operators again for the matcher's per-batch shapes."""
    if name not in DEVICE_TYPES:
        raise DeviceUnavailable(f'unknown device {name!r}: choose gpu, npu or cpu')
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[amp_dtype]
    torch_npu = apex_amp = None
    if name == 'gpu':
        if not torch.cuda.is_available():
            raise DeviceUnavailable('--device gpu: no CUDA device is available to this PyTorch '
                                    f'({torch.__version__}); use --device cpu, or install a CUDA build')
        if device_id >= torch.cuda.device_count():
            raise DeviceUnavailable(f'--device_id {device_id}: only {torch.cuda.device_count()} CUDA device(s)')
        torch.cuda.set_device(device_id)
        device = torch.device('cuda', device_id)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if amp == 'apex':
            raise DeviceUnavailable('--amp apex is the Ascend Apex recipe; on GPU use --amp native or off')
        amp = 'native' if amp == 'auto' else amp
        if amp == 'native' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
    elif name == 'npu':
        torch_npu = _import_torch_npu()
        if not torch.npu.is_available():
            raise DeviceUnavailable('--device npu: torch_npu is installed but no NPU is available')
        device = torch.device('npu', device_id)
        torch.npu.set_device(device)
        torch.npu.set_compile_mode(jit_compile=npu_jit_compile)
        if amp in ('auto', 'apex'):
            apex = _import_optional('apex')
            apex_amp = getattr(apex, 'amp', None) if apex is not None else None
            if apex_amp is None and amp == 'apex':
                raise DeviceUnavailable("--amp apex needs Ascend's Apex (apex.amp, built from source: "
                                        'github.com/Ascend/apex; the apex on PyPI is another project), which '
                                        'is not installed; use --amp native')
            amp = 'apex' if apex_amp is not None else 'native'
        if amp == 'native' and dtype == torch.bfloat16 and not _npu_bf16(torch_npu):
            dtype = torch.float16
    else:
        device = torch.device('cpu')
        if amp == 'apex':
            raise DeviceUnavailable('--amp apex needs --device npu')
        amp = 'off' if amp == 'auto' else amp
    return DeviceContext(device, amp, dtype, loss_scale, apex_amp=apex_amp, torch_npu=torch_npu)


def _npu_bf16(torch_npu):
    check = getattr(getattr(torch_npu, 'npu', None), 'is_bf16_supported', None)
    return bool(check()) if callable(check) else False


# -- distributed ---------------------------------------------------------------------------


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not launched so."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ['RANK']), world, int(os.environ.get('LOCAL_RANK', '0'))


def init_distributed(device_type):
    """Join the process group started by torchrun (backend nccl, hccl or gloo by device).

    Under torchrun the keys of the group go under a prefix of their own per restart of the group
    (TORCHELASTIC_RESTART_COUNT): its agent keeps one store across restarts (c10d rendezvous,
    torch/distributed/rendezvous.py `_create_c10d_store` adds no prefix per attempt), and a
    restarted Gloo group could otherwise read the address of a process of the group before,
    which is dead ("Connection refused" in connectFullMesh; seen on torch 2.14 with
    --max_restarts)."""
    rank, world, local_rank = distributed_env()
    if world > 1 and not dist.is_initialized():
        attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
        if attempt is None:
            dist.init_process_group(backend=DIST_BACKENDS[device_type])
        else:
            store, _, _ = next(dist.rendezvous('env://'))
            dist.init_process_group(backend=DIST_BACKENDS[device_type], rank=rank, world_size=world,
                                    store=dist.PrefixStore(f'/s3fd/attempt_{attempt}', store))
    return rank, world, local_rank


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(values, device):
    """Sum a list of floats over all processes (identity when not distributed)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float32, device=device)  # float64 is not on every backend
    dist.all_reduce(t)
    return t.tolist()


def all_gather_floats(values, device):
    """Every process's list of floats (float32, as all_reduce_sum carries them), concatenated in
    rank order: an all-reduce of each process's values in its own slot, zeros elsewhere (x + 0 is
    exact). The list itself when not distributed."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.zeros(world, len(values), dtype=torch.float32, device=device)
    t[rank] = torch.tensor(values, dtype=torch.float32)
    dist.all_reduce(t)
    return t.flatten().tolist()


def cleanup_distributed(synchronize=False):
    """Destroy the process group. With `synchronize` (every process got here normally), first a
    barrier and a pause: Gloo on torch < 2.8 destroys its group holding the GIL while its
    worker threads may still be freeing the last collective's tensors, which needs the GIL,
    and the process then never exits (seen with torch 2.4-2.6). The barrier's wait and the
    pause release the GIL so that those threads finish. Free the DDP wrapper before this call,
    so that the group is destroyed here and not later with DDP's reducer."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
            time.sleep(0.05)
        dist.destroy_process_group()
