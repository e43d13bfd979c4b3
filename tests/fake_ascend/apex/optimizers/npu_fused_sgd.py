"""Re-implementation of Ascend Apex src/apex/optimizers/npu_fused_sgd.py.

* step() refuses to run unless the optimizer went through amp.initialize
  (RuntimeError 'apex.optimizers.NpuFusedSGD should be used with AMP.'): it steps amp's
  combined master params and grads, group by group (every parameter group).
* Momentum buffers: a parameter without one starts from its (weight-decayed) gradient, and a
  step where one was new does not decay the buffers first; the buffers are combined per group
  with Apex's aligned combine_npu.
* Same argument checks as torch's SGD (lr, momentum, weight_decay >= 0; Nesterov needs momentum
  and zero dampening).
"""
from collections import defaultdict

import torch
from torch.optim.optimizer import Optimizer, required

from apex.contrib.combine_tensors import combine_npu


class NpuFusedSGD(Optimizer):

    def __init__(self, params, lr=required, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        if lr is not required and lr < 0.0:
            raise ValueError(f'Invalid learning rate: {lr}')
        if momentum < 0.0:
            raise ValueError(f'Invalid momentum value: {momentum}')
        if weight_decay < 0.0:
            raise ValueError(f'Invalid weight_decay value: {weight_decay}')
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError('Nesterov momentum requires a momentum and zero dampening')
        self.is_npu_fused_optimizer = True
        self._momentum_buffer_already_in_state = False
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault('nesterov', False)

    def _buffer(self, p, weight_decay):
        state = self.state[p]
        if 'momentum_buffer' not in state:
            self._momentum_buffer_already_in_state = False
            grad = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
            state['momentum_buffer'] = grad.detach().clone()
        else:
            buffer = torch.empty_like(p.grad)
            buffer.copy_(state['momentum_buffer'])
            state['momentum_buffer'] = buffer
        return state['momentum_buffer']

    def _combine_param_states_by_group(self):
        stash = self._amp_stash
        if stash.param_states_are_combined_by_group:
            return
        stash.combined_param_states_indexed_by_group = []
        for group, lists in zip(self.param_groups, stash.params_lists_indexed_by_group):
            states = []
            for params in lists:
                combined = defaultdict(dict)
                combined['momentum_buffer'] = None
                if group['momentum'] != 0:
                    buffers = [self._buffer(p, group['weight_decay']) for p in params if p.grad is not None]
                    combined['momentum_buffer'] = combine_npu(buffers) if buffers else None
                states.append(combined)
            stash.combined_param_states_indexed_by_group.append(states)
        stash.param_states_are_combined_by_group = True

    def _group_step(self, index):
        group = self.param_groups[index]
        stash = self._amp_stash
        for param, grad, state in zip(stash.combined_params_indexed_by_group[index],
                                      stash.combined_grads_indexed_by_group[index],
                                      stash.combined_param_states_indexed_by_group[index]):
            if param is None or grad is None:
                continue
            if group['weight_decay'] != 0:
                grad = grad.add(param, alpha=group['weight_decay'])
            if group['momentum'] != 0:
                buffer = state['momentum_buffer']
                if self._momentum_buffer_already_in_state:
                    buffer.mul_(group['momentum']).add_(grad, alpha=1 - group['dampening'])
                grad = grad.add(buffer, alpha=group['momentum']) if group['nesterov'] else buffer
            param.add_(grad, alpha=-group['lr'])

    @torch.no_grad()
    def step(self, closure=None):
        if not hasattr(self, '_amp_stash'):
            raise RuntimeError('apex.optimizers.NpuFusedSGD should be used with AMP.')
        self._momentum_buffer_already_in_state = True
        self._check_already_combined_params_and_grads()
        self._combine_params_and_grads_by_group()
        self._combine_param_states_by_group()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index in range(len(self.param_groups)):
            self._group_step(index)
        return loss
