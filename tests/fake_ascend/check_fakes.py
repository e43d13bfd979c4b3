"""Checks that the fakes behave as upstream does where this repository depends on it, and that
utils/device.py copes with each behaviour. Run in a child process (the fake registers the 'npu'
device for good):

    python tests/fake_ascend/check_fakes.py [--upstream DIR]

prints one JSON line {variant: {check name: "ok", "skipped: why" or the failure}}: every check
with the fake's re-implementations ('reimplemented') and, with --upstream, again with torch_npu's
own optimizer, tensor-combining and GradScaler files from DIR (the extracted torch-npu wheel;
'upstream'). The Apex checks run Ascend Apex's own code, importable when ../shared/ascend-apex
is on PYTHONPATH (tests/test_npu.py puts it there), and are skipped, saying so, without it.
tests/test_npu.py turns each entry into a test.
"""
import json
import os
import sys
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import torch_npu  # noqa: E402
from torch_npu import _core  # noqa: E402
from utils import device as devices  # noqa: E402

CHECKS = {}
NEEDS_APEX = set()


def check(function):
    CHECKS[function.__name__] = function
    return function


def apex_check(function):
    """A check of (or on) Ascend Apex's own code."""
    NEEDS_APEX.add(function.__name__)
    return check(function)


def ascend_apex_missing():
    """Why Ascend Apex's own code cannot run here, or None."""
    try:
        import apex
    except ImportError as e:
        return f'Ascend Apex is not importable ({e}): put ../shared/ascend-apex on PYTHONPATH'
    if os.path.abspath(apex.__file__).startswith(REPO + os.sep):
        return f'the apex imported is {apex.__file__}, inside the repository, not Ascend Apex\'s own code'
    return None


def raises(kind, words, function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except kind as e:
        assert words in str(e), f'{kind.__name__} without {words!r}: {e}'
        return str(e)
    raise AssertionError(f'no {kind.__name__} ({words!r})')


def linear(n_in=4, n_out=3):
    torch.manual_seed(0)
    return torch.nn.Linear(n_in, n_out).to('npu')


def backward(model, scale=1.0):
    x = torch.randn(2, model.in_features).to('npu')
    (model(x).float().sum() * scale).backward()


def soc(name):
    _core.STATE.soc = _core.SOC_VERSIONS[name]


def fresh_apex():
    from apex import amp
    import apex.amp as amp_module
    amp_module._amp_state.__init__()
    return amp


# -- torch_npu ------------------------------------------------------------------------------------

@check
def the_requested_variant_runs():
    from torch_npu import _upstream
    modules = (torch_npu.optim.NpuFusedSGD, torch_npu.npu.amp.GradScaler, torch_npu.utils.npu_combine_tensors)
    files = [sys.modules[m.__module__].__file__ for m in modules]
    expected = _upstream.root() or os.path.dirname(torch_npu.__file__)
    assert all(f.startswith(expected) for f in files), files
    fused_base = sys.modules[torch_npu.optim.NpuFusedSGD.__module__].NpuFusedOptimizerBase
    assert sys.modules[fused_base.__module__].__file__.startswith(expected)


@check
def fused_optimizer_refuses_set_to_none():
    model = linear()
    opt = torch_npu.optim.NpuFusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    backward(model)
    raises(ValueError, 'set_to_none is not supported in fused optimizers', opt.zero_grad, set_to_none=True)
    opt.step()
    opt.zero_grad()  # zeroes the combined buffer in place
    assert model.weight.grad is not None and float(model.weight.grad.abs().sum()) == 0


@check
def fused_optimizer_steps_every_group():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(2, 2).to('npu'), torch.nn.Linear(2, 2).to('npu')
    before = [p.detach().cpu().clone() for p in (a.weight, b.weight)]
    opt = torch_npu.optim.NpuFusedSGD([{'params': a.parameters()}, {'params': b.parameters(), 'lr': 0.5}], lr=0.1)
    x = torch.ones(1, 2).to('npu')
    (a(x).sum() + b(x).sum()).backward()
    opt.step()
    for p, old, lr in zip((a.weight, b.weight), before, (0.1, 0.5)):
        assert torch.allclose(p.detach().cpu(), old - lr), (p, old)


@check
def fused_optimizer_matches_torch_sgd():
    model = linear()
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    fused = torch_npu.optim.NpuFusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        x = torch.randn(2, 4)
        fused.zero_grad()
        plain.zero_grad()
        model(x.to('npu')).sum().backward()
        reference(x).sum().backward()
        fused.step()
        plain.step()
    assert torch.allclose(model.weight.detach().cpu(), reference.weight.detach(), atol=1e-6)


@check
def fused_optimizer_refuses_bfloat16():
    model = linear().to(torch.bfloat16)
    opt = torch_npu.optim.NpuFusedSGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 4).to('npu', torch.bfloat16)
    model(x).float().sum().backward()
    raises(TypeError, 'must be either float32 or float16', opt.step)


