"""Re-implementation of torch_npu.npu.amp.GradScaler (torch_npu/npu/amp/grad_scaler.py, 2.14),
written anew from its behaviour.

* dynamic=True (default): unscale_ checks the gradients with _amp_foreach_non_finite_check_and_unscale_
  (and, before the 910B, clears the float-status flag in scale() first); an overflow skips
  optimizer.step() (printing "Gradient overflow. Skipping step") and update() multiplies the
  scale by backoff_factor; growth_interval clean steps multiply it by growth_factor.
* dynamic=False: unscale_ multiplies the gradients by 1/scale with no check, and step() always
  calls optimizer.step(): a static scale never skips a step by itself.
* A fused optimizer (`is_fused_optimizer`) is unscaled through its combined gradient buffers.
* Refused: outputs or master tensors not on the NPU, fp16 gradients of a non-fused optimizer,
  unscale_ twice or after step, step twice before update, closures, growth_factor <= 1,
  backoff_factor >= 1, loading an empty state.
"""
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.amp.grad_scaler import GradScaler as _TorchGradScaler
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state

import torch_npu
from torch_npu.utils._error_code import ErrCode, pta_error


class GradScaler(_TorchGradScaler):

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 dynamic=True, enabled=True):
        if enabled and not torch_npu.npu.is_available():
            warnings.warn('torch_npu.amp.GradScaler is enabled, but NPU is not available. Disabling.')
            enabled = False
        self._enabled = enabled
        if not enabled:
            return
        if growth_factor <= 1.0:
            raise ValueError('The growth factor must be > 1.0.' + pta_error(ErrCode.VALUE))
        if backoff_factor >= 1.0:
            raise ValueError('The backoff factor must be < 1.0.' + pta_error(ErrCode.VALUE))
        self._init_scale = init_scale
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._init_growth_tracker = 0
        self._dynamic = dynamic
        self._scale = None
        self._growth_tracker = None
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        self._has_overflow = False
        self._clear_overflow_flag = False
        self._dist_overflow_count = None

    # -- scaling -------------------------------------------------------------------------------

    def _host_scalar(self, value, dtype, device):
        return torch.full((), value, dtype=dtype).pin_memory().to(device, non_blocking=True)

    def scale(self, outputs):
        if not self._enabled:
            return outputs
        if self._dist_overflow_count is None:
            self._dist_overflow_count = torch.zeros(1).to('npu')
        if self._dynamic and not self._clear_overflow_flag:
            if not torch_npu.npu.utils.is_support_inf_nan():
                torch_npu.npu.utils.clear_npu_overflow_flag()
            self._clear_overflow_flag = True

        def apply(value):
            if isinstance(value, torch.Tensor):
                if not value.is_npu:
                    raise ValueError('Device type of outputs should be npu.' + pta_error(ErrCode.VALUE))
                if self._scale is None:
                    self._scale = self._host_scalar(self._init_scale, torch.float32, value.device)
                    self._growth_tracker = self._host_scalar(self._init_growth_tracker, torch.int32, value.device)
                return value * self._scale
            if isinstance(value, (list, tuple)):
                return type(value)(apply(v) for v in value)
            raise TypeError('outputs must be a Tensor or an iterable of Tensors' + pta_error(ErrCode.TYPE))

        return apply(outputs)

    def _gradients(self, optimizer):
        if getattr(optimizer, 'is_fused_optimizer', False):
            if not optimizer.is_params_grads_combined:
                optimizer._maybe_init_combined_params_and_grads()
            return [g for g in optimizer.grads_all_group_combined if g is not None]
        grads = []
        for group in optimizer.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                if p.grad.dtype == torch.float16:
                    raise TypeError('Attempting to unscale FP16 gradients.' + pta_error(ErrCode.TYPE))
                grads.append(p.grad)
        return grads

    def unscale_(self, optimizer):
        if not self._enabled:
            return
        self._check_scale_growth_tracker('unscale_')
        state = self._per_optimizer_states[id(optimizer)]
        if state['stage'] is OptState.UNSCALED:
            raise RuntimeError('unscale_() has already been called on this optimizer since the last update().'
                               + pta_error(ErrCode.INTERNAL))
        if state['stage'] is OptState.STEPPED:
            raise RuntimeError('unscale_() is being called after step().' + pta_error(ErrCode.INTERNAL))
        inv_scale = self._scale.float().reciprocal()
        found_inf = self._host_scalar(0.0, torch.float32, self._scale.device)
        with torch.no_grad():
            by_dtype = defaultdict(list)
            for grad in self._gradients(optimizer):
                by_dtype[grad.dtype].append(grad)
            for grads in by_dtype.values():
                if self._dynamic:
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
                    if found_inf.item() > 0:
                        self._has_overflow = True
                else:
                    for grad in grads:
                        grad.mul_(inv_scale)
            self._sync_overflow_across_processes()
            if self._has_overflow:
                found_inf.add_(1)
        state['found_inf_per_device'] = {found_inf.device: found_inf}
        state['stage'] = OptState.UNSCALED

    def _sync_overflow_across_processes(self):
        if torch_npu.npu.utils.is_support_inf_nan() or not self._dynamic or not dist.is_initialized():
            return
        self._dist_overflow_count.add_(1 if self._has_overflow else 0)
        dist.all_reduce(self._dist_overflow_count)
        if self._dist_overflow_count.item() != 0:
            self._has_overflow = True
        self._dist_overflow_count.zero_()

    def step(self, optimizer, *args, **kwargs):
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if 'closure' in kwargs:
            raise RuntimeError('Closure use is not currently supported if GradScaler is enabled.'
                               + pta_error(ErrCode.NOT_SUPPORT))
        self._check_scale_growth_tracker('step')
        state = self._per_optimizer_states[id(optimizer)]
        if state['stage'] is OptState.STEPPED:
            raise RuntimeError('step() has already been called since the last update().' + pta_error(ErrCode.INTERNAL))
        if state['stage'] is OptState.READY:
            self.unscale_(optimizer)
        if not state['found_inf_per_device']:
            raise RuntimeError('No inf checks were recorded for this optimizer.' + pta_error(ErrCode.INTERNAL))
        result = None
        if not self._dynamic:
            result = optimizer.step(*args, **kwargs)
        elif not sum(v.item() for v in state['found_inf_per_device'].values()) and not self._has_overflow:
            result = optimizer.step(*args, **kwargs)
        else:
            print('Gradient overflow. Skipping step')
        state['stage'] = OptState.STEPPED
        return result

    def update(self, new_scale=None):
        if not self._enabled:
            return
        scale, _ = self._check_scale_growth_tracker('update')
        if new_scale is not None:
            if isinstance(new_scale, float):
                self._scale = self._host_scalar(new_scale, torch.float32, scale.device)
            else:
                reason = 'new_scale should be a float or a 1-element torch.npu.FloatTensor with requires_grad=False.'
                if not (isinstance(new_scale, torch.Tensor) and new_scale.is_npu
                        and new_scale.dtype == torch.float32):
                    raise TypeError(reason + pta_error(ErrCode.TYPE))
                if new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError(reason + pta_error(ErrCode.VALUE))
                self._scale = new_scale
        elif self._dynamic:
            if self._has_overflow:
                self._scale.mul_(self._backoff_factor)
                self._growth_tracker.zero_()
                print(f'Loss scaler reducing loss scale to {self._scale.item()}')
            else:
                self._growth_tracker.add_(1)
                if self._growth_tracker.item() == self._growth_interval:
                    grown = self._scale * self._growth_factor
                    if not torch.isinf(grown):
                        self._scale = grown
                    self._growth_tracker.zero_()
                    print(f'Loss scaler increasing loss scale to {self._scale.item()}')
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        self._has_overflow = False
        self._clear_overflow_flag = False

    def state_dict(self):
        state = super().state_dict()
        if self._enabled:
            state['dynamic'] = self._dynamic
        return state

    def load_state_dict(self, state_dict):
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError('The source state dict is empty, possibly because it was saved from a disabled '
                               'instance of GradScaler.' + pta_error(ErrCode.VALUE))
        super().load_state_dict(state_dict)
        self._dynamic = state_dict['dynamic']
