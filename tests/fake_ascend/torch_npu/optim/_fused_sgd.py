"""Re-implementation of torch_npu/optim/npu_fused_optim_base.py and npu_fused_sgd.py (torch_npu
2.1 to 2.14): the behaviour, the refusals and the order of operations, written anew.

* The parameters that have a gradient at the first step (or first zero_grad after a backward)
  are combined, per dtype (float32, float16; anything else is a TypeError), into one NPU buffer
  spanning every parameter group, and so are their gradients; each parameter and gradient then
  points into its buffer (npu_combine_tensors), and every group is a slice of it.
* zero_grad(set_to_none=True) raises ValueError("set_to_none is not supported in fused
  optimizers"): a gradient set to None would leave the combined buffer. zero_grad() zeroes the
  combined gradient buffers (or, before they exist, the gradients one by one).
* step() steps every parameter group (_group_step for each).
* SGD: the momentum buffer of a parameter without one is its (weight-decayed) gradient, and a
  step where any buffer was new does not decay the buffers first; the buffers are combined like
  the parameters.
"""
import math
from collections import defaultdict

import torch
from torch.optim.optimizer import Optimizer, required

import torch_npu
from torch_npu.utils import get_part_combined_tensor, npu_combine_tensors
from torch_npu.utils._error_code import ErrCode, pta_error

_DTYPES = (torch.float32, torch.float16)


class NpuFusedOptimizerBase(Optimizer):

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self.is_params_grads_combined = False
        self.is_states_combined = False
        self.is_fused_optimizer = True
        self.params_lists_indexed_by_group = []
        self.params_all_group_combined = [None, None]
        self.grads_all_group_combined = [None, None]
        self.combined_params_indexed_by_group = None
        self.combined_grads_indexed_by_group = None
        self.combined_param_states_indexed_by_group = None

    def _maybe_init_combined_params_and_grads(self):
        if self.is_params_grads_combined:
            return
        per_group = []  # [group][dtype index] -> params with a gradient
        for group in self.param_groups:
            lists = [[], []]
            for p in group['params']:
                if p.grad is None:
                    continue
                if p.dtype not in _DTYPES:
                    raise TypeError("Fused optimizer's parameters must be either float32 or float16, but received "
                                    f'{p.dtype}' + pta_error(ErrCode.TYPE))
                if torch_npu.get_npu_format(p) != torch_npu.get_npu_format(p.grad):
                    p.grad = torch_npu.npu_format_cast(p.grad, torch_npu.get_npu_format(p)).contiguous()
                lists[_DTYPES.index(p.dtype)].append(p)
            per_group.append(lists)
        self.params_lists_indexed_by_group = per_group
        for k in range(len(_DTYPES)):
            params = [p for lists in per_group for p in lists[k]]
            self.params_all_group_combined[k] = npu_combine_tensors(params)
            self.grads_all_group_combined[k] = npu_combine_tensors([p.grad for p in params])
        self.combined_params_indexed_by_group = []
        self.combined_grads_indexed_by_group = []
        param_at, grad_at = [0, 0], [0, 0]
        for lists in per_group:
            group_params, group_grads = [], []
            for k, params in enumerate(lists):
                param_size = sum(p.storage().size() for p in params)
                grad_size = sum(p.grad.storage().size() for p in params)
                group_params.append(get_part_combined_tensor(self.params_all_group_combined[k], param_at[k],
                                                             param_size))
                group_grads.append(get_part_combined_tensor(self.grads_all_group_combined[k], grad_at[k], grad_size))
                param_at[k] += param_size
                grad_at[k] += grad_size
            self.combined_params_indexed_by_group.append(group_params)
            self.combined_grads_indexed_by_group.append(group_grads)
        self.is_params_grads_combined = any(t is not None for t in self.params_all_group_combined)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._maybe_init_combined_params_and_grads()
        if not self.is_states_combined:
            self._maybe_init_combined_states()
        for index in range(len(self.param_groups)):
            self._group_step(index)
        return loss

    @torch.no_grad()
    def zero_grad(self, set_to_none=False):
        if set_to_none:
            raise ValueError('set_to_none is not supported in fused optimizers' + pta_error(ErrCode.VALUE))
        if not self.is_params_grads_combined:
            self._maybe_init_combined_params_and_grads()
        if not self.is_params_grads_combined:
            super().zero_grad(set_to_none=False)
            return
        for grads in self.grads_all_group_combined:
            if grads is not None:
                grads.zero_()

    def get_combined_params(self):
        return self.params_all_group_combined

    def get_combined_grads(self):
        return self.grads_all_group_combined

    def _maybe_init_combined_states(self):
        raise NotImplementedError(pta_error(ErrCode.NOT_SUPPORT))

    def _group_step(self, group_index):
        raise NotImplementedError(pta_error(ErrCode.NOT_SUPPORT))