@check
def static_grad_scaler_steps_on_overflow():
    model = linear()
    opt = torch_npu.optim.NpuFusedSGD(model.parameters(), lr=0.1)
    scaler = torch_npu.npu.amp.GradScaler(init_scale=32.0, dynamic=False)
    x = torch.randn(2, 4).to('npu')
    scaler.scale(model(x).sum() * float('inf')).backward()
    scaler.step(opt)  # dynamic=False: no check, the non-finite gradients are applied
    scaler.update()
    assert not bool(torch.isfinite(model.weight).all()) and scaler.get_scale() == 32.0


@check
def dynamic_grad_scaler_skips_overflow():
    model = linear()
    before = model.weight.detach().cpu().clone()
    opt = torch_npu.optim.NpuFusedSGD(model.parameters(), lr=0.1)
    scaler = torch_npu.npu.amp.GradScaler(init_scale=32.0)
    x = torch.randn(2, 4).to('npu')
    scaler.scale(model(x).sum() * float('inf')).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight.detach().cpu(), before) and scaler.get_scale() == 16.0


@check
def grad_scaler_refuses_host_outputs_and_double_unscale():
    scaler = torch_npu.npu.amp.GradScaler(init_scale=32.0, dynamic=False)
    raises(ValueError, 'should be npu', scaler.scale, torch.ones(()))
    model = linear()
    opt = torch_npu.optim.NpuFusedSGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.ones(1, 4).to('npu')).sum()).backward()
    scaler.unscale_(opt)
    raises(RuntimeError, 'unscale_() has already been called', scaler.unscale_, opt)


@check
def unpinned_non_blocking_copy_synchronises():
    _core.LEDGER.clear()
    torch.ones(8).to('npu', non_blocking=True)
    assert _core.LEDGER.count('unpinned') == 1
    torch.ones(8).pin_memory().to('npu', non_blocking=True)
    assert _core.LEDGER.count('unpinned') == 1 and _core.LEDGER.count('async') == 1


@check
def hccl_refuses_host_tensors():
    from torch_npu.distributed import ProcessGroupHCCL
    from datetime import timedelta
    group = ProcessGroupHCCL(dist.HashStore(), 0, 1, timedelta(seconds=30))
    raises(RuntimeError, 'Tensors must be NPU and dense', group.allreduce, [torch.ones(2)])
    t = torch.ones(2).to('npu')
    group.allreduce([t]).wait()
    assert dist.Backend.HCCL == 'hccl' and 'npu' in dist.Backend.default_device_backend_map


