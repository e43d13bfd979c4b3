"""Checks that the fakes behave as upstream does where this repository depends on it, and that
utils/device.py copes with each behaviour. Run in a child process (the fake registers the 'npu'
device for good):

    python tests/fake_ascend/check_fakes.py [--upstream DIR]

prints one JSON line {variant: {check name: "ok" or the failure}}: every check with the fake's
re-implementations ('reimplemented') and, with --upstream, again with torch_npu's own optimizer,
tensor-combining and GradScaler files from DIR (the extracted torch-npu wheel; 'upstream').
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


def check(function):
    CHECKS[function.__name__] = function
    return function


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

@check
def apex_fused_sgd_refuses_to_step_outside_amp():
    from apex.optimizers import NpuFusedSGD
    model = linear()
    opt = NpuFusedSGD(model.parameters(), lr=0.1)
    backward(model)
    raises(RuntimeError, 'should be used with AMP', opt.step)


@check
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


@check
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


@check
def apex_initialize_refuses_what_it_cannot_do_faithfully():
    """An optimizer that already has a method amp adds (upstream's refusal), and the arguments the
    fake does not emulate (refused rather than ignored)."""
    from apex.optimizers import NpuFusedSGD
    amp = fresh_apex()
    model = linear()
    optimizer = NpuFusedSGD(model.parameters(), lr=0.1)
    optimizer._amp_lazy_init = lambda: None
    raises(RuntimeError, 'Incoming optimizer already has _amp_lazy_init defined', amp.initialize, model,
           optimizer, opt_level='O2', verbosity=0)
    for option in ({'check_combined_tensors': True}, {'keep_batchnorm_fp32': False},
                   {'patch_torch_functions': True}):
        amp = fresh_apex()
        model = linear()
        raises(NotImplementedError, 'not emulated', amp.initialize, model,
               NpuFusedSGD(model.parameters(), lr=0.1), opt_level='O2', verbosity=0, **option)


@check
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


@check
def apex_pinned_dynamic_scale_skips_overflow_and_keeps_the_scale():
    for name in ('Ascend910B1', 'Ascend910A'):  # inf/nan mode, then saturation mode (float status)
        soc(name)
        ctx = devices.setup_device('npu', 0, 'apex', loss_scale=32.0)
        model = linear()
        opt = ctx.make_optimizer(model.parameters(), 0.1, 0.9, 0.0)
        model, opt = ctx.initialize(model, opt)
        ctx.zero_grad(opt)
        masters = [p.detach().cpu().clone() for p in ctx.apex_amp.master_params(opt)]
        x = torch.randn(2, 4).to('npu')
        ctx.backward(model(x).float().sum() * 1e6, opt)  # fp16 gradients overflow
        assert ctx.step(opt) is False, name
        assert all(torch.equal(a, p.detach().cpu()) for a, p in zip(masters, ctx.apex_amp.master_params(opt)))
        assert ctx.state_dict()['apex']['loss_scaler0']['loss_scale'] == 32.0
        ctx.zero_grad(opt)
        ctx.backward(model(x).float().sum(), opt)
        assert ctx.step(opt) is True, name
    soc('Ascend910B1')


@check
def native_fp16_skips_overflow_and_keeps_the_scale():
    for name in ('Ascend910B1', 'Ascend910A'):
        soc(name)
        ctx = devices.setup_device('npu', 0, 'native', 'fp16', loss_scale=32.0)
        model = linear()
        opt = ctx.make_optimizer(model.parameters(), 0.1, 0.9, 0.0)
        before = model.weight.detach().cpu().clone()
        ctx.zero_grad(opt)
        x = torch.randn(2, 4).to('npu')
        with ctx.autocast():
            out = model(x)
        ctx.backward(out.float().sum() * 1e6, opt)
        assert ctx.step(opt) is False, name
        assert torch.equal(before, model.weight.detach().cpu()) and ctx.scaler.get_scale() == 32.0
        ctx.zero_grad(opt)
        with ctx.autocast():
            out = model(x)
        ctx.backward(out.float().sum(), opt)
        assert ctx.step(opt) is True and ctx.scaler.get_scale() == 32.0, name
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
        ctx = devices.setup_device('npu', 0, 'auto')
        assert ctx.describe() == 'npu:0 | autocast float16 + GradScaler', ctx.describe()
        soc('Ascend910B1')
        ctx = devices.setup_device('npu', 0, 'auto')
        assert ctx.describe() == 'npu:0 | autocast bfloat16', ctx.describe()
    finally:
        del sys.modules['apex']
    ctx = devices.setup_device('npu', 0, 'auto')
    assert ctx.amp == 'apex', ctx.describe()


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
    for name, function in CHECKS.items():
        soc('Ascend910B1')
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
