"""tools/make_basenet.py: torchvision VGG16 -> reduced-fc basenet for net.vgg."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from s3fd import build_s3fd, vgg
from tools import make_basenet
from utils.files.weights import CheckpointError, load_file, load_weights

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RGB_MEAN = (123.0, 117.0, 104.0)  # this repository's input mean (cfg.img_mean)
TV_MEAN = (0.485, 0.456, 0.406)
TV_STD = (0.229, 0.224, 0.225)
CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


@pytest.fixture(scope='module')
def tv_vgg16():
    """torchvision VGG16 (exact keys and shapes) with seeded weights and non-zero biases."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope='module')
def tv_file(tv_vgg16, tmp_path_factory):
    path = tmp_path_factory.mktemp('vgg') / 'vgg16.pth'
    torch.save(tv_vgg16.state_dict(), path)
    return str(path)


@pytest.fixture(scope='module')
def basenet(tv_file, tmp_path_factory):
    """The basenet as written by the tool (read back from disk)."""
    dst = str(tmp_path_factory.mktemp('out') / 'vgg16_reducedfc.pth')
    make_basenet.main(make_basenet.parse_args(['--src', tv_file, '--dst', dst]))
    return load_file(dst)


def conv_outputs(layers, x, first_conv=None):
    """Outputs of every convolution among layers[0:30] (after their in-place ReLU), in order.
    `first_conv`, when given, replaces the first layer (the reference with the folded padding)."""
    outs = []
    for i, layer in enumerate(list(layers)[:30]):
        x = first_conv(x) if (i == 0 and first_conv is not None) else layer(x)
        if isinstance(layer, nn.Conv2d):
            outs.append(x)
    return outs


def test_keys_are_net_vgg_and_load_strict(basenet):
    for variant in ('reference', 'caffe'):
        net = build_s3fd('train', variant=variant)
        assert set(basenet) == set(net.vgg.state_dict())
        load_weights(net.vgg, basenet)  # strict, raises on any mismatch
    assert basenet['31.weight'].shape == (1024, 512, 3, 3)
    assert basenet['33.weight'].shape == (1024, 1024, 1, 1)
    assert all(v.dtype == torch.float32 for v in basenet.values())


def test_trunk_conv_outputs_equal_torchvision(basenet, tv_vgg16):
    """Our trunk on RGB-minus-mean pixels gives torchvision VGG16's conv outputs on the
    ImageNet-normalised image: the folding of the normalisation into conv1_1 is exact."""
    trunk = nn.ModuleList(vgg('reference')).eval()
    load_weights(trunk, basenet)
    torch.manual_seed(1)
    pixels = torch.rand(1, 3, 64, 96) * 255  # RGB, 0..255; all pooled maps even-sized
    mean = torch.tensor(RGB_MEAN)[:, None, None]
    tv_mean = torch.tensor(TV_MEAN)[:, None, None]
    tv_std = torch.tensor(TV_STD)[:, None, None]
    x_ours = pixels - mean
    x_tv = (pixels / 255 - tv_mean) / tv_std

    # Zero padding of our input is the pixel value RGB_MEAN; in torchvision's input space
    # that is `pad` below (not 0). The reference pads with it explicitly, so the comparison
    # is exact everywhere.
    pad = ((mean / 255 - tv_mean) / tv_std).reshape(1, 3, 1, 1)
    conv1 = tv_vgg16.features[0]

    def tv_first_conv(x):
        padded = pad.expand(1, 3, x.shape[2] + 2, x.shape[3] + 2).clone()
        padded[:, :, 1:-1, 1:-1] = x
        return F.conv2d(padded, conv1.weight, conv1.bias)

    with torch.no_grad():
        ours = conv_outputs(trunk, x_ours)
        ref = conv_outputs(tv_vgg16.features, x_tv, tv_first_conv)
        plain = F.relu(conv1(x_tv))  # torchvision's own zero padding (outputs are after ReLU)
    assert len(ours) == len(ref) == 13
    for k, (a, b) in enumerate(zip(ours, ref)):
        scale = b.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=f'conv #{k} differs')
    # Away from the border, conv1_1 equals torchvision's plain conv1_1 as it stands.
    torch.testing.assert_close(ours[0][..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1], rtol=1e-4,
                               atol=1e-4 * plain.abs().max().item())