def hccl_group():
    """A one-process hccl default group (the fake HCCL on a HashStore)."""
    if not dist.is_initialized():
        dist.init_process_group('hccl', store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


@check
def hccl_refuses_the_dtypes_and_ops_upstream_refuses():
    """ProcessGroupHCCL.cpp: reductions refuse float64 and unsigned 16-bit (checkSupportedDataType);
    bool is cast to int32 for an allreduce, its SUM becoming a MAX; BAND is refused; AVG divides
    after the sum; broadcast takes float64; allgather fills same-sized outputs from a 0-dim input
    and refuses a size mismatch."""
    hccl_group()
    raises(RuntimeError, 'HCCL allreduce: Unsupported data type at::kDouble', dist.all_reduce,
           torch.ones(2, dtype=torch.float64).to('npu'))
    raises(RuntimeError, 'HCCL allreduce: Unsupported data type at::ScalarType::UInt16', dist.all_reduce,
           torch.ones(2, dtype=torch.uint16).to('npu'))
    raises(RuntimeError, 'Cannot use ReduceOp.BAND with HCCL', dist.all_reduce,
           torch.ones(2, dtype=torch.int32).to('npu'), op=dist.ReduceOp.BAND)
    flags = torch.tensor([True, False]).to('npu')
    dist.all_reduce(flags)
    assert flags.dtype == torch.bool and flags.cpu().tolist() == [True, False]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = torch.full((3,), 2, dtype=dtype).to('npu')
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        assert t.cpu().tolist() == [2, 2, 2], (dtype, t)
    # AVG divides in place after the SUM (before the Ascend950, integers too): refused for an int
    raises(RuntimeError, "can't be cast", dist.all_reduce, torch.ones(2, dtype=torch.int32).to('npu'),
           op=dist.ReduceOp.AVG)
    t = torch.ones(2, dtype=torch.float64).to('npu')
    dist.broadcast(t, 0)
    gathered = [torch.zeros(1).to('npu')]
    dist.all_gather(gathered, torch.tensor(7.0).to('npu'))
    assert gathered[0].cpu().tolist() == [7.0]
    raises(RuntimeError, 'must have the same size', dist.all_gather, [torch.zeros(2).to('npu')],
           torch.tensor(7.0).to('npu'))


@check
def streams_order_a_side_stream_collective():
    """A collective on a side stream (as Apex's combine_ddp issues them): it must follow the work
    it reads (wait_stream first), and the default stream must wait for it before touching its
    result; the fake refuses either race. The legacy torch.npu.FloatTensor Apex uses is there."""
    hccl_group()
    side = torch.npu.Stream()
    grads = torch.ones(4).to('npu') * 3
    with torch.npu.stream(side):
        raises(RuntimeError, 'not ordered before it', dist.all_reduce, grads)
    side.wait_stream(torch.npu.current_stream())
    with torch.npu.stream(side):
        dist.all_reduce(grads)
    assert torch.npu.current_stream() == torch.npu.default_stream() != side
    raises(RuntimeError, 'a race on an NPU', grads.mul_, 2)
    torch.npu.current_stream().wait_stream(side)
    grads.mul_(2)
    assert grads.cpu().tolist() == [6.0] * 4
    buf = torch.npu.FloatTensor([0.])
    assert isinstance(buf, torch.npu.FloatTensor) and not isinstance(buf, torch.npu.HalfTensor)
    assert buf.device.type == 'npu' and buf.dtype == torch.float32 and buf.cpu().tolist() == [0.0]
    assert not isinstance(torch.zeros(1), torch.npu.FloatTensor)


@check
def change_data_ptr_refuses_what_upstream_refuses():
    """Ascend Apex's change_data_ptr (src/csrc/combine_tensors/change_dataptr.cpp): negative
    offsets, differing or other dtypes, an overflowing offset (upstream's own arithmetic)."""
    from change_data_ptr import change_data_ptr
    src = torch.arange(8, dtype=torch.float32).to('npu')
    dst = torch.zeros(2).to('npu')
    raises(RuntimeError, 'Expect offset equal or greater than zero, got: -1', change_data_ptr, dst, src, -1)
    raises(RuntimeError, 'same dtype in float16 or float32', change_data_ptr, dst.half(), src, 0)
    raises(RuntimeError, 'same dtype in float16 or float32', change_data_ptr, dst.bfloat16(), src.bfloat16(), 0)
    raises(RuntimeError, 'Offsets overflow in change_data_ptr', change_data_ptr, dst, src, 25)  # 8 + 25 > 32 bytes
    change_data_ptr(dst, src, 3)
    assert dst.cpu().tolist() == [3.0, 4.0]
    dst.fill_(-1)
    assert src.cpu().tolist() == [0, 1, 2, -1, -1, 5, 6, 7]


@check
def jit_compile_default_follows_the_soc():
    _core.STATE.options.pop('jitCompile', None)
    soc('Ascend910A')
    assert not torch.npu.is_jit_compile_false()  # on before the 910B
    soc('Ascend910B1')
    assert torch.npu.is_jit_compile_false()
    torch.npu.set_compile_mode(jit_compile=True)
    assert not torch.npu.is_jit_compile_false()


@check
def bf16_follows_the_soc_and_autocast_refuses_it_before_the_910b():
    soc('Ascend910A')
    assert not torch_npu.npu.is_bf16_supported()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with torch.autocast('npu', dtype=torch.bfloat16):
            assert not torch.is_autocast_enabled('npu')
    assert any('not supported' in str(w.message) for w in caught)
    soc('Ascend910B1')
    assert torch_npu.npu.is_bf16_supported()
    with torch.autocast('npu', dtype=torch.bfloat16):
        y = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3).to('npu'), torch.ones(1, 1, 1, 1).to('npu'))
    assert y.dtype == torch.bfloat16