class NpuFusedSGD(NpuFusedOptimizerBase):

    def __init__(self, params, lr=required, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        if lr is not required and lr < 0.0:
            raise ValueError(f'Invalid learning rate: {lr}' + pta_error(ErrCode.VALUE))
        if momentum < 0.0:
            raise ValueError(f'Invalid momentum value: {momentum}' + pta_error(ErrCode.VALUE))
        if weight_decay < 0.0:
            raise ValueError(f'Invalid weight_decay value: {weight_decay}' + pta_error(ErrCode.VALUE))
        if nesterov and (momentum <= 0.0 or not math.isclose(dampening, 0.0, abs_tol=1e-15)):
            raise ValueError('Nesterov momentum requires a momentum and zero dampening' + pta_error(ErrCode.VALUE))
        self._momentum_buffer_already_in_state = False
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault('nesterov', False)

    def _momentum_buffer_of(self, p, weight_decay):
        """The parameter's momentum buffer, as a fresh NPU tensor (to be combined)."""
        state = self.state[p]
        if 'momentum_buffer' in state:
            self._momentum_buffer_already_in_state = True
            buffer = torch.empty_like(p.grad)
            buffer.copy_(state['momentum_buffer'])
        else:
            self._momentum_buffer_already_in_state = False
            grad = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
            buffer = grad.detach().clone()
        state['momentum_buffer'] = buffer
        return buffer

    def _maybe_init_combined_states(self):
        if self.is_states_combined:
            return
        self.combined_param_states_indexed_by_group = []
        for group, lists in zip(self.param_groups, self.params_lists_indexed_by_group):
            states = []
            for params in lists:
                combined = defaultdict(dict)
                combined['momentum_buffer'] = None
                if group['momentum'] != 0:
                    buffers = [self._momentum_buffer_of(p, group['weight_decay']) for p in params if p.grad is not None]
                    combined['momentum_buffer'] = npu_combine_tensors(buffers) if buffers else None
                states.append(combined)
            self.combined_param_states_indexed_by_group.append(states)
        self.is_states_combined = any(s is not None for s in self.combined_param_states_indexed_by_group)

    def _group_step(self, group_index):
        group = self.param_groups[group_index]
        momentum, dampening = group['momentum'], group['dampening']
        for param, grad, state in zip(self.combined_params_indexed_by_group[group_index],
                                      self.combined_grads_indexed_by_group[group_index],
                                      self.combined_param_states_indexed_by_group[group_index]):
            if param is None or grad is None:
                continue
            if group['weight_decay'] != 0:
                grad = grad.add(param, alpha=group['weight_decay'])
            if momentum != 0:
                buffer = state['momentum_buffer']
                if self._momentum_buffer_already_in_state:
                    buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
                grad = grad.add(buffer, alpha=momentum) if group['nesterov'] else buffer
            param.add_(grad, alpha=-group['lr'])

    def step(self, closure=None):
        result = super().step(closure)
        self._momentum_buffer_already_in_state = True
        return result
