"""Build the reduced-fc VGG16 basenet (weights/vgg16_reducedfc.pth) from ImageNet VGG16 weights.

    python tools/make_basenet.py --src torchvision [--dst weights/vgg16_reducedfc.pth]
    python tools/make_basenet.py --src vgg16-397923af.pth [--dst ...] [--src_norm torchvision|caffe]

Where the VGG16 comes from:
- `--src torchvision` takes torchvision's ImageNet VGG16 through its weights API
  (`torchvision.models.VGG16_Weights.IMAGENET1K_V1`): the file vgg16-397923af.pth
  (528 MiB) is downloaded once from https://download.pytorch.org/models/vgg16-397923af.pth
  into torch's cache (`$TORCH_HOME/hub/checkpoints`, by default ~/.cache/torch/hub/checkpoints),
  checked against the SHA-256 prefix in its name, and read from there afterwards. This
  option is the only one that downloads anything.
- `--src FILE` is a local VGG16 state_dict in torchvision's layout (`features.N.weight/bias`
  for the 13 convolutions, `classifier.0/3/6.*` for fc6/fc7/fc8), e.g. that same file fetched
  elsewhere (`wget https://download.pytorch.org/models/vgg16-397923af.pth`).
The result is a plain state_dict whose keys are exactly those of
`build_s3fd(...).vgg.state_dict()` (`0.weight` ... `33.bias`); train.py loads it into
`net.vgg` with strict=True.

What is done to the weights:
- conv1_1 ... conv5_3 are copied (features.N -> N).
- fc6 and fc7 become convolutions by decimation, as in the SSD paper's reduced fc
  (following DeepLab-LargeFOV): fc6's 4096x25088 matrix is viewed as 4096x512x7x7
  (torchvision flattens pool5 as channel, row, column), every 4th output channel is kept
  starting at 0 (0, 4, ..., 4092) and every 3rd tap in both spatial directions (0, 3, 6):
  1024x512x3x3, bias likewise every 4th. S3FD runs it with dilation 6. fc7's 4096x4096
  matrix keeps every 4th row and column from 0: 1024x1024x1x1, bias every 4th. fc8 is
  dropped.
- conv1_1 is rewritten for this repository's input. torchvision's VGG16 was trained on RGB
  scaled to [0, 1] and normalised by the ImageNet mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225); S3FD is fed RGB minus (123, 117, 104), unscaled. Since conv1_1 is
  linear, its weights are divided by 255*std per input channel and the mean difference is
  folded into its bias, so every later layer sees the activations the ImageNet model would
  see for the same image. (Exact everywhere except the one-pixel zero padding of conv1_1,
  which now stands for the pixel value (123, 117, 104) instead of 255*mean =
  (123.7, 116.3, 103.5): less than one grey level.) --src_norm caffe does the same for a
  Caffe-trained VGG16 in torchvision's key layout (BGR, 0..255, minus (103.939, 116.779,
  123.68)): input channels are reversed and only the mean difference is folded.
"""
import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torchvision's ImageNet VGG16 (VGG16_Weights.IMAGENET1K_V1.url in torchvision/models/vgg.py).
TORCHVISION_VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
TORCHVISION_SOURCE = 'torchvision'  # --src value that takes it through torchvision's weights API

# How each source was trained: source input channel k reads RGB channel order[k] as
# (pixel / scale - mean[k]) / std[k], pixel in 0..255.
SOURCE_NORMS = {
    'torchvision': dict(order=(0, 1, 2), scale=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    'caffe': dict(order=(2, 1, 0), scale=1.0, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)),
}
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--src', required=True,
                        help="'torchvision': torchvision's ImageNet VGG16 through its weights API (downloaded "
                             "once into torch's cache); or a local VGG16 state_dict in torchvision's layout, "
                             'e.g. vgg16-397923af.pth (where to get it: above)')
    parser.add_argument('--dst', default='weights/vgg16_reducedfc.pth',
                        help='output basenet file (default weights/vgg16_reducedfc.pth, where train.py looks)')
    parser.add_argument('--src_norm', choices=sorted(SOURCE_NORMS), default='torchvision',
                        help='input normalisation the VGG16 was trained with (default: torchvision)')
    return parser.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below
    from utils.cli import exit_if_torchvision_broken
    exit_if_torchvision_broken('make_basenet.py')  # one line, not a traceback, when it does not fit torch