# -- Ascend Apex ----------------------------------------------------------------------------------

@apex_check
def apex_fused_sgd_refuses_to_step_outside_amp():
    from apex.optimizers import NpuFusedSGD
    model = linear()
    opt = NpuFusedSGD(model.parameters(), lr=0.1)
    backward(model)
    raises(RuntimeError, 'should be used with AMP', opt.step)


@apex_check
def apex_o2_zero_grad_takes_no_argument():
    from apex.optimizers import NpuFusedSGD
    amp = fresh_apex()
    model = linear()
    opt = NpuFusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = amp.initialize(model, opt, opt_level='O2', loss_scale=32.0, combine_grad=True, verbosity=0)
    raises(TypeError, 'set_to_none', opt.zero_grad, set_to_none=True)
    opt.zero_grad()
    assert model.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in amp.master_params(opt))  # built by zero_grad
    raises(RuntimeError, 'only be passed through amp.initialize once', amp.initialize, linear(), opt,
           opt_level='O2', verbosity=0)
    raises(AssertionError, 'set_to_none', model.zero_grad, set_to_none=True)  # Module.zero_grad patched


@apex_check
def apex_initialize_refuses_ddp_and_host_models():
    from apex.optimizers import NpuFusedSGD
    amp = fresh_apex()
    raises(RuntimeError, "Use model.to('npu')", amp.initialize, torch.nn.Linear(2, 2),
           NpuFusedSGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), opt_level='O2', verbosity=0)
    if not dist.is_initialized():
        dist.init_process_group('hccl', store=dist.HashStore(), rank=0, world_size=1)
    ddp = torch.nn.parallel.DistributedDataParallel(linear(), device_ids=[torch.npu.current_device()])
    raises(RuntimeError, 'AFTER', amp.initialize, ddp, NpuFusedSGD(ddp.parameters(), lr=0.1), opt_level='O2',
           verbosity=0)


@apex_check
def apex_is_ascend_apex_own_code():
    """The apex that runs is Ascend Apex's build (not in the repository; initialize takes
    combine_grad and combine_ddp), on the stand-in for its one compiled part."""
    import inspect
    import apex
    from apex.contrib.combine_tensors import combine_tensors
    assert not os.path.abspath(apex.__file__).startswith(REPO + os.sep), apex.__file__
    assert {'combine_grad', 'combine_ddp'} <= set(inspect.signature(apex.amp.initialize).parameters)
    assert combine_tensors.change_data_ptr.__module__ == 'change_data_ptr'
    assert os.path.dirname(sys.modules['change_data_ptr'].__file__) == os.path.dirname(os.path.abspath(__file__))


@apex_check
def apex_initialize_refuses_an_optimizer_it_already_patched():
    """_process_optimizer.py: an optimizer that already has a method amp adds is refused."""
    from apex.optimizers import NpuFusedSGD
    amp = fresh_apex()
    model = linear()
    optimizer = NpuFusedSGD(model.parameters(), lr=0.1)
    optimizer._amp_lazy_init = lambda: None
    raises(RuntimeError, 'Incoming optimizer already has _amp_lazy_init defined', amp.initialize, model,
           optimizer, opt_level='O2', verbosity=0)


@apex_check
def apex_static_loss_scale_steps_on_overflow():
    from apex.optimizers import NpuFusedSGD
    amp = fresh_apex()
    model = linear()
    opt = NpuFusedSGD(model.parameters(), lr=0.1)
    model, opt = amp.initialize(model, opt, opt_level='O2', loss_scale=32.0, combine_grad=True, verbosity=0)
    opt.zero_grad()
    loss = model(torch.randn(2, 4).to('npu')).sum() * float('inf')
    with amp.scale_loss(loss, opt) as scaled:
        scaled.backward()
    assert not opt._amp_stash.already_patched  # no overflow check with a static scale
    opt.step()
    assert not all(bool(torch.isfinite(p).all()) for p in amp.master_params(opt))


