"""tools/convert_official.py: released S3FD (PyTorch-port layout, BGR input) -> this repository."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tools import convert_official
from utils.files.weights import CheckpointError, load_file, load_model

BGR_MEAN = (104.0, 117.0, 123.0)  # the released model's input mean (B, G, R)
RGB_MEAN = (123.0, 117.0, 104.0)  # this repository's (R, G, B)


class ReleasedNorm(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) * self.weight[None, :, None, None]


class ReleasedS3FD(nn.Module):
    """The released model's structure and key names, written for this test: BGR minus
    BGR_MEAN in, floor max-pooling, fc6 3x3 pad 3, 4-channel conv3_3 confidence with
    max-out background. forward -> (loc [B, P, 4], conf [B, P, 2]) flattened per source
    (row-major over each map), the order S3FD uses."""

    TRUNK = [('conv1_1', 3, 64), ('conv1_2', 64, 64), 'pool',
             ('conv2_1', 64, 128), ('conv2_2', 128, 128), 'pool',
             ('conv3_1', 128, 256), ('conv3_2', 256, 256), ('conv3_3', 256, 256), 'pool',
             ('conv4_1', 256, 512), ('conv4_2', 512, 512), ('conv4_3', 512, 512), 'pool',
             ('conv5_1', 512, 512), ('conv5_2', 512, 512), ('conv5_3', 512, 512), 'pool']
    SOURCES = [('conv3_3_norm', 256, 4), ('conv4_3_norm', 512, 2), ('conv5_3_norm', 512, 2),
               ('fc7', 1024, 2), ('conv6_2', 512, 2), ('conv7_2', 256, 2)]

    def __init__(self):
        super().__init__()
        for item in self.TRUNK:
            if item != 'pool':
                name, cin, cout = item
                setattr(self, name, nn.Conv2d(cin, cout, 3, padding=1))
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=3)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.conv6_1 = nn.Conv2d(1024, 256, 1)
        self.conv6_2 = nn.Conv2d(256, 512, 3, stride=2, padding=1)
        self.conv7_1 = nn.Conv2d(512, 128, 1)
        self.conv7_2 = nn.Conv2d(128, 256, 3, stride=2, padding=1)
        for name, channels in (('conv3_3_norm', 256), ('conv4_3_norm', 512), ('conv5_3_norm', 512)):
            setattr(self, name, ReleasedNorm(channels))
        for name, cin, nconf in self.SOURCES:
            setattr(self, f'{name}_mbox_conf', nn.Conv2d(cin, nconf, 3, padding=1))
            setattr(self, f'{name}_mbox_loc', nn.Conv2d(cin, 4, 3, padding=1))

    def forward(self, x):
        feats = {}
        for item in self.TRUNK:
            if item == 'pool':
                x = F.max_pool2d(x, 2, 2)
            else:
                x = F.relu(getattr(self, item[0])(x))
                feats[item[0]] = x
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        feats['fc7'] = x
        x = F.relu(self.conv6_2(F.relu(self.conv6_1(x))))
        feats['conv6_2'] = x
        x = F.relu(self.conv7_2(F.relu(self.conv7_1(x))))
        feats['conv7_2'] = x
        for name in ('conv3_3', 'conv4_3', 'conv5_3'):
            feats[f'{name}_norm'] = getattr(self, f'{name}_norm')(feats[name])
        locs, confs = [], []
        for name, _, _ in self.SOURCES:
            conf = getattr(self, f'{name}_mbox_conf')(feats[name])
            loc = getattr(self, f'{name}_mbox_loc')(feats[name])
            if conf.shape[1] == 4:
                conf = torch.cat((conf[:, :3].max(1, keepdim=True).values, conf[:, 3:]), 1)
            confs.append(conf.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 2))
            locs.append(loc.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4))
        return torch.cat(locs, 1), torch.cat(confs, 1)


@pytest.fixture(scope='module')
def released():
    torch.manual_seed(0)
    model = ReleasedS3FD().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                # Slightly below the variance-preserving gain, so that the deep sources
                # and all outputs land at the O(1..10) of a trained detector.
                nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
                if m.out_channels not in (2, 4):
                    m.weight.mul_(0.8)
                m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, ReleasedNorm):
                m.weight.uniform_(4.0, 12.0)
    return model


@pytest.fixture(scope='module')
def converted(released, tmp_path_factory):
    folder = tmp_path_factory.mktemp('official')
    src, dst = folder / 's3fd-released.pth', folder / 's3fd_converted.pth'
    torch.save(released.state_dict(), src)
    convert_official.main(convert_official.parse_args(['--src', str(src), '--dst', str(dst)]))
    return str(dst)


def test_saved_checkpoint_format(converted):
    ckpt = load_file(converted)
    assert set(ckpt) == {'weight', 'variant'}
    assert ckpt['variant'] == 'caffe'
    assert len(ckpt['weight']) == 65 and 'vgg.31.weight' in ckpt['weight']


def test_same_outputs_as_released_on_rgb_input(released, converted):
    net = load_model(converted, phase='train')  # variant read from the file
    net.eval()
    assert net.variant == 'caffe'
    torch.manual_seed(1)
    bgr = torch.rand(2, 3, 96, 128) * 255
    rgb = bgr.flip(1)
    with torch.no_grad():
        ref_loc, ref_conf = released(bgr - torch.tensor(BGR_MEAN)[:, None, None])
        loc, conf, priors = net(rgb - torch.tensor(RGB_MEAN)[:, None, None])
    assert loc.shape == ref_loc.shape and conf.shape == ref_conf.shape
    assert priors.shape[0] == loc.shape[1]
    assert ref_loc.std() > 0.1 and ref_conf.std() > 0.1  # outputs are not degenerate
    assert (loc - ref_loc).abs().max().item() <= 1e-4
    assert (conf - ref_conf).abs().max().item() <= 1e-4
    # Feeding BGR to the converted model (the mistake the conversion removes) does differ.
    with torch.no_grad():
        wrong_loc, _, _ = net(bgr - torch.tensor(RGB_MEAN)[:, None, None])
    assert (wrong_loc - ref_loc).abs().max().item() > 1e-2


def test_640_input_gives_34356_priors(converted):
    net = load_model(converted, phase='train')
    with torch.no_grad():
        loc, conf, priors = net(torch.zeros(1, 3, 640, 640))
    assert priors.shape == (34356, 4) and loc.shape == (1, 34356, 4) and conf.shape == (1, 34356, 2)


def test_module_prefix_and_wrapper_accepted(released, tmp_path):
    src = tmp_path / 'wrapped.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in released.state_dict().items()}}, src)
    ckpt = convert_official.main(convert_official.parse_args(['--src', str(src), '--dst', str(tmp_path / 'o.pth')]))
    assert torch.equal(ckpt['weight']['vgg.0.weight'], released.conv1_1.weight.flip(1))
    assert torch.equal(ckpt['weight']['conf.0.weight'], released.conv3_3_norm_mbox_conf.weight)
    assert torch.equal(ckpt['weight']['L2Norm4_3.weight'], released.conv4_3_norm.weight)


def test_wrong_layout_lists_missing_keys(released, tmp_path):
    sd = dict(released.state_dict())
    del sd['fc7_mbox_conf.weight'], sd['conv6_2.bias'], sd['conv5_3_norm.weight']
    src, dst = tmp_path / 'partial.pth', tmp_path / 'o.pth'
    torch.save(sd, src)
    with pytest.raises(CheckpointError) as e:
        convert_official.main(convert_official.parse_args(['--src', str(src), '--dst', str(dst)]))
    msg = str(e.value)
    assert str(src) in msg
    for key in ('fc7_mbox_conf.weight', 'conv6_2.bias', 'conv5_3_norm.weight'):
        assert key in msg
    assert not dst.exists()


def test_wrong_shape_and_extra_keys_are_reported(released, tmp_path):
    sd = dict(released.state_dict())
    sd['conv3_3_norm_mbox_conf.weight'] = torch.zeros(2, 256, 3, 3)  # a 2-channel conv3_3 head
    src = tmp_path / 'shape.pth'
    torch.save(sd, src)
    with pytest.raises(CheckpointError, match=r'conv3_3_norm_mbox_conf.weight \(2, 256, 3, 3\)'):
        convert_official.main(convert_official.parse_args(['--src', str(src), '--dst', str(tmp_path / 'o.pth')]))
    sd = dict(released.state_dict(), extra_head=torch.zeros(1))
    torch.save(sd, src)
    with pytest.raises(CheckpointError, match='unexpected keys.*extra_head'):
        convert_official.main(convert_official.parse_args(['--src', str(src), '--dst', str(tmp_path / 'o.pth')]))


def test_own_layout_gets_a_hint(converted, tmp_path):
    with pytest.raises(CheckpointError, match="already in this repository's layout"):
        convert_official.main(convert_official.parse_args(['--src', converted, '--dst', str(tmp_path / 'o.pth')]))


def test_not_a_checkpoint(tmp_path):
    src = tmp_path / 's3fd.pth'
    src.write_bytes(b'\x89PNG\r\n\x1a\n not weights')
    with pytest.raises(CheckpointError) as e:
        convert_official.main(convert_official.parse_args(['--src', str(src), '--dst', str(tmp_path / 'o.pth')]))
    assert str(e.value).startswith(f'{src}: ')
    assert not (tmp_path / 'o.pth').exists()


def test_code_executing_pickle_is_refused(tmp_path):
    src, marker = tmp_path / 'evil.pth', tmp_path / 'payload-ran'

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), 'w'))  # harmless: creates an empty file

    torch.save({'conv1_1.weight': Payload()}, src)
    with pytest.raises(CheckpointError, match='refused'):
        convert_official.main(convert_official.parse_args(['--src', str(src), '--dst', str(tmp_path / 'o.pth')]))
    assert not marker.exists()
    torch.load(src, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_a_missing_src_says_where_the_released_file_comes_from(tmp_path):
    with pytest.raises(convert_official.UserError) as e:
        convert_official.main(convert_official.parse_args(['--src', 's3fd-619a316812.pth',
                                                           '--dst', str(tmp_path / 'o.pth')]))
    assert str(e.value) == ('--src s3fd-619a316812.pth: no such file. The released S3FD weights in the layout of '
                            'its PyTorch port are s3fd-619a316812.pth, which the face-alignment package downloads '
                            'from https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth (e.g. wget '
                            'that URL)')
