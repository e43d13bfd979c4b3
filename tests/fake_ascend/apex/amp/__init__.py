"""Test-only fake of Ascend Apex's amp (github.com/Ascend/apex, patch/npu.patch applied to NVIDIA
apex 4ef930c; master branch), re-implemented from its behaviour for what this repository uses:
opt_level O2 (fp16 model, fp32 master weights in the optimizer), static or dynamic loss scale,
combine_grad, the NPU fused optimizers. Other opt_levels are not emulated (NotImplementedError).

Sources, all in patch/npu.patch unless said otherwise:
* frontend.py initialize(): O2 = cast_model_type fp16, keep_batchnorm_fp32, master_weights,
  dynamic loss scale unless loss_scale is given; the Ascend arguments dynamic_init_scale,
  scale_growth_factor, scale_backoff_factor, scale_window, combine_grad, ...; combine_grad only
  with O1/O2.
* _initialize.py: models must be on the NPU and not yet fp16, and not wrapped by
  DistributedDataParallel ("Parallel wrappers should only be applied to the model(s) AFTER the
  model(s) have been returned from amp.initialize", NVIDIA check_models); forward patched to cast
  floating inputs to fp16 and outputs to fp32; with combine_grad or a fused optimizer,
  torch.nn.Module.zero_grad is replaced by one that asserts set_to_none is False.
* _process_optimizer.py: an optimizer goes through initialize once; with O2 and combine_grad or
  a fused optimizer, master_weights must be True; the fp32 master copies replace the fp16
  parameters in the optimizer at the first zero_grad/backward (lazy init), each parameter's
  state moving with it; optimizer.zero_grad is replaced by a method WITHOUT arguments; step()
  copies the masters into the fp16 model; at the first backward the fp16 grads, master grads and
  (fused optimizer) master params are combined into aligned NPU buffers (combine_npu).
* handle.py scale_loss(): prepares the backward, clears the float status first when the scale
  is dynamic and the NPU has no inf/nan mode, yields loss.float() * scale, then checks overflow,
  unscales into the master grads, updates the scale, and on overflow replaces optimizer.step by a
  one-shot skip ("Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to ..."),
  marked by optimizer._amp_stash.already_patched.
* scaler.py LossScaler: a static scale never reports an overflow (check_overflow_and_sync sets
  _has_overflow = False, check_grads_overflow_with_inf returns False); a dynamic one checks the
  fp16 grads (inf/nan mode) or the float-status flag (before the 910B), backs off to
  max(min_loss_scale, scale * backoff), grows after scale_window clean steps up to max_loss_scale.
* amp.py / _amp_state.py: state_dict() = {'loss_scaler<i>': {'loss_scale', 'unskipped'}};
  load_state_dict refuses keys that are not loss scalers; master_params(optimizer).
"""
import contextlib
import types
import warnings
from collections import OrderedDict

import torch
import torch.distributed as dist

import torch_npu
from apex.contrib.combine_tensors import combine_npu


class _AmpState:
    def __init__(self):
        self.loss_scalers = []
        self.opt_properties = None


_amp_state = _AmpState()


def _warn_or_err(message):
    # Apex's _amp_state.py: a warning only under hard_override, which nothing here sets.
    raise RuntimeError(message)


def master_params(optimizer):
    for group in optimizer.param_groups:
        for p in group['params']:
            yield p


# -- loss scaler (scaler.py) --------------------------------------------------------------------

