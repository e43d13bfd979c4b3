"""S3FD: Single Shot Scale-invariant Face Detector (Zhang et al., arXiv 1708.05237).

VGG16 trunk (reduced fc6/fc7) + two extra blocks, six detection sources with one square
anchor each (16 ... 512 px at strides 4 ... 128), and the max-out background label on the
conv3_3 head.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.config import MIN_INPUT_SIDE, MODEL_VARIANTS, cfg  # noqa: F401 (MIN_INPUT_SIDE: s3fd's public name)
from layers.functions.detection import Detect
from layers.functions.prior_box import PriorBox
from layers.modules.l2norm import L2Norm

VGG_CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'C', 512, 512, 512, 'M',
           512, 512, 512, 'M']
EXTRAS_CFG = [(1024, 256, 1, 1, 0), (256, 512, 3, 2, 1), (512, 128, 1, 1, 0), (128, 256, 3, 2, 1)]
SOURCE_CHANNELS = [256, 512, 512, 1024, 512, 256]
# Index into `vgg` after which conv3_3, conv4_3 and conv5_3 (with their ReLU) are taken.
VGG_SOURCE_ENDS = (16, 23, 30)
VARIANTS = MODEL_VARIANTS


def vgg(variant='reference'):
    """VGG16 layers with fc6/fc7 as convolutions: the layout of vgg16_reducedfc.pth.

    'reference': fc6 is 3x3 with dilation 6 (pad 6); 'caffe': 3x3, pad 3, no dilation, as in
    the released Caffe model (fc7 is then 24x24 at 640 input instead of 20x20).
    """
    layers = []
    in_channels = 3
    for v in VGG_CFG:
        if v == 'M':
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif v == 'C':
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    if variant == 'reference':
        fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6)
    elif variant == 'caffe':
        fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=3)
    else:
        raise ValueError(f'unknown model variant {variant!r}; choose one of {VARIANTS}')
    fc7 = nn.Conv2d(1024, 1024, kernel_size=1)
    layers += [fc6, nn.ReLU(inplace=True), fc7, nn.ReLU(inplace=True)]
    return layers


class S3FD(nn.Module):
    """The S3FD network.

    Input: [B, 3, H, W] float, RGB, mean-subtracted (cfg.img_mean), unscaled.
    phase 'train': returns (loc [B, P, 4], conf [B, P, num_classes] logits after max-out,
        priors [P, 4] normalised center form).
    phase 'test': returns detections [B, num_classes, cfg.TOP_K, 5], rows
        (score, x1, y1, x2, y2) normalised to [0, 1], zero-padded.
    """

    def __init__(self, phase, num_classes=2, variant='reference'):
        super().__init__()
        if phase not in ('train', 'test'):
            raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
        self.phase = phase
        self.num_classes = num_classes
        self.variant = variant
        self.vgg = nn.ModuleList(vgg(variant))
        self.L2Norm3_3 = L2Norm(256, 10)
        self.L2Norm4_3 = L2Norm(512, 8)
        self.L2Norm5_3 = L2Norm(512, 5)
        self.extras = nn.ModuleList(
            nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=p) for cin, cout, k, s, p in EXTRAS_CFG)
        self.loc = nn.ModuleList(nn.Conv2d(c, 4, kernel_size=3, padding=1) for c in SOURCE_CHANNELS)
        # conv3_3 predicts 3 background logits + 1 face logit (max-out background label).
        conf_channels = [3 + (num_classes - 1)] + [num_classes] * (len(SOURCE_CHANNELS) - 1)
        self.conf = nn.ModuleList(nn.Conv2d(c, n, kernel_size=3, padding=1)
                                  for c, n in zip(SOURCE_CHANNELS, conf_channels))
        self.detect = Detect(cfg)
        self._prior_cache = {}

    def sources(self, x):
        """The six source feature maps: conv3_3, conv4_3, conv5_3 (L2-normalised), fc7,
        conv6_2, conv7_2."""
        feats = []
        start = 0
        for end, norm in zip(VGG_SOURCE_ENDS, (self.L2Norm3_3, self.L2Norm4_3, self.L2Norm5_3)):
            for layer in self.vgg[start:end]:
                x = layer(x)
            feats.append(norm(x))
            start = end
        for layer in self.vgg[start:]:
            x = layer(x)
        feats.append(x)
        for i, layer in enumerate(self.extras):
            x = F.relu(layer(x), inplace=True)
            if i % 2 == 1:
                feats.append(x)
        return feats

    def heads(self, feats):
        """Apply the loc/conf heads: returns (loc [B, P, 4], conf [B, P, num_classes])."""
        locs, confs = [], []
        for i, (f, loc_layer, conf_layer) in enumerate(zip(feats, self.loc, self.conf)):
            f = head_input(f, loc_layer.weight)
            loc = loc_layer(f)
            conf = conf_layer(f)
            if i == 0:
                background = conf[:, :3].amax(dim=1, keepdim=True)
                conf = torch.cat((background, conf[:, 3:]), dim=1)
            locs.append(loc.permute(0, 2, 3, 1).reshape(loc.size(0), -1, 4))
            confs.append(conf.permute(0, 2, 3, 1).reshape(conf.size(0), -1, self.num_classes))
        return torch.cat(locs, dim=1), torch.cat(confs, dim=1)

    @torch.compiler.disable
    def priors_for(self, image_size, feats, device):
        """Priors [P, 4] (float32, on `device`) for this input size and these source maps."""
        maps = tuple(tuple(f.shape[-2:]) for f in feats)
        key = (tuple(image_size), maps, str(device))
        priors = self._prior_cache.get(key)
        if priors is None:
            priors = PriorBox(image_size, maps, cfg, device=device).forward()
            self._prior_cache = {key: priors}
        return priors

    def forward(self, x):
        feats = self.sources(x)
        loc, conf = self.heads(feats)
        priors = self.priors_for(x.shape[-2:], feats, x.device)
        if self.phase == 'test':
            return self.detect(loc, F.softmax(conf.float(), dim=-1), priors)
        return loc, conf, priors


def head_input(x, weight):
    """A source map `x` in the dtype its loc/conf convolutions compute in.

    L2Norm returns float32. Under autocast that is autocast's dtype: cast once here for both
    convolutions (autocast would cast it once per convolution and add their two gradients in
    float32). Without autocast it is the weights' dtype, for a network converted to half or
    bf16 as a whole (Ascend Apex O2, `net.half()` for inference).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x.to(weight.dtype)


def init_weights_xavier(modules):
    """Xavier-uniform weights and zero biases for every convolution in `modules`."""
    for m in modules:
        for layer in m.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


def init_weights_from_scratch(net):
    """Initialisation for training without a basenet: Kaiming-normal (fan-out) VGG convs,
    Xavier heads and extras, L2Norm scales at their defaults."""
    for layer in net.vgg:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode='fan_out', nonlinearity='relu')
            nn.init.zeros_(layer.bias)
    init_weights_xavier([net.extras, net.loc, net.conf])


def build_s3fd(phase, num_classes=2, variant=None):
    """Build S3FD for phase 'train' or 'test'. variant: 'reference' (dilated fc6, default
    from cfg.MODEL_VARIANT) or 'caffe' (the released model's fc6)."""
    return S3FD(phase, num_classes, variant or cfg.MODEL_VARIANT)