@apex_check
def apex_pinned_dynamic_scale_skips_overflow_and_keeps_the_scale():
    for name in ('Ascend910B1', 'Ascend910A'):  # inf/nan mode, then saturation mode (float status)
        soc(name)
        runtime = devices.setup_device('npu', 0, 'apex', loss_scale=32.0)
        model = linear()
        opt = runtime.make_optimizer(model.parameters(), 0.1, 0.9, 0.0)
        model, opt = runtime.initialize(model, opt)
        runtime.zero_grad(opt)
        masters = [p.detach().cpu().clone() for p in runtime.apex_amp.master_params(opt)]
        x = torch.randn(2, 4).to('npu')
        runtime.backward(model(x).float().sum() * 1e6, opt)  # fp16 gradients overflow
        assert runtime.step(opt) is False, name
        assert all(torch.equal(a, p.detach().cpu()) for a, p in zip(masters, runtime.apex_amp.master_params(opt)))
        assert runtime.state_dict()['apex']['loss_scaler0']['loss_scale'] == 32.0
        runtime.zero_grad(opt)
        runtime.backward(model(x).float().sum(), opt)
        assert runtime.step(opt) is True, name
    soc('Ascend910B1')


@check
def native_fp16_skips_overflow_and_keeps_the_scale():
    for name in ('Ascend910B1', 'Ascend910A'):
        soc(name)
        runtime = devices.setup_device('npu', 0, 'native', 'fp16', loss_scale=32.0)
        model = linear()
        opt = runtime.make_optimizer(model.parameters(), 0.1, 0.9, 0.0)
        before = model.weight.detach().cpu().clone()
        runtime.zero_grad(opt)
        x = torch.randn(2, 4).to('npu')
        with runtime.autocast():
            out = model(x)
        runtime.backward(out.float().sum() * 1e6, opt)
        assert runtime.step(opt) is False, name
        assert torch.equal(before, model.weight.detach().cpu()) and runtime.scaler.get_scale() == 32.0
        runtime.zero_grad(opt)
        with runtime.autocast():
            out = model(x)
        runtime.backward(out.float().sum(), opt)
        assert runtime.step(opt) is True and runtime.scaler.get_scale() == 32.0, name
    soc('Ascend910B1')


@check
def zero_grad_as_each_optimizer_accepts_it():
    cpu = devices.setup_device('cpu')
    model = torch.nn.Linear(2, 2)
    opt = cpu.make_optimizer(model.parameters(), 0.1, 0.9, 0.0)
    model(torch.ones(1, 2)).sum().backward()
    cpu.zero_grad(opt)
    assert model.weight.grad is None  # set_to_none where it is accepted
    npu = devices.setup_device('npu', 0, 'native', 'fp16')
    model = linear()
    opt = npu.make_optimizer(model.parameters(), 0.1, 0.9, 0.0)
    assert getattr(opt, 'is_fused_optimizer', False)
    backward(model)
    opt.step()
    npu.zero_grad(opt)
    assert model.weight.grad is not None and float(model.weight.grad.abs().sum()) == 0


@check
def amp_auto_without_apex_on_910a_and_910b():
    sys.modules['apex'] = None  # not installed
    try:
        soc('Ascend910A')
        runtime = devices.setup_device('npu', 0, 'auto')
        assert runtime.describe() == 'npu:0 | autocast float16 + GradScaler (loss scale 32)', runtime.describe()
        assert runtime.notes == ['--amp auto: not using Apex (apex is not installed); torch.autocast float16 instead']
        soc('Ascend910B1')
        runtime = devices.setup_device('npu', 0, 'auto')
        assert runtime.describe() == 'npu:0 | autocast bfloat16', runtime.describe()
    finally:
        del sys.modules['apex']
    if not ascend_apex_missing():
        runtime = devices.setup_device('npu', 0, 'auto')
        assert runtime.amp == 'apex' and not runtime.notes, runtime.describe()


def nvidia_apex():
    """NVIDIA's apex.amp as far as --amp auto looks at it: initialize() with NVIDIA apex 4ef930c's
    arguments (frontend.py; the lines Ascend/apex patch/npu.patch replaces), no combine_grad."""
    import types
    apex, amp = types.ModuleType('apex'), types.ModuleType('apex.amp')

    def initialize(models, optimizers=None, enabled=True, opt_level='O1', cast_model_type=None,
                   patch_torch_functions=None, keep_batchnorm_fp32=None, master_weights=None, loss_scale=None,
                   cast_model_outputs=None, num_losses=1, verbosity=1, min_loss_scale=None, max_loss_scale=2. ** 24):
        raise AssertionError('not to be called')
    amp.initialize = initialize
    apex.amp = amp
    return {'apex': apex, 'apex.amp': amp}