class LossScaler:

    def __init__(self, loss_scale, init_scale=2. ** 16, scale_growth_factor=2., scale_backoff_factor=0.5,
                 scale_window=2000, min_loss_scale=None, max_loss_scale=2. ** 24):
        self._is_support_inf_nan = torch_npu.npu.utils.is_support_inf_nan()
        self.dynamic = loss_scale == 'dynamic'
        self._loss_scale = min(max_loss_scale, init_scale) if self.dynamic else loss_scale
        self._max_loss_scale = max_loss_scale
        self._min_loss_scale = min_loss_scale
        self._scale_growth_factor = scale_growth_factor
        self._scale_backoff_factor = scale_backoff_factor
        self._scale_seq_len = scale_window
        self._unskipped = 0
        self._has_overflow = False
        self._overflow_checked = False
        self._overflow_buf = torch.zeros(1).npu()
        self._dist_overflow_count = torch.zeros(1).npu()
        self._dist_initialized = dist.is_available() and dist.is_initialized()

    def loss_scale(self):
        return self._loss_scale

    def clear_overflow_state(self):
        self._has_overflow = False
        self._overflow_checked = False

    def check_overflow_and_sync(self):
        if self.dynamic and self._is_support_inf_nan:
            return
        if not self.dynamic:
            self._has_overflow = False
            return
        if not self._overflow_checked:
            self._has_overflow = torch_npu.npu.get_npu_overflow_flag()
            self._overflow_checked = True
        if self._dist_initialized:
            self._dist_overflow_count.add_(1 if self._has_overflow else 0)
            dist.all_reduce(self._dist_overflow_count)
            if self._dist_overflow_count.item() != 0:
                self._has_overflow = True
            self._dist_overflow_count.zero_()

    def check_grads_overflow_with_inf(self, model_grads):
        if not self.dynamic or not self._is_support_inf_nan:
            return False
        grads = [g for g in model_grads if g is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self._overflow_buf, torch.tensor(1.).npu())
        self._has_overflow = self._overflow_buf.item() > 0
        self._overflow_buf.zero_()
        return self._has_overflow

    def unscale_grad_O2(self, model_grads_combined=None, stashed_master_grads_combined=None,
                        master_grads_combined=None, master_grads=None, model_grads=None):
        if master_grads_combined is None or self._has_overflow:
            return
        if model_grads is not None and self.check_grads_overflow_with_inf(model_grads):
            return
        if stashed_master_grads_combined is not None \
                and stashed_master_grads_combined.data_ptr() == master_grads_combined.data_ptr():
            stashed_master_grads_combined = master_grads_combined.clone()
        if master_grads_combined is not model_grads_combined:
            if master_grads_combined.numel() == model_grads_combined.numel():
                master_grads_combined.copy_(model_grads_combined)
            else:
                for master, model in zip(master_grads, model_grads):
                    master.copy_(model)
        master_grads_combined.mul_(1.0 / self._loss_scale)
        if stashed_master_grads_combined is not None:
            master_grads_combined.add_(stashed_master_grads_combined)

    def update_scale(self):
        if self._has_overflow and self.dynamic:
            backed_off = self._loss_scale * self._scale_backoff_factor
            self._loss_scale = max(self._min_loss_scale, backed_off) if self._min_loss_scale else backed_off
            self._unskipped = 0
            skip = True
        else:
            self._unskipped += 1
            skip = False
        if self._unskipped == self._scale_seq_len and self.dynamic:
            self._loss_scale = min(self._max_loss_scale, self._loss_scale * self._scale_growth_factor)
            self._unskipped = 0
        return skip


# -- optimizer processing (_process_optimizer.py, O2 with master weights) ---------------------------

class _Stash:
    pass


