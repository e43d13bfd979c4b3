"""What the network sees in training and in validation: the size of the faces at its input,
the anchors they match, and (with --model) the loss of the same weights on both kinds of input.

Training samples are the data-anchor-sampling crops of the training transform; validation
samples are whole images resized to input_size x input_size, as the reference validates. On
small inputs the two differ a lot: a whole image squashed to 160 px leaves most faces below
the smallest anchor (16 px), while the crops bring a face to an anchor's scale. This is why the
validation loss can rise while the training loss falls and the WIDER AP rises
(docs/training.md#why-the-validation-loss-can-rise-while-the-ap-rises).

    python benchmarks/face_scale.py --train_file data/demo/face_train.txt --val_file data/demo/face_val.txt \\
        --input_size 160 --model data/demo/weights/sfd_face.pth

Prints one JSON object, per kind of input (train: the training list through the training
transform; val: the validation list as validation sees it; val_cropped: the validation list
through the training transform):
  images, faces    counted over one pass (one augmentation per image for the crops);
  face_px          percentiles 10/50/90 of sqrt(w * h) of the faces at the input, in pixels;
  below_anchor     the fraction of faces smaller than the smallest anchor (cfg.ANCHOR_SIZES[0]);
  below_half_anchor  the fraction smaller than half of it;
  positives_per_image  anchors matched to a face (the loss's positives), mean per image;
  loss             with --model, one entry per model: mean loc + conf loss per batch (the
                   quantity validation logs), and its loc and conf parts.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--train_file', required=True, help='training list (prepare_wider_data.py format)')
    p.add_argument('--val_file', required=True, help='validation list')
    p.add_argument('--input_size', default=640, type=int, help='side of the square network input')
    p.add_argument('--seed', default=0, type=int, help="the training augmentation's seed")
    p.add_argument('--epoch', default=0, type=int, help='the epoch whose augmentation draws the crops')
    p.add_argument('--images', default=None, type=int, help='the first N images of each list only')
    p.add_argument('--batch_size', default=8, type=int, help='batch of the loss (validation averages per batch)')
    p.add_argument('--model', action='append', default=[],
                   help='weights to compute the loss with (repeat for several); none: sizes only')
    return p.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.config import cfg  # noqa: E402
from data.factory import detection_collate  # noqa: E402
from data.widerface import WIDERDetection  # noqa: E402
from layers.modules.multibox_loss import MultiBoxLoss  # noqa: E402
from s3fd import build_s3fd  # noqa: E402
from utils.files.weights import load_model  # noqa: E402
from utils.cli import run_cli  # noqa: E402


def batches(dataset, count, epoch, batch_size):
    """The first `count` samples as collated batches (images [B, 3, S, S], targets), one
    batch in memory at a time."""
    dataset.set_epoch(epoch)
    for start in range(0, count, batch_size):
        yield detection_collate([dataset[i] for i in range(start, min(count, start + batch_size))])


@torch.no_grad()
def measure(batch_iter, input_size, priors, criterion, nets):
    """One pass: face sizes at the input, matched anchors per image, and each net's mean loss
    per batch (loc + conf, as train.py's validation computes it)."""
    smallest = float(cfg.ANCHOR_SIZES[0])
    sides, positives, images_seen, batch_count = [], 0, 0, 0
    losses = {path: np.zeros(2) for path, _ in nets}
    for images, targets in batch_iter:
        for target in targets:
            wh = (target[:, 2:4] - target[:, :2]) * input_size
            sides.extend(torch.sqrt(wh[:, 0] * wh[:, 1]).tolist())
        _, conf_t = criterion.build_targets(targets, priors, len(targets))
        positives += int((conf_t > 0).sum())
        for path, net in nets:
            loss_l, loss_c = criterion(net(images), targets)
            losses[path] += (float(loss_l), float(loss_c))
        images_seen += len(targets)
        batch_count += 1
    sides = np.asarray(sides, dtype=np.float64)
    loss = {}
    for path, (loc, conf) in losses.items():
        loc, conf = loc / max(1, batch_count), conf / max(1, batch_count)
        loss[path] = {'loss': round(loc + conf, 4), 'loc': round(loc, 4), 'conf': round(conf, 4)}
    return {
        'images': images_seen, 'faces': int(sides.size),
        'face_px': {f'p{q}': round(float(np.percentile(sides, q)), 1) for q in (10, 50, 90)} if sides.size else None,
        'below_anchor': round(float((sides < smallest).mean()), 3) if sides.size else None,
        'below_half_anchor': round(float((sides < smallest / 2).mean()), 3) if sides.size else None,
        'positives_per_image': round(positives / max(1, images_seen), 1),
        'loss': loss,
    }


def main(args):
    datasets = {  # the training transform leaves out images without faces: val_cropped may be shorter
        'train': (WIDERDetection(args.train_file, mode='train', input_size=args.input_size, seed=args.seed),
                  args.epoch),
        'val': (WIDERDetection(args.val_file, mode='val', input_size=args.input_size, seed=args.seed), 0),
        'val_cropped': (WIDERDetection(args.val_file, mode='train', input_size=args.input_size, seed=args.seed),
                        args.epoch),
    }
    criterion = MultiBoxLoss(cfg)
    nets = [(path, load_model(path, phase='train').eval()) for path in args.model]  # loc, conf and priors out
    probe = nets[0][1] if nets else build_s3fd('train')  # the anchors of this input size
    with torch.no_grad():
        priors = probe(torch.zeros(1, 3, args.input_size, args.input_size))[2]
    result = {'input_size': args.input_size, 'smallest_anchor': cfg.ANCHOR_SIZES[0]}
    for kind, (dataset, epoch) in datasets.items():
        count = min(len(dataset), args.images or len(dataset))
        result[kind] = measure(batches(dataset, count, epoch, args.batch_size), args.input_size, priors,
                               criterion, nets)
    print(json.dumps(result))
    return result


def cli(argv=None):
    return run_cli(main, parse_args, argv, prog='face_scale.py')


if __name__ == '__main__':
    sys.exit(cli())
