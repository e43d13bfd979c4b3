"""Channel-wise L2 normalisation with a learnable per-channel scale (ParseNet)."""
import torch
import torch.nn as nn


class L2Norm(nn.Module):
    """y = scale * x / (||x||_2 over channels + eps), computed in float32.

    x: [B, C, H, W] -> float32 [B, C, H, W]. The scale is initialised to `scale` for
    every channel. Autocast is disabled inside so that the norm never runs in half precision.
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
            x = x.float()
            norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
            return x / norm * self.weight.float()[None, :, None, None]