def _lazy_init(self):
    stash = self._amp_stash
    if stash.lazy_init_called:
        return
    stash.fp16_groups, stash.fp32_from_fp16_groups, stash.fp32_from_fp32_groups = [], [], []
    for group in self.param_groups:
        fp16, masters, fp32 = [], [], []
        for i, param in enumerate(group['params']):
            if not param.requires_grad:
                continue
            if param.type() == 'torch.npu.HalfTensor':
                master = param.detach().clone().float()
                master.requires_grad = True
                group['params'][i] = master
                fp16.append(param)
                masters.append(master)
                if param in self.state:
                    self.state[master] = self.state.pop(param)
            elif param.type() == 'torch.npu.FloatTensor':
                fp32.append(param)
            else:
                raise TypeError("Optimizer's parameters must be either torch.cuda.FloatTensor or "
                                f'torch.cuda.HalfTensor. Received {param.type()}')
        stash.fp16_groups.append(fp16)
        stash.fp32_from_fp16_groups.append(masters)
        stash.fp32_from_fp32_groups.append(fp32)
    stash.all_fp16_params = [p for g in stash.fp16_groups for p in g]
    stash.all_fp32_from_fp16_params = [p for g in stash.fp32_from_fp16_groups for p in g]
    stash.all_fp32_from_fp32_params = [p for g in stash.fp32_from_fp32_groups for p in g]
    stash.all_fp32_from_fp32_grad_stash = [None] * len(stash.all_fp32_from_fp32_params)
    for p in stash.all_fp32_from_fp16_params + stash.all_fp32_from_fp32_params:
        p.grad = None
    for name in ('main_fp16_grad_combine', 'main_fp32_from_fp16_grad_combine', 'main_fp32_from_fp32_grad_combine',
                 'all_fp32_from_fp32_grad_stash_combine', 'main_fp32_from_fp16_param_combine',
                 'main_fp32_from_fp32_param_combine'):
        setattr(stash, name, None)
    stash.fp16_grad_list, stash.fp32_from_fp16_grad_list, stash.fp32_from_fp32_grad_list = [], [], []
    # recast per-parameter state tensors to the masters' dtype
    self.load_state_dict(self.state_dict())
    stash.lazy_init_called = True


def _combined_grads(params):
    if params and params[0].grad is not None:
        grads = [p.grad for p in params if p.requires_grad]
        return combine_npu(grads), grads
    return None, []


@torch.no_grad()
def _combined_init(self):
    stash = self._amp_stash
    if stash.already_combined or not (self.accelerate or self.is_npu_fused_optimizer):
        return
    stash.all_fp32_from_fp32_params = [p for p in stash.all_fp32_from_fp32_params if p.grad is not None]
    stash.all_fp32_from_fp32_grad_stash = [torch.zeros_like(p.grad) for p in stash.all_fp32_from_fp32_params]
    if stash.all_fp32_from_fp32_grad_stash:
        stash.all_fp32_from_fp32_grad_stash_combine = combine_npu(stash.all_fp32_from_fp32_grad_stash)
    pairs = [(h, m) for h, m in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params) if h.grad is not None]
    for _, master in pairs:
        master.grad = torch.zeros_like(master)
    stash.all_fp16_params = [h for h, _ in pairs]
    stash.all_fp32_from_fp16_params = [m for _, m in pairs]
    stash.main_fp16_grad_combine, stash.fp16_grad_list = _combined_grads(stash.all_fp16_params)
    stash.main_fp32_from_fp16_grad_combine, stash.fp32_from_fp16_grad_list = \
        _combined_grads(stash.all_fp32_from_fp16_params)
    stash.main_fp32_from_fp32_grad_combine, stash.fp32_from_fp32_grad_list = \
        _combined_grads(stash.all_fp32_from_fp32_params)
    if self.is_npu_fused_optimizer:
        stash.main_fp32_from_fp16_param_combine = combine_npu(stash.all_fp32_from_fp16_params)
        stash.main_fp32_from_fp32_param_combine = combine_npu(stash.all_fp32_from_fp32_params)
    stash.already_combined = True


def _prepare_backward(self):
    stash = self._amp_stash
    self._amp_lazy_init()
    if (self.accelerate or self.is_npu_fused_optimizer) and stash.already_combined:
        if stash.process_zero_grad:
            return
        # gradient accumulation without zero_grad: the new grads are added to the stashed ones
        if stash.main_fp16_grad_combine is not None:
            stash.main_fp16_grad_combine.zero_()
        if stash.main_fp32_from_fp32_grad_combine is not None:
            stash.all_fp32_from_fp32_grad_stash_combine.copy_(stash.main_fp32_from_fp32_grad_combine)
            stash.main_fp32_from_fp32_grad_combine.zero_()
        return
    for param in stash.all_fp16_params:
        param.grad = None
    for i, param in enumerate(stash.all_fp32_from_fp32_params):
        stash.all_fp32_from_fp32_grad_stash[i] = param.grad
        param.grad = None


