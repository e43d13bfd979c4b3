import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import s3fd
from s3fd import build_s3fd

EXPECTED_VGG = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33]


def expected_shapes(num_classes=2):
    vgg_channels = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                    (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    shapes = {}
    for idx, (cin, cout) in zip(EXPECTED_VGG, vgg_channels):
        shapes[f'vgg.{idx}.weight'] = (cout, cin, 3, 3)
        shapes[f'vgg.{idx}.bias'] = (cout,)
    shapes.update({'vgg.31.weight': (1024, 512, 3, 3), 'vgg.31.bias': (1024,),
                   'vgg.33.weight': (1024, 1024, 1, 1), 'vgg.33.bias': (1024,),
                   'L2Norm3_3.weight': (256,), 'L2Norm4_3.weight': (512,), 'L2Norm5_3.weight': (512,)})
    for i, (cin, cout, k) in enumerate([(1024, 256, 1), (256, 512, 3), (512, 128, 1), (128, 256, 3)]):
        shapes[f'extras.{i}.weight'] = (cout, cin, k, k)
        shapes[f'extras.{i}.bias'] = (cout,)
    for i, c in enumerate([256, 512, 512, 1024, 512, 256]):
        conf = 4 if i == 0 else num_classes
        shapes[f'loc.{i}.weight'] = (4, c, 3, 3)
        shapes[f'loc.{i}.bias'] = (4,)
        shapes[f'conf.{i}.weight'] = (conf, c, 3, 3)
        shapes[f'conf.{i}.bias'] = (conf,)
    return shapes


@pytest.fixture(scope='module')
def train_net():
    torch.manual_seed(0)
    return build_s3fd('train')


def test_state_dict_keys_and_shapes_exactly(train_net):
    sd = train_net.state_dict()
    assert len(sd) == 65
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes()
    # The caffe variant has the same keys and shapes (only fc6's padding/dilation differ).
    caffe = build_s3fd('test', variant='caffe')
    assert {k: tuple(v.shape) for k, v in caffe.state_dict().items()} == expected_shapes()
    assert caffe.vgg[31].dilation == (1, 1) and caffe.vgg[31].padding == (3, 3)
    assert train_net.vgg[31].dilation == (6, 6) and train_net.vgg[31].padding == (6, 6)


def test_l2norm_scales_initialised():
    net = build_s3fd('train')
    assert torch.all(net.L2Norm3_3.weight == 10)
    assert torch.all(net.L2Norm4_3.weight == 8)
    assert torch.all(net.L2Norm5_3.weight == 5)


def test_640_input_gives_34125_priors(train_net):
    with torch.no_grad():
        loc, conf, priors = train_net(torch.zeros(1, 3, 640, 640))
    assert priors.shape == (34125, 4)
    assert loc.shape == (1, 34125, 4) and conf.shape == (1, 34125, 2)


@pytest.mark.parametrize('size', [(160, 224), (481, 637)])
def test_any_input_size_priors_follow_feature_maps(train_net, size):
    with torch.no_grad():
        feats = train_net.sources(torch.zeros(1, 3, *size))
        loc, conf, priors = train_net(torch.zeros(1, 3, *size))
    expected = sum(f.shape[-1] * f.shape[-2] for f in feats)
    assert priors.shape == (expected, 4) and loc.shape[1] == expected == conf.shape[1]
    strides = [size[0] / f.shape[-2] for f in feats]
    assert strides[0] == pytest.approx(4, rel=0.02)


def test_max_out_background(train_net):
    captured = {}
    handle = train_net.conf[0].register_forward_hook(lambda m, i, o: captured.setdefault('raw', o))
    try:
        with torch.no_grad():
            _, conf, _ = train_net(torch.randn(2, 3, 160, 224))
    finally:
        handle.remove()
    raw = captured['raw']  # [B, 4, h, w]
    n0 = raw.shape[-1] * raw.shape[-2]
    bg = raw[:, :3].amax(dim=1).flatten(1)
    face = raw[:, 3].flatten(1)
    assert torch.equal(conf[:, :n0, 0], bg)
    assert torch.equal(conf[:, :n0, 1], face)


def test_gradients_reach_every_parameter():
    torch.manual_seed(1)
    net = build_s3fd('train')
    loc, conf, _ = net(torch.randn(2, 3, 160, 224))
    (loc.square().mean() + conf.square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_test_phase_layout():
    torch.manual_seed(2)
    net = build_s3fd('test').eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 160, 224) * 50)
    assert out.shape == (2, 2, 750, 5)
    assert torch.all(out[:, 0] == 0)
    scores = out[:, 1, :, 0]
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # sorted, zero padding last