@check
def amp_auto_falls_back_from_a_broken_or_nvidia_apex():
    """--amp auto with an apex that fails to import (any exception) or is NVIDIA's: native
    autocast and one line saying why; --amp apex: a one-line refusal."""
    import importlib
    real = importlib.import_module
    cases = [(RuntimeError('apex was built for CUDA 12.1\nmore'), 'import apex failed: RuntimeError: apex was built'),
             (OSError('libcudart.so.12: cannot open shared object file'), 'import apex failed: OSError: libcudart'),
             (nvidia_apex(), "the installed apex is NVIDIA's (its amp.initialize has no combine_grad)")]
    try:
        for behaviour, words in cases:
            def fake(name, *args, behaviour=behaviour):
                if name in ('apex', 'apex.amp'):
                    if isinstance(behaviour, Exception):
                        raise behaviour
                    return behaviour[name]
                return real(name, *args)
            devices.importlib.import_module = fake
            soc('Ascend910A')
            runtime = devices.setup_device('npu', 0, 'auto')
            assert runtime.amp == 'native' and runtime.amp_dtype == torch.float16 and runtime.scaler is not None, runtime.describe()
            assert len(runtime.notes) == 1 and '\n' not in runtime.notes[0] and words in runtime.notes[0], runtime.notes
            assert runtime.notes[0].startswith('--amp auto: not using Apex (') and runtime.notes[0].endswith(
                'torch.autocast float16 instead'), runtime.notes
            message = raises(devices.DeviceUnavailable, words, devices.setup_device, 'npu', 0, 'apex')
            assert '\n' not in message, message
    finally:
        devices.importlib.import_module = real


@check
def combine_ddp_needs_apex_on_the_npu_and_several_processes():
    sys.modules['apex'] = None
    try:
        raises(devices.DeviceUnavailable, 'needs --device npu with Apex O2', devices.setup_device, 'npu', 0, 'native',
               combine_ddp=True)
    finally:
        del sys.modules['apex']
    raises(devices.DeviceUnavailable, 'needs --device npu with Apex O2', devices.setup_device, 'cpu', combine_ddp=True)
    if not ascend_apex_missing():
        raises(devices.DeviceUnavailable, 'run it under torchrun with more than one process', devices.setup_device,
               'npu', 0, 'apex', combine_ddp=True)


def overflowing_step(runtime, model, opt, factor):
    runtime.zero_grad(opt)
    x = torch.ones(2, model.in_features).to('npu')
    with runtime.autocast():
        out = model(x)
    runtime.backward(out.float().sum() * factor, opt)
    return runtime.step(opt)


def train_ctx(amp, loss_scale, dtype='fp16'):
    runtime = devices.setup_device('npu', 0, amp, dtype, loss_scale=loss_scale)
    model = linear()
    opt = runtime.make_optimizer(model.parameters(), 0.1, 0.9, 0.0)
    model, opt = runtime.initialize(model, opt)
    return runtime, model, opt


def check_dynamic_scale(amp, initial):
    """--loss_scale dynamic: the library's own defaults; an overflow skips the step and halves the
    scale; the log line reports the scale when it changes."""
    for name in ('Ascend910B1', 'Ascend910A'):
        soc(name)
        runtime, model, opt = train_ctx(amp, 'dynamic')
        assert runtime.loss_scale_change() == f'->>loss scale:{initial:g} (dynamic)'
        assert runtime.loss_scale_change() is None
        assert overflowing_step(runtime, model, opt, 1e6) is False and runtime.overflow_scale == initial, name
        assert runtime.current_loss_scale() == initial / 2
        assert runtime.loss_scale_change() == f'->>loss scale:{initial / 2:g} (was {initial:g})'
        assert overflowing_step(runtime, model, opt, 1e-3) is True
        assert runtime.state_dict()['loss_scale'] == {'mode': 'dynamic', 'scale': initial / 2}


@check
def native_fp16_dynamic_loss_scale():
    check_dynamic_scale('native', 2.0 ** 16)  # torch_npu's GradScaler default init_scale


