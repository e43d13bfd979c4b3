"""Convert the released S3FD weights (Caffe model as ported to PyTorch) to this repository.

    python tools/convert_official.py --src s3fd-619a316812.pth --dst weights/s3fd_official.pth

--src is a state_dict in the layout of the public PyTorch port of the released Caffe model
(face_alignment's `net_s3fd.s3fd`), the file s3fd-619a316812.pth, which the face-alignment
package (face_alignment/detection/sfd/sfd_detector.py) downloads from
    https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth
(this tool downloads nothing). Its keys: `conv1_1` ... `conv5_3`,
`fc6`, `fc7`, `conv6_1`, `conv6_2`, `conv7_1`, `conv7_2` (`.weight`/`.bias`), the L2Norm
scales `conv3_3_norm`, `conv4_3_norm`, `conv5_3_norm` (`.weight`), and the heads
`<source>_mbox_loc` / `<source>_mbox_conf` for the sources conv3_3_norm, conv4_3_norm,
conv5_3_norm, fc7, conv6_2, conv7_2 (conv3_3_norm_mbox_conf has 4 channels: 3 background
logits max-out plus the face logit). A `module.` prefix or a {'state_dict': ...} wrapper is
accepted.

The output is {'weight': state_dict in this repository's keys, 'variant': 'caffe'}: the
released fc6 is 3x3 with pad 3 and no dilation, which `build_s3fd(..., variant='caffe')`
builds (fc7 is 24x24 at 640x640, 34,356 priors). `utils.files.weights.load_model`, wider_test.py
and demo.py pick the variant from the file.

Input: the released model takes BGR minus (104, 117, 123); this repository feeds RGB minus
(123, 117, 104), the same per-colour means. The input channels of conv1_1 are reversed, so
the converted model gives the released model's outputs on the same image when its sides are
multiples of 32. Elsewhere a pooling layer can round a map's size differently: Caffe rounds
up at every pool, the PyTorch port down, and this repository rounds up at pool3 only (as its
reference variant does), so a source map may have one row or column more or less.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Where the face-alignment package (face_alignment/detection/sfd/sfd_detector.py) downloads the file.
RELEASED_URL = 'https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth'
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--src', required=True,
                        help='released S3FD weights in the layout of its PyTorch port: s3fd-619a316812.pth '
                             '(where to get it: above)')
    parser.add_argument('--dst', required=True, help='output checkpoint for this repository')
    return parser.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below
    from utils.cli import exit_if_torchvision_broken
    exit_if_torchvision_broken('convert_official.py')  # one line, not a traceback, when it does not fit torch


import torch  # noqa: E402

from s3fd import build_s3fd  # noqa: E402
from utils.cli import UserError, run_cli  # noqa: E402
from utils.files.weights import (CheckpointError, atomic_save, check_layout, describe_keys,  # noqa: E402
                              extract_state_dict, load_file, load_weights)
from utils.files.fileio import check_output_file  # noqa: E402

VARIANT = 'caffe'
# Released name -> this repository's module, for every convolution (weight and bias).
CONV_NAMES = {
    'conv1_1': 'vgg.0', 'conv1_2': 'vgg.2',
    'conv2_1': 'vgg.5', 'conv2_2': 'vgg.7',
    'conv3_1': 'vgg.10', 'conv3_2': 'vgg.12', 'conv3_3': 'vgg.14',
    'conv4_1': 'vgg.17', 'conv4_2': 'vgg.19', 'conv4_3': 'vgg.21',
    'conv5_1': 'vgg.24', 'conv5_2': 'vgg.26', 'conv5_3': 'vgg.28',
    'fc6': 'vgg.31', 'fc7': 'vgg.33',
    'conv6_1': 'extras.0', 'conv6_2': 'extras.1', 'conv7_1': 'extras.2', 'conv7_2': 'extras.3',
}
SOURCES = ('conv3_3_norm', 'conv4_3_norm', 'conv5_3_norm', 'fc7', 'conv6_2', 'conv7_2')
CONV_NAMES.update({f'{source}_mbox_loc': f'loc.{i}' for i, source in enumerate(SOURCES)})
CONV_NAMES.update({f'{source}_mbox_conf': f'conf.{i}' for i, source in enumerate(SOURCES)})
# L2Norm scales (weight only).
NORM_NAMES = {'conv3_3_norm': 'L2Norm3_3', 'conv4_3_norm': 'L2Norm4_3', 'conv5_3_norm': 'L2Norm5_3'}
FIRST_CONV = 'conv1_1.weight'


def key_map():
    """{released key: this repository's key} for all 65 tensors."""
    mapping = {}
    for src, dst in CONV_NAMES.items():
        mapping[f'{src}.weight'] = f'{dst}.weight'
        mapping[f'{src}.bias'] = f'{dst}.bias'
    for src, dst in NORM_NAMES.items():
        mapping[f'{src}.weight'] = f'{dst}.weight'
    return mapping


def released_layout():
    """{released key: shape}, from this repository's 'caffe' variant (built on the meta device)."""
    with torch.device('meta'):
        own = build_s3fd('train', variant=VARIANT).state_dict()
    return {src: own[dst].shape for src, dst in key_map().items()}


def _layout_hint(state):
    if 'vgg.0.weight' in state:
        return "it is already in this repository's layout: load it directly"
    if 'features.0.weight' in state or '0.weight' in state:
        return 'it is a VGG16 or basenet file: use tools/make_basenet.py'
    return None


def convert_state_dict(state, path='<checkpoint>'):
    """Released-layout state_dict -> this repository's state_dict (variant 'caffe').

    conv1_1's input channels are reversed (BGR -> RGB). Raises CheckpointError naming `path`
    and the missing or unexpected keys when `state` has another layout.
    """
    mapping = key_map()
    check_layout(state, released_layout(), path, 'released S3FD', _layout_hint(state))
    unexpected = sorted(set(state) - set(mapping))
    if unexpected:
        raise CheckpointError(f'{path}: unexpected keys for the released S3FD layout: {describe_keys(unexpected, 10)}')
    out = {}
    for src, dst in mapping.items():
        tensor = state[src].float()
        if src == FIRST_CONV:
            tensor = tensor.flip(1)  # input channel order B, G, R -> R, G, B
        out[dst] = tensor.contiguous().clone()
    return out


def main(args):
    """Convert args.src and write args.dst atomically; returns the saved checkpoint dict."""
    check_output_file(args.dst, '--dst')
    if not os.path.exists(args.src):
        raise UserError(f'--src {args.src}: no such file. The released S3FD weights in the layout of its PyTorch '
                        f'port are s3fd-619a316812.pth, which the face-alignment package downloads from '
                        f'{RELEASED_URL} (e.g. wget that URL)')
    state = extract_state_dict(load_file(args.src), args.src)
    converted = convert_state_dict(state, args.src)
    net = build_s3fd('train', variant=VARIANT)
    load_weights(net, converted, args.src)  # strict: proves the file loads as it is saved
    checkpoint = {'weight': converted, 'variant': VARIANT}
    atomic_save(checkpoint, args.dst)
    print(f"wrote {args.dst}: {len(converted)} tensors, variant '{VARIANT}' (fc6 3x3 pad 3); "
          f'conv1_1 input channels reversed: feed RGB minus (123, 117, 104)')
    return checkpoint


if __name__ == '__main__':
    sys.exit(run_cli(main, parse_args, prog='convert_official.py'))
