"""Device, mixed precision, optimizer and distributed set-up: every such choice lives here.

    runtime = setup_device('gpu'|'npu'|'cpu', device_id, amp='auto'|'apex'|'native'|'off',
                           amp_dtype='bf16'|'fp16', loss_scale=None|32.0|'dynamic', npu_jit_compile=False,
                           combine_ddp=False)
    model.to(runtime.device)
    optimizer = runtime.make_optimizer(model.parameters(), lr, momentum, weight_decay)
    model, optimizer = runtime.initialize(model, optimizer)      # Ascend Apex O2, else unchanged
    net = runtime.wrap_distributed(model, world_size)            # DDP under torchrun (not with combine_ddp)
    runtime.zero_grad(optimizer)                                # as this optimizer accepts it
    with runtime.autocast():
        loss = ...
    runtime.backward(loss, optimizer)                           # loss scaling handled here
    applied = runtime.step(optimizer)                           # False: an overflowing step was skipped
    # or, for a step not to take (non-finite loss): runtime.discard(optimizer)
    message = runtime.loss_scale_change()                       # at a log step: the scale, when it changed

`runtime.notes`: lines for the log about choices made for the user (e.g. --amp auto not using an Apex).

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
                            "CANN's environment first (source /usr/local/Ascend/cann/set_env.sh with CANN 9.1, "
                            '/usr/local/Ascend/ascend-toolkit/set_env.sh with 9.0 and earlier)') from None


# The NPU recipe's static loss scale (Ascend model zoo: amp.initialize(..., loss_scale=32.0)).
RECIPE_LOSS_SCALE = 32.0


class Runtime:
    """The run's device and precision: what the training loop needs to know about them (made by
    setup_device; train.py and the engine call it `runtime`).

    Attributes: device (torch.device), type ('cuda', 'npu', 'cpu'), amp ('apex', 'native',
    'off'), amp_dtype (torch dtype under autocast or None), scaler (GradScaler or None),
    apex_amp (the apex.amp module when amp == 'apex'), loss_scale (the NPU fp16 loss scale:
    a number, static, or 'dynamic'), combine_ddp (Apex's own data parallelism), notes (lines
    for the log).

    The NPU's fp16 loss scale: static (the recipe's 32 unless --loss_scale says otherwise)
    is upstream's dynamic scaler pinned at that value, so that a step whose gradients overflow
    is skipped (upstream's static mode applies it unchecked); 'dynamic' is the library's dynamic
    scaler with its own defaults. Either way the overflow check reads a flag on the host every
    step (one synchronisation).
    """

    def __init__(self, device, amp, amp_dtype, loss_scale=None, apex_amp=None, torch_npu=None,
                 combine_ddp=False, notes=()):
        self.device = device
        self.type = device.type
        self.amp = amp
        self.amp_dtype = amp_dtype if amp == 'native' else None
        self.loss_scale_given = loss_scale is not None  # else a resume keeps the checkpoint's
        self.loss_scale = RECIPE_LOSS_SCALE if loss_scale is None else loss_scale
        self.apex_amp = apex_amp
        self.torch_npu = torch_npu
        self.combine_ddp = combine_ddp
        self.notes = list(notes)
        self.pin_memory = pins_host_memory(self.type)
        self.scaler = None
        # Whether step() skips a step whose gradients overflowed and says so: the NPU's fp16
        # recipes (see step()).
        self.skips_overflow = amp == 'apex'
        if amp == 'native' and amp_dtype == torch.float16:
            if self.type == 'npu':
                self.scaler = self._npu_grad_scaler()
                self.skips_overflow = True
            else:
                self.scaler = torch.amp.GradScaler(self.type)
        self.overflow_scale = None  # the loss scale of the last step skipped for overflowing gradients
        self._reported_scale = None  # the scale loss_scale_change() last reported
        self._applied = 0  # optimizer steps actually taken, counted by a post-step hook

    @property
    def dynamic(self):
        return self.loss_scale == 'dynamic'

    def _npu_grad_scaler(self):
        """torch_npu's GradScaler for --loss_scale. Static: init_scale = the scale and no growth,
        in its dynamic mode, so that it checks for overflow (with dynamic=False it unscales without
        a check and always steps: torch_npu/npu/amp/grad_scaler.py, _unscale_grads_, step); step()
        puts the scale back after a skip. 'dynamic': GradScaler(dynamic=True) with its defaults.
        In dynamic mode it finds overflows from the gradients (inf/nan mode, 910B and later) or,
        before the 910B, from the float-status flag, which it then all-reduces so that every
        process skips together (_sync_dist_overflow_count); on the 910B the processes agree
        because DDP averaged their gradients (an inf reaches every process)."""
        if self.dynamic:
            return self.torch_npu.npu.amp.GradScaler(dynamic=True)
        return self.torch_npu.npu.amp.GradScaler(init_scale=self.loss_scale, growth_interval=NEVER)

    def describe(self):
        if self.amp == 'off':
            return f'{self.device} | float32'
        scale = 'dynamic loss scale' if self.dynamic else f'loss scale {self.loss_scale:g}'
        if self.amp == 'apex':
            return f'{self.device} | Apex O2 ({scale}{", combine_ddp" if self.combine_ddp else ""})'
        precision = f'autocast {str(self.amp_dtype).replace("torch.", "")}'
        if self.scaler is not None:
            precision += f' + GradScaler ({scale})' if self.type == 'npu' else ' + GradScaler'
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
        """Ascend Apex: amp.initialize(O2, combine_grad, and combine_ddp when asked). A static scale
        is Apex's dynamic scaler (it checks for overflow and skips) pinned by min = max = the
        scale: Apex's static loss_scale would apply every step unchecked (scaler.py:
        check_overflow_and_sync sets _has_overflow = False when not dynamic). 'dynamic' is Apex's
        dynamic scaler with its own defaults. With combine_ddp Apex broadcasts rank 0's weights
        here and all-reduces the combined gradients itself (no DistributedDataParallel). Else
        unchanged."""
        if self.amp != 'apex':
            return model, optimizer
        self._apex_optimizer = optimizer
        scale = {} if self.dynamic else {'dynamic_init_scale': self.loss_scale, 'min_loss_scale': self.loss_scale,
                                         'max_loss_scale': self.loss_scale}
        ddp = {'combine_ddp': True} if self.combine_ddp else {}
        # verbosity=0: Apex's option listing and skip messages would print on every process; the
        # training log reports skipped steps and scale changes itself.
        return self.apex_amp.initialize(model, optimizer, opt_level='O2', loss_scale='dynamic', combine_grad=True,
                                        verbosity=0, **scale, **ddp)

    def wrap_distributed(self, net, world_size):
        """The network the loop runs: DistributedDataParallel under torchrun (after initialize, as
        Apex requires), except with combine_ddp, where Apex exchanges the gradients itself."""
        if world_size <= 1 or self.combine_ddp:
            return net
        ids = [self.device.index] if self.type in ('cuda', 'npu') else None
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)

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

    def _apex_scale(self):
        return float(self.apex_amp.state_dict()['loss_scaler0']['loss_scale'])

    def backward(self, loss, optimizer):
        if self.amp == 'apex':
            self._backward_scale = self._apex_scale()  # scale_loss backs off on exit after an overflow
            with self.apex_amp.scale_loss(loss, optimizer) as scaled:
                scaled.backward()
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer):
        """Apply the update. Returns False when the step was skipped because its gradients
        overflowed, which only the NPU's fp16 recipes report (skips_overflow; the scale it
        overflowed at is then `overflow_scale`); True otherwise (a CUDA GradScaler skips and
        backs off on its own, unreported, as before)."""
        if not self.skips_overflow:
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            return True
        before = self._applied
        if self.scaler is not None:
            self.scaler.step(optimizer)  # reads the overflow flag on the host
            applied = self._applied > before
            if applied:
                self.scaler.update()
            else:
                self.overflow_scale = self.scaler.get_scale()
                # a static scale is put back instead of backing off
                self.scaler.update(**({} if self.dynamic else {'new_scale': float(self.loss_scale)}))
            return applied
        # Apex: scale_loss replaced optimizer.step by a one-shot skip if the gradients
        # overflowed (handle.py); calling it consumes the skip.
        optimizer.step()
        applied = self._applied > before
        if not applied:
            self.overflow_scale = self._backward_scale
        return applied

    def discard(self, optimizer):
        """Do not take this step (its loss is not finite): drop the gradients, and leave the
        scaler ready for the next one."""
        if self.amp == 'apex' and optimizer._amp_stash.already_patched:
            optimizer.step()  # consume Apex's pending skip, or it would skip the next real step
        elif self.skips_overflow and self.scaler is not None:
            # ends the iteration scale() began, at the scale it had
            self.scaler.update(new_scale=float(self.loss_scale) if not self.dynamic else self.scaler.get_scale())
        self.zero_grad(optimizer)

    def current_loss_scale(self):
        """The NPU fp16 loss scale now (None without one). Reads the scale on the host: a
        synchronisation with torch_npu's GradScaler."""
        if self.amp == 'apex':
            return self._apex_scale()
        if self.skips_overflow and self.scaler is not None:
            return float(self.scaler.get_scale())
        return None

    def loss_scale_change(self):
        """A log line with the NPU fp16 loss scale when it differs from the one last reported
        (the first call reports only a dynamic scale), else None. Meant for log steps: it reads
        the scale on the host."""
        scale = self.current_loss_scale()
        previous, self._reported_scale = self._reported_scale, scale
        if scale is None or scale == previous or (previous is None and not self.dynamic):
            return None
        return f'->>loss scale:{scale:g}' + (f' (was {previous:g})' if previous is not None else ' (dynamic)')

    def _scale_state(self):
        return {'mode': 'dynamic' if self.dynamic else 'static', 'scale': self.current_loss_scale()}

    def state_dict(self):
        """Loss-scaler state for checkpoints (empty when there is none): the library's own, and
        'loss_scale' {'mode': 'static'|'dynamic', 'scale': the scale reached}. Under Apex O2 also
        the fp32 master weights: they live in the optimizer, and the model holds only their fp16
        copies, from which Apex would rebuild them (losing their low bits) on a resume."""
        if self.amp == 'apex':
            state = {'apex': self.apex_amp.state_dict(), 'loss_scale': self._scale_state()}
            masters = list(self.apex_amp.master_params(self._apex_optimizer))
            if not any(p.dtype == torch.float16 for p in masters):  # built at the first zero_grad
                state['apex_master_params'] = [p.detach() for p in masters]
            return state
        if self.scaler is not None:
            state = {'scaler': self.scaler.state_dict()}
            if self.skips_overflow:
                state['loss_scale'] = self._scale_state()
            return state
        return {}

    def load_state_dict(self, state, optimizer=None):
        """Restore state_dict(). Call it before optimizer.load_state_dict: under Apex O2 it first
        has Apex build its fp32 master weights (from the model's weights, already loaded) so that
        the optimizer's state lands on them in fp32, not on the fp16 parameters, then restores
        the saved masters exactly. ValueError when the saved masters do not fit.

        The loss scale: without a --loss_scale of its own, the run continues in the checkpoint's
        mode at the scale it had reached; a --loss_scale that differs from the checkpoint's starts
        afresh at its own. Returns a line for the log when the scale differs from this run's
        option (None when the run simply continues)."""
        load, message = self._resolve_scale(state)
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
            if 'apex' in state and load:
                self.apex_amp.load_state_dict(state['apex'])
        elif self.scaler is not None and 'scaler' in state and load:
            saved = state['scaler']
            if self.skips_overflow and not self.dynamic:
                # the pinned scaler, also for a checkpoint of the unchecked static scaler
                saved = dict(saved, dynamic=True, growth_interval=NEVER)
            self.scaler.load_state_dict(saved)
        if self.skips_overflow:
            self._reported_scale = self.current_loss_scale()
        return message

    def _resolve_scale(self, state):
        """Settle the loss scale for a resume from `state`: adopt the checkpoint's mode when this run
        did not ask for one, else keep this run's. Returns (whether to load the saved scaler state,
        a log line or None)."""
        if not self.skips_overflow:
            return True, None
        saved = state.get('loss_scale')
        if not isinstance(saved, dict):  # a checkpoint from before the dynamic mode: always static
            saved = {'mode': 'static', 'scale': self._saved_scale(state)}
        mode, scale = saved.get('mode'), saved.get('scale')
        if mode not in ('static', 'dynamic') or not isinstance(scale, (int, float)):
            return True, None
        if mode == ('dynamic' if self.dynamic else 'static') and (self.dynamic or scale == self.loss_scale):
            return True, None
        before = f'a dynamic loss scale, at {scale:g}' if mode == 'dynamic' else f'the static loss scale {scale:g}'
        if self.loss_scale_given:
            option = 'dynamic' if self.dynamic else format(self.loss_scale, 'g')
            return False, (f'--loss_scale {option}: the checkpoint has {before}; '
                           f'starting at {self.current_loss_scale():g}')
        self.loss_scale = 'dynamic' if mode == 'dynamic' else float(scale)
        self._configure_scaler()
        return True, f'Loss scale: continuing the checkpoint\'s, {before}'

    @staticmethod
    def _saved_scale(state):
        if isinstance(state.get('apex'), dict) and isinstance(state['apex'].get('loss_scaler0'), dict):
            return state['apex']['loss_scaler0'].get('loss_scale')
        if isinstance(state.get('scaler'), dict):
            return state['scaler'].get('scale')
        return None

    def _configure_scaler(self):
        """Rebuild the loss scaler for self.loss_scale (adopted from a checkpoint), before its state
        is loaded. Apex: a new scaler of Apex's own class, as amp.initialize builds it, with
        initialize's defaults for a dynamic one (its signature)."""
        if self.amp != 'apex':
            self.scaler = self._npu_grad_scaler()
            return
        import inspect
        defaults = {name: p.default for name, p in inspect.signature(self.apex_amp.initialize).parameters.items()}
        scalers = self.apex_amp._amp_state.loss_scalers
        kind = type(scalers[0])
        if self.dynamic:
            options = {name: defaults[name] for name in ('scale_growth_factor', 'scale_backoff_factor',
                                                         'scale_window', 'min_loss_scale', 'max_loss_scale')}
            options['init_scale'] = defaults['dynamic_init_scale']
        else:
            options = {'init_scale': self.loss_scale, 'min_loss_scale': self.loss_scale,
                       'max_loss_scale': self.loss_scale}
        scalers[:] = [kind('dynamic', **options) for _ in scalers]

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