def _post_backward(self, scaler):
    stash = self._amp_stash
    self._amp_lazy_init()
    self._amp_combined_init()
    if not self.accelerate:
        raise NotImplementedError('fake apex: O2 is emulated with combine_grad=True only')
    scaler.unscale_grad_O2(
        model_grads_combined=stash.main_fp16_grad_combine,
        stashed_master_grads_combined=None if stash.process_zero_grad else stash.main_fp32_from_fp16_grad_combine,
        master_grads_combined=stash.main_fp32_from_fp16_grad_combine,
        master_grads=stash.fp32_from_fp16_grad_list, model_grads=stash.fp16_grad_list)
    if stash.main_fp32_from_fp32_grad_combine is not None:
        scaler.unscale_grad_O2(
            model_grads_combined=stash.main_fp32_from_fp32_grad_combine,
            stashed_master_grads_combined=None if stash.process_zero_grad
            else stash.all_fp32_from_fp32_grad_stash_combine,
            master_grads_combined=stash.main_fp32_from_fp32_grad_combine,
            model_grads=stash.fp32_from_fp32_grad_list)
    stash.process_zero_grad = False


def _zero_grad(self):
    """What replaces optimizer.zero_grad: no arguments (new_zero_grad_accelerate_with_master_weights)."""
    stash = self._amp_stash
    self._amp_lazy_init()
    stash.process_zero_grad = True
    if not stash.already_combined:
        for param in stash.all_fp16_params + stash.all_fp32_from_fp32_params:
            if param.grad is not None:
                param.grad.detach_()
                param.grad.zero_()
        for param in stash.all_fp32_from_fp16_params:
            if param.grad is not None:
                param.grad.zero_()
        return
    for combined in (stash.main_fp16_grad_combine, stash.main_fp32_from_fp32_grad_combine,
                     stash.main_fp32_from_fp16_grad_combine):
        if combined is not None:
            combined.zero_()


def _master_params_to_model_params(self):
    stash = self._amp_stash
    with torch.no_grad():
        for model, master in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params):
            model.data.copy_(master.data)


def _combine_params_and_grads_by_group(self):
    """combine_params_and_grads_by_group_with_master_weights: every group's slice of the
    combined master params and grads, fp32-from-fp32 first, then fp32-from-fp16."""
    from apex.contrib.combine_tensors import get_aligned_storage_size, get_part_combined_tensor
    stash = self._amp_stash
    if stash.params_grads_are_combined_by_group:
        return
    self._amp_combined_init()
    stash.combined_params_indexed_by_group, stash.combined_grads_indexed_by_group = [], []
    stash.params_lists_indexed_by_group = []
    kinds = ((stash.main_fp32_from_fp32_param_combine, stash.main_fp32_from_fp32_grad_combine),
             (stash.main_fp32_from_fp16_param_combine, stash.main_fp32_from_fp16_grad_combine))
    at = [[0, 0], [0, 0]]
    for group in self.param_groups:
        lists, sizes = [[], []], [[0, 0], [0, 0]]
        for p in group['params']:
            if p.grad is None:
                continue
            k = 0 if _inside(p.grad, stash.main_fp32_from_fp32_grad_combine) else 1
            lists[k].append(p)
            sizes[k][0] += get_aligned_storage_size(p)
            sizes[k][1] += get_aligned_storage_size(p.grad)
        params, grads = [], []
        for k, (param_buffer, grad_buffer) in enumerate(kinds):
            params.append(get_part_combined_tensor(param_buffer, at[k][0], sizes[k][0]))
            grads.append(get_part_combined_tensor(grad_buffer, at[k][1], sizes[k][1]))
            at[k][0] += sizes[k][0]
            at[k][1] += sizes[k][1]
        stash.combined_params_indexed_by_group.append(params)
        stash.combined_grads_indexed_by_group.append(grads)
        stash.params_lists_indexed_by_group.append(lists)
    stash.params_grads_are_combined_by_group = True