def test_only_conv1_1_is_changed(basenet, tv_vgg16):
    sd = tv_vgg16.state_dict()
    for i in CONVS[1:]:
        assert torch.equal(basenet[f'{i}.weight'], sd[f'features.{i}.weight'])
        assert torch.equal(basenet[f'{i}.bias'], sd[f'features.{i}.bias'])
    assert not torch.equal(basenet['0.weight'], sd['features.0.weight'])


def test_fc6_fc7_reduction_by_hand(basenet, tv_vgg16):
    sd = tv_vgg16.state_dict()
    w6, b6 = sd['classifier.0.weight'], sd['classifier.0.bias']
    w7, b7 = sd['classifier.3.weight'], sd['classifier.3.bias']
    # fc6 input index of pool5 (channel c, row r, column q) is c*49 + r*7 + q.
    for o, c, i, j in [(0, 0, 0, 0), (1023, 511, 2, 2), (5, 17, 1, 2), (300, 256, 2, 0)]:
        assert basenet['31.weight'][o, c, i, j] == w6[4 * o, c * 49 + 3 * i * 7 + 3 * j]
        assert basenet['31.bias'][o] == b6[4 * o]
    for o, i in [(0, 0), (1023, 1023), (7, 900), (512, 3)]:
        assert basenet['33.weight'][o, i, 0, 0] == w7[4 * o, 4 * i]
        assert basenet['33.bias'][o] == b7[4 * o]


def test_reduced_fc_equals_original_fc_on_decimated_input(basenet, tv_vgg16):
    """fc6 as a 3x3 conv with dilation 3 on a 7x7 pool5 map = the original fc6 (every 4th
    output) on that map with all taps but (0, 3, 6)^2 zeroed; fc7 likewise on every 4th input."""
    torch.manual_seed(2)
    pool5 = torch.randn(1, 512, 7, 7)
    mask = torch.zeros(7, 7)
    mask[::3, ::3] = 1
    fc6 = tv_vgg16.classifier[0]
    fc7 = tv_vgg16.classifier[3]
    with torch.no_grad():
        reduced6 = F.conv2d(pool5, basenet['31.weight'], basenet['31.bias'], dilation=3).flatten()
        full6 = fc6((pool5 * mask).flatten(1))[0, ::4]
        torch.testing.assert_close(reduced6, full6, rtol=1e-4, atol=1e-5)
        h = torch.randn(1, 1024)
        sparse = torch.zeros(1, 4096)
        sparse[:, ::4] = h
        reduced7 = F.conv2d(h[:, :, None, None], basenet['33.weight'], basenet['33.bias']).flatten()
        full7 = fc7(sparse)[0, ::4]
        torch.testing.assert_close(reduced7, full7, rtol=1e-4, atol=1e-5)


def test_caffe_source_reverses_channels(tv_vgg16, tmp_path):
    """--src_norm caffe: a BGR 0..255 VGG16 gives, on our RGB input, the conv1_1 output it
    gives on BGR minus its own mean (interior pixels)."""
    conv1 = tv_vgg16.features[0]
    state = {f'features.0.{n}': p for n, p in conv1.state_dict().items()}
    w, b = make_basenet.fold_input_normalisation(state['features.0.weight'], state['features.0.bias'], 'caffe')
    torch.manual_seed(3)
    rgb = torch.rand(1, 3, 12, 10) * 255
    bgr = rgb.flip(1)
    caffe_in = bgr - torch.tensor((103.939, 116.779, 123.68))[:, None, None]
    ours_in = rgb - torch.tensor(RGB_MEAN)[:, None, None]
    with torch.no_grad():
        ref = conv1(caffe_in)[..., 1:-1, 1:-1]
        got = F.conv2d(ours_in, w, b, padding=1)[..., 1:-1, 1:-1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _malicious_pickle(path, marker):
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), 'w'))  # harmless: creates an empty file
    torch.save({'features.0.weight': Payload()}, path)


def test_wrong_layout_lists_missing_keys_and_keeps_dst(tv_vgg16, tmp_path):
    sd = dict(tv_vgg16.state_dict())
    del sd['features.28.weight'], sd['classifier.3.bias']
    src = tmp_path / 'partial.pth'
    torch.save(sd, src)
    dst = tmp_path / 'dst.pth'
    dst.write_bytes(b'previous')
    with pytest.raises(CheckpointError) as e:
        make_basenet.main(make_basenet.parse_args(['--src', str(src), '--dst', str(dst)]))
    msg = str(e.value)
    assert str(src) in msg and 'features.28.weight' in msg and 'classifier.3.bias' in msg
    assert dst.read_bytes() == b'previous'