import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from data.config import cfg  # noqa: E402
from s3fd import VARIANTS, vgg  # noqa: E402
from utils.cli import UserError, run_cli  # noqa: E402
from utils.files.weights import atomic_save, check_layout, extract_state_dict, load_file, load_weights  # noqa: E402
from utils.files.fileio import check_output_file  # noqa: E402

FC6_INDEX, FC7_INDEX = 31, 33
FC_CHANNEL_STEP = 4  # 4096 -> 1024 channels
FC6_TAP_STEP = 3  # 7x7 -> 3x3 taps (0, 3, 6)
POOL5_SHAPE = (512, 7, 7)
FC_WIDTH = 4096


def _trunk_shapes():
    """The layers of net.vgg on the meta device (shapes only, no memory, no init cost)."""
    with torch.device('meta'):
        return vgg()


def conv_indices():
    """Indices of the 13 VGG16 convolutions in `features` (and in `net.vgg`): 0, 2, 5, ... 28."""
    return [i for i, layer in enumerate(_trunk_shapes()) if isinstance(layer, nn.Conv2d) and i < FC6_INDEX]


def source_layout():
    """{key: shape} that a torchvision VGG16 state_dict must hold (fc8 is not needed)."""
    layers = _trunk_shapes()
    expected = {}
    for i in conv_indices():
        expected[f'features.{i}.weight'] = layers[i].weight.shape
        expected[f'features.{i}.bias'] = layers[i].bias.shape
    pool5 = POOL5_SHAPE[0] * POOL5_SHAPE[1] * POOL5_SHAPE[2]
    expected['classifier.0.weight'] = torch.Size((FC_WIDTH, pool5))
    expected['classifier.0.bias'] = torch.Size((FC_WIDTH,))
    expected['classifier.3.weight'] = torch.Size((FC_WIDTH, FC_WIDTH))
    expected['classifier.3.bias'] = torch.Size((FC_WIDTH,))
    return expected


def _layout_hint(state):
    keys = set(state)
    if any(k.endswith('running_mean') for k in keys):
        return 'it has batch-norm statistics: this is VGG16-BN; use the plain VGG16 weights'
    if f'{FC6_INDEX}.weight' in keys:
        return 'it is already a reduced-fc basenet in the net.vgg layout: pass it to train.py as it is'
    if 'vgg.0.weight' in keys:
        return 'it is an S3FD checkpoint, not an ImageNet VGG16'
    if 'conv1_1.weight' in keys:
        return 'it is in the released S3FD layout: use tools/convert_official.py'
    return "expected torchvision's VGG16 keys features.N.* and classifier.0/3.*"


def fold_input_normalisation(weight, bias, src_norm='torchvision', dst_mean=None):
    """conv1_1 for this repository's input, from conv1_1 of a VGG16 trained on `src_norm`.

    weight [64, 3, k, k], bias [64]. The returned (weight, bias), applied to RGB minus
    `dst_mean` (default cfg.img_mean) in 0..255, equal the originals applied to the source's
    normalised input of the same image (ignoring the zero padding, see the module doc).
    Computed in float64, returned in the input dtype.
    """
    norm = SOURCE_NORMS[src_norm]
    dst_mean = cfg.img_mean if dst_mean is None else dst_mean
    w, b = weight.double(), bias.double().clone()
    new_w = torch.empty_like(w)
    for k, c in enumerate(norm['order']):
        std = norm['std'][k]
        # x_src[k] = x_dst[c] / (scale*std) + (dst_mean[c] / scale - mean[k]) / std
        new_w[:, c] = w[:, k] / (norm['scale'] * std)
        offset = (dst_mean[c] / norm['scale'] - norm['mean'][k]) / std
        b += w[:, k].sum(dim=(1, 2)) * offset
    return new_w.to(weight.dtype), b.to(bias.dtype)


def reduce_fc(fc6_weight, fc6_bias, fc7_weight, fc7_bias):
    """Decimate VGG16's fc6/fc7 into the reduced-fc convolutions.

    fc6_weight [4096, 25088], fc6_bias [4096], fc7_weight [4096, 4096], fc7_bias [4096].
    Returns fc6 [1024, 512, 3, 3] (output channels 0, 4, ..., taps 0, 3, 6), its bias [1024],
    fc7 [1024, 1024, 1, 1] (rows and columns 0, 4, ...), its bias [1024].
    """
    s, t = FC_CHANNEL_STEP, FC6_TAP_STEP
    fc6 = fc6_weight.reshape(FC_WIDTH, *POOL5_SHAPE)[::s, :, ::t, ::t]
    fc7 = fc7_weight[::s, ::s][:, :, None, None]
    return (fc6.contiguous(), fc6_bias[::s].contiguous(), fc7.contiguous(), fc7_bias[::s].contiguous())


