"""Channel-wise L2 normalisation with a learnable per-channel scale (ParseNet)."""
import torch
import torch.nn as nn


class L2Norm(nn.Module):
    """y = weight * x / (||x||_2 over channels + eps), computed in float32.

    x: [B, C, H, W] (any float dtype, any memory format) -> float32 [B, C, H, W] (float64 for
    float64 x). The scale
    is initialised to `scale` for every channel. Autocast is disabled inside so that the norm
    never runs in half precision.

    When a gradient is needed the op runs as one autograd node (`L2NormFunction`): it keeps
    only its input and the per-pixel norm for the backward, and its gradient is finite at a
    pixel whose channels are all zero (the plain composition of pow/sum/sqrt gives NaN there).
    """

    def __init__(self, n_channels, scale, eps=1e-10):
        super().__init__()
        self.n_channels = n_channels
        self.scale = scale
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(n_channels))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.weight, self.scale)

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return L2NormFunction.apply(x, self.weight, self.eps)
            return l2_normalize(x, self.weight, self.eps)[0]


def l2_normalize(x, weight, eps):
    """(weight * x / (r + eps), r) with r = ||x||_2 over dim 1 [B, 1, H, W], both computed in
    float32 (float64 for float64 x) whatever x's dtype."""
    r = torch.linalg.vector_norm(x, 2, dim=1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return torch.div(x, r + eps).mul_(weight.to(r.dtype)[None, :, None, None]), r


class L2NormFunction(torch.autograd.Function):
    """y = w * x / n with n = r + eps, r = ||x||_2 over channels (per pixel).

    Backward, with g = dL/dy and the sums over channels c:
        dL/dx = (g * w - x * k) / n,  k = sum_c(g w x) / (n * r)   (k = 0 where r = 0)
        dL/dw = sum over batch and pixels of g * x / n
    Where every channel of a pixel is zero, x = 0 there and the second term vanishes: k = 0
    gives the limit instead of 0 * inf.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = l2_normalize(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        ctx.eps = eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, r = ctx.saved_tensors
        n = r + ctx.eps
        w = weight.to(r.dtype)
        g = grad_y.to(r.dtype)
        gx = (g * x).flatten(2)  # float32 (float64) [B, C, H*W]; a view in either memory format
        grad_w = None
        if ctx.needs_input_grad[1]:
            # matmul over the pixels: no copy of gx whatever its layout (einsum would copy NCHW)
            grad_w = torch.matmul(gx, n.reciprocal().flatten(1).unsqueeze(-1)).sum(dim=(0, 2)).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dot = torch.matmul(w, gx).view_as(r)  # sum over channels of g * w * x: [B, 1, H, W]
            k = torch.where(r > 0, dot / (n * r), torch.zeros((), dtype=r.dtype, device=r.device))
            grad_x = (g * w[None, :, None, None]).addcmul_(x, k, value=-1).div_(n).to(x.dtype)
        return grad_x, grad_w, None