@apex_check
def apex_dynamic_loss_scale():
    check_dynamic_scale('apex', 2.0 ** 16)  # Apex's dynamic_init_scale default


def check_resume_keeps_the_loss_scale(amp):
    """A resume without --loss_scale continues in the checkpoint's mode at the scale it reached; an
    explicit different --loss_scale starts afresh at its own, saying so. (Apex's scalers are global:
    each context is used before the next is made.)"""
    runtime, model, opt = train_ctx(amp, 'dynamic')
    assert overflowing_step(runtime, model, opt, 1e6) is False
    saved = runtime.state_dict()
    resumed, model, opt = train_ctx(amp, None)  # the default: static 32 unless a checkpoint says otherwise
    message = resumed.load_state_dict(saved, opt)
    assert message == "Loss scale: continuing the checkpoint's, a dynamic loss scale, at 32768", message
    assert resumed.dynamic and resumed.current_loss_scale() == 2.0 ** 15, resumed.describe()
    assert overflowing_step(resumed, model, opt, 1e6) is False
    assert resumed.current_loss_scale() == 2.0 ** 14  # still dynamic: it backs off
    same, model, opt = train_ctx(amp, 'dynamic')
    assert same.load_state_dict(saved, opt) is None and same.current_loss_scale() == 2.0 ** 15  # continued
    explicit, model, opt = train_ctx(amp, 64.0)
    message = explicit.load_state_dict(saved, opt)
    assert message == '--loss_scale 64: the checkpoint has a dynamic loss scale, at 32768; starting at 64', message
    assert not explicit.dynamic and explicit.current_loss_scale() == 64.0
    static_state = explicit.state_dict()
    back, model, opt = train_ctx(amp, None)
    message = back.load_state_dict(static_state, opt)
    assert message == "Loss scale: continuing the checkpoint's, the static loss scale 64" and back.loss_scale == 64.0
    assert back.current_loss_scale() == 64.0 and 'loss scale 64' in back.describe(), back.describe()
    assert overflowing_step(back, model, opt, 1e6) is False and back.current_loss_scale() == 64.0


@check
def native_fp16_resume_keeps_the_loss_scale():
    check_resume_keeps_the_loss_scale('native')


@apex_check
def apex_resume_keeps_the_loss_scale():
    check_resume_keeps_the_loss_scale('apex')


@check
def setup_device_sets_the_compile_mode():
    devices.setup_device('npu', 0, 'native')
    assert _core.STATE.options['jitCompile'] == 'disable'
    devices.setup_device('npu', 0, 'native', npu_jit_compile=True)
    assert _core.STATE.options['jitCompile'] == 'enable'


@check
def torch_npu_import_errors_are_one_line():
    import importlib
    real = importlib.import_module
    failures = [ModuleNotFoundError("No module named 'torch_npu'", name='torch_npu'),
                ImportError('libhccl.so: cannot open shared object file: No such file or directory'),
                RuntimeError('Two accelerators cannot be used at the same time in PyTorch: npu and cuda. ...\nmore')]
    words = ['which is not installed', 'libhccl.so: cannot open shared object file', 'Two accelerators']
    try:
        for failure, word in zip(failures, words):
            def fail(name, *args, failure=failure):
                if name == 'torch_npu':
                    raise failure
                return real(name, *args)
            devices.importlib.import_module = fail
            message = raises(devices.DeviceUnavailable, word, devices.setup_device, 'npu')
            assert '\n' not in message, message
            if word != words[0]:
                assert 'set_env.sh' in message, message
    finally:
        devices.importlib.import_module = real


def run_checks():
    results = {}
    missing = ascend_apex_missing()
    for name, function in CHECKS.items():
        soc('Ascend910B1')
        if name in NEEDS_APEX and missing:
            results[name] = f'skipped: {missing}'
            continue
        try:
            function()
            results[name] = 'ok'
        except Exception as e:  # noqa: BLE001 - reported per check
            results[name] = f'{type(e).__name__}: {e}\n' + ''.join(traceback.format_exc(limit=-3))
    return results


def main():
    from torch_npu import _upstream
    results = {'reimplemented': run_checks()}
    if sys.argv[1:2] == ['--upstream']:
        _upstream.activate(sys.argv[2])
        results['upstream'] = run_checks()
    print(json.dumps(results))


if __name__ == '__main__':
    main()