def _inside(grad, combined):
    if combined is None:
        return False
    start = combined.data_ptr()
    return start <= grad.data_ptr() < start + combined.numel() * combined.element_size()


def _process_optimizer(optimizer, properties):
    if hasattr(optimizer, '_amp_stash'):
        raise RuntimeError('A given optimizer should only be passed through amp.initialize once.')
    stash = optimizer._amp_stash = _Stash()
    # _process_optimizer.py (npu.patch): the methods amp adds must not be there already.
    for name in ('_lazy_init_maybe_master_weights', '_master_params_to_model_params', '_prepare_amp_backward',
                 '_post_amp_backward', '_amp_lazy_init', '_amp_combined_init', '_reset_all_combine_flags',
                 '_check_already_combined_params_and_grads', '_combine_params_and_grads_by_group',
                 '_can_get_combined_tensors', 'get_model_combined_params', 'get_model_combined_grads',
                 'get_optimizer_combined_params', 'get_optimizer_combined_grads'):
        if hasattr(optimizer, name):
            raise RuntimeError(f'Incoming optimizer already has {name} defined.')
    stash.lazy_init_called = False
    stash.already_patched = False
    stash.params_have_scaled_gradients = False
    stash.already_combined = False
    stash.process_zero_grad = True
    stash.master_weights = properties.master_weights
    stash.params_grads_are_combined_by_group = False
    stash.param_states_are_combined_by_group = False
    stash.combined_param_states_indexed_by_group = []
    optimizer.accelerate = properties.combine_grad
    optimizer.check_combined_tensors = None
    if getattr(optimizer, 'is_npu_fused_optimizer', False) is True:
        if properties.opt_level not in ('O1', 'O2'):
            raise RuntimeError("Currently, npu fused optimizer can only be used when opt_level='O1' or opt_level='O2'")
    else:
        optimizer.is_npu_fused_optimizer = False
    if (properties.combine_grad or optimizer.is_npu_fused_optimizer) and properties.opt_level == 'O2' \
            and properties.master_weights is not True:
        raise RuntimeError('With opt_level O2, master_weights should be True when combine_grad is True or '
                           'npu fused optimizer is used')
    if not properties.master_weights:
        raise NotImplementedError('fake apex: only master weights (O2) are emulated')
    if optimizer.is_npu_fused_optimizer:
        load_state_dict = optimizer.load_state_dict

        def new_load_state_dict(self, state_dict):
            load_state_dict(state_dict)
            self._amp_stash.param_states_are_combined_by_group = False
        optimizer.load_state_dict = types.MethodType(new_load_state_dict, optimizer)
    step = optimizer.step

    def new_step(self, closure=None):
        if closure is not None:
            raise RuntimeError('Currently, Amp does not support closure use with optimizers.')
        result = step()
        self._master_params_to_model_params()
        if self._amp_stash.main_fp32_from_fp16_grad_combine is not None:
            self._amp_stash.main_fp32_from_fp16_grad_combine.zero_()
        return result

    for name, function in (('step', new_step), ('zero_grad', _zero_grad), ('_amp_lazy_init', _lazy_init),
                           ('_amp_combined_init', _combined_init), ('_prepare_amp_backward', _prepare_backward),
                           ('_post_amp_backward', _post_backward),
                           ('_master_params_to_model_params', _master_params_to_model_params),
                           ('_check_already_combined_params_and_grads', lambda self: None),
                           ('_combine_params_and_grads_by_group', _combine_params_and_grads_by_group)):
        setattr(optimizer, name, types.MethodType(function, optimizer))
    return optimizer


# -- initialize (frontend.py, _initialize.py) -------------------------------------------------------

class _Properties:
    pass


def _module_zero_grad(self, set_to_none: bool = False) -> None:
    """Replacement of torch.nn.Module.zero_grad once grads are combined (_initialize.py)."""
    assert set_to_none is False, 'For combined grad, `set_to_none` must be False.'
    for p in self.parameters():
        if p.grad is not None:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