def setup_device(name, device_id=0, amp='auto', amp_dtype='bf16', loss_scale=None, npu_jit_compile=False,
                 combine_ddp=False):
    """Resolve --device/--amp into a Runtime; DeviceUnavailable with one line if not possible.

    On the NPU, operators run precompiled (torch.npu.set_compile_mode(jit_compile=False), as
    the Ascend model zoo sets it) unless npu_jit_compile: jit compilation is torch_npu's default
    before the 910B (CheckJitDisableInner, framework/interface/EnvVariables.cpp) and would
    compile operators again for the matcher's per-batch shapes. `--amp auto` uses Ascend's
    Apex when it imports and is Ascend's (else native autocast, with a line in runtime.notes saying
    why). loss_scale: None (the recipe's static 32, or on a resume the checkpoint's), a number
    (static) or 'dynamic'; it applies to the NPU's fp16 recipes. combine_ddp: Apex's own data
    parallelism instead of DistributedDataParallel (NPU, Apex, torchrun with several processes)."""
    if name not in DEVICE_TYPES:
        raise DeviceUnavailable(f'unknown device {name!r}: choose gpu, npu or cpu')
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[amp_dtype]
    torch_npu = apex_amp = None
    notes = []
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
        why_not = None
        if amp in ('auto', 'apex'):
            apex_amp, why_not = _ascend_apex()
            if apex_amp is None and amp == 'apex':
                raise DeviceUnavailable(f"--amp apex needs Ascend's Apex (built from source: github.com/Ascend/apex; "
                                        f'the apex on PyPI is another project): {why_not}; use --amp native')
            amp = 'apex' if apex_amp is not None else 'native'
        if amp == 'native' and dtype == torch.bfloat16 and not _npu_bf16(torch_npu):
            dtype = torch.float16
        if why_not is not None and amp == 'native':
            notes.append(f'--amp auto: not using Apex ({why_not}); torch.autocast '
                         f'{str(dtype).replace("torch.", "")} instead')
    else:
        device = torch.device('cpu')
        if amp == 'apex':
            raise DeviceUnavailable('--amp apex needs --device npu')
        amp = 'off' if amp == 'auto' else amp
    if combine_ddp:
        if amp != 'apex':
            raise DeviceUnavailable("--combine_ddp is Ascend Apex's data parallelism: it needs --device npu with "
                                    'Apex O2 (--amp apex, or auto with Apex installed)')
        if distributed_env()[1] <= 1:
            raise DeviceUnavailable('--combine_ddp exchanges gradients between processes: run it under torchrun '
                                    'with more than one process')
    return Runtime(device, amp, dtype, loss_scale, apex_amp=apex_amp, torch_npu=torch_npu,
                         combine_ddp=combine_ddp, notes=notes)