def convert_vgg16(state, src_norm='torchvision', path='<vgg16>'):
    """torchvision-layout VGG16 state_dict -> reduced-fc basenet state_dict (net.vgg keys).

    Raises CheckpointError naming `path` and the missing keys when `state` has another layout.
    """
    check_layout(state, source_layout(), path, 'torchvision VGG16', _layout_hint(state))
    out = {}
    for i in conv_indices():
        out[f'{i}.weight'] = state[f'features.{i}.weight'].float().clone()
        out[f'{i}.bias'] = state[f'features.{i}.bias'].float().clone()
    out['0.weight'], out['0.bias'] = fold_input_normalisation(out['0.weight'], out['0.bias'], src_norm)
    fc6, fc6_b, fc7, fc7_b = reduce_fc(state['classifier.0.weight'].float(), state['classifier.0.bias'].float(),
                                       state['classifier.3.weight'].float(), state['classifier.3.bias'].float())
    out[f'{FC6_INDEX}.weight'], out[f'{FC6_INDEX}.bias'] = fc6, fc6_b
    out[f'{FC7_INDEX}.weight'], out[f'{FC7_INDEX}.bias'] = fc7, fc7_b
    return out


def torch_cache_dir():
    """Where torch's weights downloads are kept: `torch.hub.get_dir()`/checkpoints."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def torchvision_vgg16():
    """torchvision's ImageNet VGG16 state_dict through its weights API, and where it is cached:
    `VGG16_Weights.IMAGENET1K_V1.get_state_dict` downloads vgg16-397923af.pth into
    torch_cache_dir() the first time (the download checked against the SHA-256 prefix in the
    name) and reads it from there afterwards, with weights_only=True. UserError in one line when
    it cannot be had."""
    from torchvision.models import VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1
    cached = os.path.join(torch_cache_dir(), os.path.basename(weights.url))
    if not os.path.isfile(cached):
        print(f"--src torchvision: downloading torchvision's ImageNet VGG16 ({weights.url}, 528 MiB) into "
              f'{torch_cache_dir()}; later runs read it from there', flush=True)
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
        reason = str(getattr(exc, 'reason', '') or exc).strip().splitlines()
        raise UserError(f'--src torchvision: cannot get {weights.url} ({reason[0] if reason else type(exc).__name__}): '
                        f'without internet here, fetch that file elsewhere and give it as --src') from None
    return state, cached


def load_source(src, src_norm='torchvision'):
    """(state_dict, the file it was read from) of --src: torchvision's weights API, or a local file."""
    if src == TORCHVISION_SOURCE:
        if src_norm != 'torchvision':
            raise UserError(f"--src torchvision is torchvision's VGG16, trained on torchvision's normalisation: "
                            f'--src_norm {src_norm} does not apply to it')
        return torchvision_vgg16()
    if not os.path.exists(src):
        raise UserError(f"--src {src}: no such file. It is torchvision's ImageNet VGG16, vgg16-397923af.pth, from "
                        f"{TORCHVISION_VGG16_URL}; with internet, --src torchvision downloads it once into "
                        f"torch's cache ({torch_cache_dir()}) through torchvision's weights API")
    return extract_state_dict(load_file(src), src), src


def main(args):
    """Write the basenet to args.dst (atomically); returns its state_dict."""
    check_output_file(args.dst, '--dst')
    state, source = load_source(args.src, args.src_norm)
    basenet = convert_vgg16(state, args.src_norm, source)
    # Proof that the file fits: strict load into the trunk of both model variants (built on
    # the meta device: keys and shapes are checked, nothing is allocated).
    with torch.device('meta'):
        trunks = [nn.ModuleList(vgg(variant)) for variant in VARIANTS]
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*meta parameter.*no-op')
        for trunk in trunks:
            load_weights(trunk, basenet, args.dst)
    atomic_save(basenet, args.dst)
    print(f'wrote {args.dst} from {source}: {len(basenet)} tensors, conv1_1..conv5_3, fc6 {tuple(basenet["31.weight"].shape)}, '
          f'fc7 {tuple(basenet["33.weight"].shape)}; conv1_1 folded from {args.src_norm} normalisation to '
          f'RGB minus {tuple(cfg.img_mean)}')
    return basenet


if __name__ == '__main__':
    sys.exit(run_cli(main, parse_args, prog='make_basenet.py'))