def _to_type(dtype, value):
    if isinstance(value, torch.Tensor):
        if 'npu' not in value.type():
            warnings.warn('An input tensor was not npu.')
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_type(dtype, v) for v in value)
    if isinstance(value, dict):
        return {k: _to_type(dtype, v) for k, v in value.items()}
    return value


def _check_model(model):
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError('Incoming model is an instance of torch.nn.parallel.DistributedDataParallel. '
                           'Parallel wrappers should only be applied to the model(s) AFTER \n'
                           'the model(s) have been returned from amp.initialize.')
    for name, param in model.named_parameters():
        if param.is_floating_point():
            if 'Half' in param.type():
                _warn_or_err(f'Found param {name} with type {param.type()}, expected torch.npu.FloatTensor.\n'
                             'When using amp.initialize, you do not need to call .half() on your model\n'
                             'before passing it, no matter what optimization level you choose.')
            elif 'npu' not in param.type():
                _warn_or_err(f'Found param {name} with type {param.type()}, expected torch.npu.FloatTensor.\n'
                             'When using amp.initialize, you need to provide a model with parameters\n'
                             'located on a Npu device before passing it no matter what optimization level\n'
                             "you chose. Use model.to('npu') to use the default device.")


def _cast_network(model, dtype):
    """convert_network: every module but affine batch norms to `dtype` (keep_batchnorm_fp32)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for buffer in module.buffers(recurse=False):
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(dtype)


def initialize(models, optimizers=None, enabled=True, opt_level='O1', cast_model_type=None,
               patch_torch_functions=None, keep_batchnorm_fp32=None, master_weights=None, loss_scale=None,
               cast_model_outputs=None, num_losses=1, verbosity=1, dynamic_init_scale=2. ** 16,
               scale_growth_factor=2., scale_backoff_factor=0.5, scale_window=2000, min_loss_scale=None,
               max_loss_scale=2. ** 24, combine_grad=None, combine_ddp=None, ddp_replica_count=4,
               user_cast_preferred=None, check_combined_tensors=None):
    if opt_level not in ('O0', 'O1', 'O2', 'O3'):
        raise RuntimeError(f"Unexpected optimization level {opt_level}. Options are 'O0', 'O1', 'O2', 'O3'.  "
                           'Note that in `O0`, `O1`, etc., the prefix O is the letter O, not the number zero.')
    if not enabled:
        return (models, optimizers) if optimizers is not None else models
    if opt_level != 'O2':
        raise NotImplementedError(f'fake apex: only O2 is emulated, not {opt_level}')
    # What upstream's initialize acts on and this fake does not emulate: refused, not ignored.
    unemulated = {'combine_ddp': combine_ddp, 'check_combined_tensors': check_combined_tensors,
                  'patch_torch_functions': patch_torch_functions, 'cast_model_outputs': cast_model_outputs,
                  'user_cast_preferred': user_cast_preferred,
                  'keep_batchnorm_fp32=False': keep_batchnorm_fp32 is False}
    given = [name for name, value in unemulated.items() if value]
    if given:
        raise NotImplementedError(f'fake apex: {", ".join(given)} not emulated')
    p = _Properties()
    p.opt_level = opt_level
    p.cast_model_type = cast_model_type if cast_model_type is not None else torch.float16
    p.keep_batchnorm_fp32 = True if keep_batchnorm_fp32 is None else keep_batchnorm_fp32
    p.master_weights = True if master_weights is None else master_weights
    p.loss_scale = 'dynamic' if loss_scale is None else loss_scale
    p.combine_grad = combine_grad
    _amp_state.opt_properties = p
    if verbosity:
        print('Selected optimization level O2:  FP16 training with FP32 batchnorm and FP32 master weights.\n')
    model_list = models if isinstance(models, list) else [models]
    optimizer_list = optimizers if isinstance(optimizers, list) else ([] if optimizers is None else [optimizers])
    for model in model_list:
        _check_model(model)
    for model in model_list:
        _cast_network(model, p.cast_model_type)
        forward = model.forward

        def new_forward(*args, __forward=forward, **kwargs):
            output = __forward(*_to_type(p.cast_model_type, args), **_to_type(p.cast_model_type, kwargs))
            return _to_type(torch.float32, output)
        model.forward = new_forward
    for optimizer in optimizer_list:
        _process_optimizer(optimizer, p)
    _amp_state.loss_scalers = [
        LossScaler(p.loss_scale, init_scale=dynamic_init_scale, scale_growth_factor=scale_growth_factor,
                   scale_backoff_factor=scale_backoff_factor, scale_window=scale_window,
                   min_loss_scale=min_loss_scale, max_loss_scale=max_loss_scale)
        for _ in range(num_losses)]
    if combine_grad or any(o.is_npu_fused_optimizer for o in optimizer_list):
        torch.nn.Module.zero_grad = _module_zero_grad
    if optimizers is None:
        return models
    return models, optimizers


# -- scale_loss (handle.py) ---------------------------------------------------------------------------

@contextlib.contextmanager
def scale_loss(loss, optimizers, loss_id=0, model=None, delay_unscale=False, delay_overflow_check=False):
    scaler = _amp_state.loss_scalers[loss_id]
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    if not delay_unscale:
        for optimizer in optimizers:
            if not optimizer._amp_stash.params_have_scaled_gradients:
                optimizer._prepare_amp_backward()
    if scaler.dynamic and not scaler._is_support_inf_nan:
        torch_npu.npu.clear_npu_overflow_flag()
    yield loss.float() * scaler.loss_scale()
    if delay_unscale:
        for optimizer in optimizers:
            optimizer._amp_stash.params_have_scaled_gradients = True
        return
    scaler.clear_overflow_state()
    scaler.check_overflow_and_sync()
    for optimizer in optimizers:
        optimizer._post_amp_backward(scaler)
        optimizer._amp_stash.params_have_scaled_gradients = False
    skip = False if delay_overflow_check else scaler.update_scale()
    if skip:
        for optimizer in optimizers:
            if not optimizer._amp_stash.already_patched:
                optimizer.step = _skip_step(optimizer, scaler, loss_id)
                optimizer._amp_stash.already_patched = True


def _skip_step(optimizer, scaler, loss_id):
    step = optimizer.step

    def skip_step(closure=None):
        if closure is not None:
            raise RuntimeError('Currently, Amp does not support closure use with optimizers.')
        print(f'Gradient overflow.  Skipping step, loss scaler {loss_id} reducing loss scale to '
              f'{scaler.loss_scale()}')
        if optimizer._amp_stash.main_fp32_from_fp16_grad_combine is not None:
            optimizer._amp_stash.main_fp32_from_fp16_grad_combine.zero_()
        optimizer.step = step
        optimizer._amp_stash.already_patched = False
    return skip_step


# -- state (amp.py) -----------------------------------------------------------------------------------

def state_dict(destination=None):
    destination = OrderedDict() if destination is None else destination
    for i, scaler in enumerate(_amp_state.loss_scalers):
        destination[f'loss_scaler{i}'] = {'loss_scale': scaler.loss_scale(), 'unskipped': scaler._unskipped}
    return destination


def load_state_dict(state_dict):
    if len(state_dict) != len(_amp_state.loss_scalers):
        print(f'Warning: state_dict contains {len(state_dict)} entries, while {len(_amp_state.loss_scalers)} '
              'loss_scalers are used')
    unexpected = [key for key in state_dict if 'loss_scaler' not in key]
    scalers = [state_dict[key] for key in state_dict if 'loss_scaler' in key]
    for scaler, saved in zip(_amp_state.loss_scalers, scalers):
        scaler._loss_scale = saved['loss_scale']
        scaler._unskipped = saved['unskipped']
    if unexpected:
        raise RuntimeError('Error(s) in loading state_dict. Unexpected key(s) in state_dict: '
                           + ', '.join(f'"{k}"' for k in unexpected) + '. ')


__all__ = ['initialize', 'scale_loss', 'state_dict', 'load_state_dict', 'master_params']