def test_basenet_given_as_source_gets_a_hint(basenet, tmp_path):
    src = tmp_path / 'already.pth'
    torch.save(basenet, src)
    with pytest.raises(CheckpointError, match='already a reduced-fc basenet'):
        make_basenet.main(make_basenet.parse_args(['--src', str(src), '--dst', str(tmp_path / 'x.pth')]))


def test_not_a_checkpoint(tmp_path):
    src = tmp_path / 'vgg16.pth'
    src.write_text('this is not a checkpoint\n')
    with pytest.raises(CheckpointError, match=r'not a PyTorch checkpoint \(neither a zip archive nor a pickle\)') as e:
        make_basenet.main(make_basenet.parse_args(['--src', str(src), '--dst', str(tmp_path / 'x.pth')]))
    assert str(src) in str(e.value)
    assert not (tmp_path / 'x.pth').exists()


def test_code_executing_pickle_is_refused(tmp_path):
    src, marker = tmp_path / 'evil.pth', tmp_path / 'payload-ran'
    _malicious_pickle(src, marker)
    with pytest.raises(CheckpointError, match='refused'):
        make_basenet.main(make_basenet.parse_args(['--src', str(src), '--dst', str(tmp_path / 'x.pth')]))
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(src, weights_only=False)
    assert marker.exists()


def test_command_line_error_is_one_line(tmp_path):
    src = tmp_path / 'bad.pth'
    src.write_text('nope')
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'make_basenet.py'),
                           '--src', str(src), '--dst', str(tmp_path / 'x.pth')],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith('make_basenet.py: error: ') and str(src) in proc.stderr
    assert 'Traceback' not in proc.stderr


VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'  # torchvision/models/vgg.py


def test_src_torchvision_takes_the_weights_api_file_once_into_torch_cache(tv_file, basenet, tmp_path, monkeypatch,
                                                                          capsys):
    """--src torchvision goes through torchvision's weights API (VGG16_Weights.IMAGENET1K_V1 ->
    torch.hub.load_state_dict_from_url) into $TORCH_HOME. The one function of that path that
    reaches the network, torch.hub.download_url_to_file(url, dst, hash_prefix, progress), is
    replaced by a copy of the local test file: nothing is downloaded."""
    import shutil
    downloads = []

    def download_url_to_file(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, dst, hash_prefix))
        shutil.copyfile(tv_file, dst)

    monkeypatch.setattr(torch.hub, 'download_url_to_file', download_url_to_file)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'vgg16-397923af.pth'
    dst = tmp_path / 'vgg16_reducedfc.pth'
    make_basenet.main(make_basenet.parse_args(['--src', 'torchvision', '--dst', str(dst)]))
    assert downloads == [(VGG16_URL, str(cached), '397923af')]   # the official file, its hash checked
    out = capsys.readouterr().out
    assert f"--src torchvision: downloading torchvision's ImageNet VGG16 ({VGG16_URL}, 528 MiB) into " \
           f'{cached.parent}; later runs read it from there' in out
    assert f'wrote {dst} from {cached}:' in out
    written = load_file(str(dst))
    assert set(written) == set(basenet) and all(torch.equal(written[k], basenet[k]) for k in basenet)
    state, source = make_basenet.torchvision_vgg16()   # a second time: from the cache
    assert len(downloads) == 1 and source == str(cached) and 'downloading' not in capsys.readouterr().out
    with pytest.raises(make_basenet.UserError, match='--src_norm caffe does not apply'):
        make_basenet.main(make_basenet.parse_args(['--src', 'torchvision', '--src_norm', 'caffe', '--dst', str(dst)]))


def test_a_missing_src_says_where_the_file_comes_from(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with pytest.raises(make_basenet.UserError) as error:
        make_basenet.main(make_basenet.parse_args(['--src', 'vgg16-397923af.pth', '--dst', str(tmp_path / 'x.pth')]))
    assert str(error.value) == (
        f"--src vgg16-397923af.pth: no such file. It is torchvision's ImageNet VGG16, vgg16-397923af.pth, from "
        f"{VGG16_URL}; with internet, --src torchvision downloads it once into torch's cache "
        f"({tmp_path / 'torch_home' / 'hub' / 'checkpoints'}) through torchvision's weights API")
    assert make_basenet.TORCHVISION_VGG16_URL == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