def _ascend_apex():
    """(apex.amp, None) when Ascend's Apex imports, else (None, why not in a few words): not
    installed, failing to import (with any exception: a broken build, a CUDA-only extension,
    ...), another project named apex (PyPI's), or NVIDIA's Apex, whose amp.initialize has no
    combine_grad (Ascend's npu.patch adds it)."""
    try:
        importlib.import_module('apex')
    except ModuleNotFoundError as e:
        if e.name == 'apex':
            return None, 'apex is not installed'
        return None, f'import apex failed: {_first_line(e)}'
    except Exception as e:  # noqa: BLE001 - any failure of a third-party import means: not usable
        return None, f'import apex failed: {_first_line(e)}'
    try:
        apex_amp = importlib.import_module('apex.amp')
    except Exception as e:  # noqa: BLE001
        return None, f'the installed apex has no usable apex.amp ({_first_line(e)}): not Ascend\'s Apex'
    import inspect
    try:
        parameters = inspect.signature(apex_amp.initialize).parameters
    except (AttributeError, TypeError, ValueError):
        return None, "the installed apex.amp has no initialize(): not Ascend's Apex"
    if 'combine_grad' not in parameters:
        return None, "the installed apex is NVIDIA's (its amp.initialize has no combine_grad), not Ascend's"
    return apex_amp, None


def _first_line(error):
    text = str(error).strip()
    return f'{type(error).__name__}: {text.splitlines()[0]}' if text else type(error).__name__


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