def test_l2norm_and_outputs_stay_float32_under_autocast(train_net):
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        x = torch.randn(1, 256, 8, 8).bfloat16()
        assert train_net.L2Norm3_3(x).dtype == torch.float32
        loc, conf, priors = train_net(torch.randn(1, 3, 96, 128))  # bf16 is slow on CPUs without it
    assert priors.dtype == torch.float32
    assert torch.isfinite(loc.float()).all() and torch.isfinite(conf.float()).all()


def test_heads_cast_each_source_once_under_autocast(train_net, monkeypatch):
    """The loc and conf convolutions share one bf16 copy of a source (not one cast each), with
    the same outputs as autocast's own per-convolution casts."""
    x = torch.randn(1, 3, 96, 128)  # small: bf16 is slow on CPUs without native support
    casts = []

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 4 and args[0].shape[-1] > 3 \
                    and args[0].shape[1] > 3:  # not the weights, not the image
                casts.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        with CountCasts():
            loc, conf, _ = train_net(x)
        monkeypatch.setattr(s3fd, 'head_input', lambda f, weight: f)
        loc_ref, conf_ref, _ = train_net(x)
    # the three L2Norm outputs: one cast each (the trunk's maps are bf16 already)
    assert sorted(casts) == sorted([(1, 256, 24, 32), (1, 512, 12, 16), (1, 512, 6, 8)])
    assert torch.equal(loc, loc_ref) and torch.equal(conf, conf_ref)
    # autocast off: the weights' dtype
    assert s3fd.head_input(torch.ones(2), torch.ones(1)).dtype == torch.float32


def test_a_network_converted_to_bf16_runs_and_trains():
    """net.bfloat16() (or Apex O2's half model on Ascend): L2Norm still normalises in float32,
    and its output reaches the heads in the weights' dtype."""
    torch.manual_seed(0)
    net = build_s3fd('train')
    # 96x128: the smallest inputs keep bf16 affordable on CPUs without it, and no stride-2
    # convolution sees a 1x1 map (oneDNN's bf16 weight gradient is wrong there).
    reference = [t.float() for t in net(torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)))[:2]]
    net = net.bfloat16()
    loc, conf, _ = net(torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)).bfloat16())
    assert loc.dtype == conf.dtype == torch.bfloat16
    torch.testing.assert_close(loc.float(), reference[0], rtol=0.1, atol=0.1)
    (loc.float().square().mean() + conf.float().square().mean()).backward()
    assert net.L2Norm3_3.weight.grad.dtype == torch.bfloat16 and torch.isfinite(net.vgg[0].weight.grad).all()


def test_network_code_is_device_agnostic():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for folder, _, files in os.walk(root):
        if any(part in folder for part in ('.venv', '.git', 'tests', 'data/demo')):
            continue
        for name in files:
            if name.endswith('.py'):
                text = open(os.path.join(folder, name), encoding='utf-8').read()
                if re.search(r'\.cuda\(|\bVariable\(|set_default_tensor_type', text):
                    offenders.append(os.path.join(folder, name))
    assert offenders == []


def test_unknown_variant_and_phase_rejected():
    with pytest.raises(ValueError):
        build_s3fd('train', variant='resnet')
    with pytest.raises(ValueError):
        build_s3fd('eval')
