import pytest
import torch

from layers.modules.l2norm import L2Norm, L2NormFunction


def plain_l2norm(x, weight, eps=1e-10):
    """The textbook composition (the reference port's formula), differentiated by autograd."""
    x = x.double()
    norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps
    return x / norm * weight.double()[None, :, None, None]


def _inputs(shape=(2, 5, 6, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = 1 + torch.rand(shape[1], generator=gen, dtype=torch.float64)
    return x, weight


def test_forward_matches_the_plain_formula_and_is_float32_for_bf16_input():
    x, weight = _inputs()
    norm = L2Norm(5, 10)
    with torch.no_grad():
        norm.weight.copy_(weight)
    y = norm(x.bfloat16())
    assert y.dtype == torch.float32
    expected = plain_l2norm(x.bfloat16().double(), weight.float())
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    # the path without autograd gives the same values
    with torch.no_grad():
        torch.testing.assert_close(norm(x.bfloat16()), y, rtol=0, atol=0)


def test_gradients_match_autograd_of_the_plain_formula():
    x, weight = _inputs()
    x.requires_grad_(True)
    weight.requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gw = torch.autograd.grad((L2NormFunction.apply(x, weight, 1e-10) * grad_out).sum(), (x, weight))
    ex, ew = torch.autograd.grad((plain_l2norm(x, weight) * grad_out).sum(), (x, weight))
    torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    x, weight = _inputs(shape=(1, 3, 2, 3))
    x.requires_grad_(True)
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: L2NormFunction.apply(a, w, 1e-10), (x, weight))


def test_gradient_is_finite_at_an_all_zero_pixel():
    """The plain composition gives NaN there (0 * inf in sqrt's backward); a NaN that only a
    later ReLU masks would poison any graph that reorders that masking."""
    x, _ = _inputs()
    x[0, :, 2, 3] = 0
    x.requires_grad_(True)
    norm = L2Norm(5, 10).double()
    plain_grad, = torch.autograd.grad(plain_l2norm(x, norm.weight.detach()).sum(), x)
    assert plain_grad[0, :, 2, 3].isnan().all()  # the defect this layer avoids
    y = norm(x)
    gx, gw = torch.autograd.grad(y.sum(), (x, norm.weight))
    assert gx.isfinite().all() and gw.isfinite().all()
    # elsewhere the gradient is the plain one
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :, 2, 3] = False
    torch.testing.assert_close(gx[mask], plain_grad[mask], rtol=1e-10, atol=1e-12)
    # at the zero pixel the norm term vanishes: dL/dx = g * w / eps
    torch.testing.assert_close(gx[0, :, 2, 3], norm.weight.detach() / norm.eps)


def test_bf16_channels_last_input_gets_gradients_in_its_own_dtype_and_layout():
    x, weight = _inputs(shape=(2, 8, 5, 6))
    x = x.bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    norm = L2Norm(8, 10)
    y = norm(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    ref = x.detach().float().requires_grad_(True)
    (plain_l2norm(ref, norm.weight.detach()).square().sum()).backward()
    torch.testing.assert_close(x.grad.float(), ref.grad, rtol=2e-2, atol=1e-3)


def test_backward_saves_only_the_input_and_the_norm():
    """Full-size tensors kept for the backward: the input alone (which the ReLU before it keeps
    anyway), not float32 copies and quotients."""
    x = torch.rand(1, 16, 32, 32, dtype=torch.bfloat16).requires_grad_(True)
    norm = L2Norm(16, 10)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    full = [t for t in saved if t.numel() == x.numel()]
    assert len(full) == 1 and full[0].dtype == torch.bfloat16


def test_compiled_gradients_equal_eager():
    """L2Norm's custom autograd Function traced by torch.compile (Dynamo and AOTAutograd: what
    can break a hand-written Function) gives eager's gradients. The 'aot_eager' backend runs
    the traced graph with eager kernels, so the comparison is exact and no C++ is compiled;
    the generated kernels of the whole network (L2Norm included) are compared with eager
    mode by benchmarks/check_compile.py (tests/test_benchmarks.py)."""
    x, weight = _inputs(shape=(2, 8, 5, 6))
    x = x.float().requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    norm = L2Norm(8, 10)
    gx, gw = torch.autograd.grad((norm(x) * grad_out).sum(), (x, norm.weight))
    compiled = torch.compile(norm, backend='aot_eager', fullgraph=True)
    cx, cw = torch.autograd.grad((compiled(x) * grad_out).sum(), (x, norm.weight))
    torch.testing.assert_close(cx, gx)
    torch.testing.assert_close(cw, gw)


def test_a_second_derivative_is_refused_not_silently_wrong():
    # The hand-written backward uses the saved norm as a constant: differentiating it again
    # would miss d(norm)/dx, so it must raise instead.
    from layers.modules.l2norm import L2NormFunction
    x = torch.rand(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(L2NormFunction.apply(x, w, 1e-10).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
