"""Export a trained S3FD to ONNX and check the export with onnxruntime.

    pip install -r requirements-onnx.txt        # onnx, onnxruntime, onnxscript
    python tools/export_onnx.py --model weights/sfd_face.pth --out s3fd.onnx
                                [--input_size 640 640] [--dynamic] [--opset 18]
                                [--exporter dynamo|torchscript]

The ONNX model:
  input   image  float32 [B, 3, H, W]: RGB, minus the mean (123, 117, 104), not scaled
                 (the network's own input convention). B is always free; H and W are fixed
                 to --input_size unless --dynamic.
  outputs loc    float32 [B, P, 4]: box offsets against the priors (variances 0.1, 0.2)
          conf   float32 [B, P, 2]: softmax scores (background, face)
          priors float32 [P, 4]: anchors, normalised (cx, cy, w, h); a constant for a fixed
                 size, computed in the graph from the feature-map sizes with --dynamic.
Detections: boxes = decode(loc, priors) scaled by (W, H, W, H), score = conf[..., 1], then
threshold and NMS, i.e. `layers.functions.detection.Detect(cfg).forward(loc, conf, priors)`
(see docs/design.md#decoding-the-outputs for a NumPy/OpenCV version).

Exporter: the default is torch's dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`,
needs onnxscript), the maintained path; --dynamic uses `torch.export.Dim.AUTO` for the batch,
height and width, traced on an example of batch 2 and at least 256x256 pixels, so that
neither the batch nor any feature map is fixed by torch.export's special treatment of sizes
of 1. The legacy TorchScript exporter (`--exporter torchscript`, deprecated since torch 2.9)
gives the same model and is kept as a fallback. Either way the file is written (atomically)
only after onnxruntime agrees with PyTorch on a random image at --input_size (batch 2) and,
with --dynamic, at a second size (batch 1): max abs difference at most --atol + --rtol times
the largest output value. The differences are printed.
"""
import argparse
import contextlib
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.config import MODEL_VARIANTS, cfg  # noqa: E402

EXPORTERS = ('dynamo', 'torchscript')
from utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model', required=True, help='S3FD checkpoint (train.py output or converted weights)')
    parser.add_argument('--out', default='s3fd.onnx', help='output ONNX file')
    parser.add_argument('--input_size', type=int, nargs=2, default=[640, 640], metavar=('H', 'W'),
                        help='input height and width (fixed, or the example size with --dynamic; default 640 640)')
    parser.add_argument('--dynamic', action='store_true', help='any input height and width')
    parser.add_argument('--check_size', type=int, nargs=2, metavar=('H', 'W'),
                        help='second size checked with --dynamic (default: about 3/4 of --input_size)')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset (default 18)')
    parser.add_argument('--exporter', choices=EXPORTERS, default='dynamo', help='default: dynamo')
    parser.add_argument('--variant', choices=MODEL_VARIANTS, help='model variant (default: from the checkpoint)')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='accepted max abs difference: atol + rtol * max|output| (default 1e-4)')
    parser.add_argument('--rtol', type=float, default=1e-5, help='see --atol (default 1e-5)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random check images')
    return parser.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below
    from utils.cli import exit_if_torchvision_broken
    exit_if_torchvision_broken('export_onnx.py')  # one line, not a traceback, when it does not fit torch


import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from layers.functions.prior_box import prior_grid  # noqa: E402
from s3fd import MIN_INPUT_SIDE  # noqa: E402
from utils.cli import UserError, run_cli  # noqa: E402
from utils.files.weights import load_model  # noqa: E402
from utils.files.fileio import atomic_path, check_output_file  # noqa: E402

INPUT_NAME = 'image'
OUTPUT_NAMES = ('loc', 'conf', 'priors')
MIN_DYNAMIC_EXAMPLE = 256
INSTALL_HINT = 'install the optional ONNX packages: pip install -r requirements-onnx.txt'


def graph_priors(image, feats, steps=None, anchor_sizes=None):
    """Priors [P, 4] (normalised cx, cy, w, h) computed from tensor shapes only, so that an
    exporter records them as graph operations: `PriorBox`'s values in float32 arithmetic
    (PriorBox computes in float64 and rounds)."""
    steps = cfg.STEPS if steps is None else steps
    anchor_sizes = cfg.ANCHOR_SIZES if anchor_sizes is None else anchor_sizes
    return prior_grid(image.shape[-2:], [f.shape[-2:] for f in feats], steps, anchor_sizes,
                      dtype=torch.float32, device=image.device)


class S3FDForExport(nn.Module):
    """S3FD with the outputs a deployment needs: image [B, 3, H, W] ->
    (loc [B, P, 4], conf [B, P, 2] softmax, priors [P, 4]).

    `fixed_priors` given ([P, 4], for one input size): returned as a constant. Otherwise the
    priors are computed from the input and feature-map shapes (any input size).
    """

    def __init__(self, net, fixed_priors=None):
        super().__init__()
        self.net = net
        if fixed_priors is not None:
            self.register_buffer('fixed_priors', fixed_priors.detach().float().clone())
        else:
            self.fixed_priors = None

    def forward(self, image):
        feats = self.net.sources(image)
        loc, conf = self.net.heads(feats)
        conf = F.softmax(conf, dim=-1)
        priors = self.fixed_priors if self.fixed_priors is not None else graph_priors(image, feats)
        return loc, conf, priors


def _import_onnx(exporter):
    """(onnx, onnxruntime), or UserError naming what is missing."""
    missing = []
    modules = {}
    for name in ('onnx', 'onnxruntime') + (('onnxscript',) if exporter == 'dynamo' else ()):
        try:
            modules[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        extra = ' (or use --exporter torchscript)' if missing == ['onnxscript'] else ''
        raise UserError(f'export_onnx needs {", ".join(missing)}: {INSTALL_HINT}{extra}')
    return modules['onnx'], modules['onnxruntime']


class _ConstantPriorsNotice(logging.Filter):
    """Drops the one notice the dynamo exporter prints about a correct export of a fixed size:
    'Skipped deduplication of initializer ... as it is a graph input or output'.

    Why it is printed: for a fixed input size the priors are a constant, and a constant the
    exporter returns becomes an initializer (its optimizer lifts every constant into one, in
    torch.onnx's `optimize` step: onnxscript's optimize_ir). An initializer may be a graph
    output (the ONNX checker and onnxruntime accept it), but onnx_ir's
    DeduplicateInitializersPass then leaves it alone and logs that at WARNING level, which
    Python's last-resort handler prints. The cause cannot go without changing the outputs:
    computed in the graph from the feature-map sizes (as with --dynamic), the priors of a
    fixed size are constant-folded into the same initializer. So only that notice, about the
    priors' initializer, is dropped; any other goes through."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)

    def filter(self, record):
        return not (record.msg.startswith('Skipped deduplication of initializer') and 'graph input or output'
                    in record.msg and record.args and record.args[0] in self.names)


@contextlib.contextmanager
def _without_constant_priors_notice():
    logger = logging.getLogger('onnx_ir.passes.common.initializer_deduplication')
    notice = _ConstantPriorsNotice({'fixed_priors', OUTPUT_NAMES[2]})
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def export(wrapper, example, path, dynamic, opset, exporter):
    """Write `wrapper` traced on `example` to `path` as ONNX with the given exporter."""
    if exporter == 'dynamo':
        auto = torch.export.Dim.AUTO
        axes = {0: auto, 2: auto, 3: auto} if dynamic else {0: auto}
        with _without_constant_priors_notice():
            torch.onnx.export(wrapper, (example,), path, dynamo=True, input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), opset_version=opset,
                              dynamic_shapes={INPUT_NAME: axes}, external_data=False, verbose=False)
    else:
        axes = {INPUT_NAME: {0: 'batch'}, 'loc': {0: 'batch'}, 'conf': {0: 'batch'}}
        if dynamic:
            axes[INPUT_NAME].update({2: 'height', 3: 'width'})
            axes['loc'][1] = axes['conf'][1] = 'num_priors'
            axes['priors'] = {0: 'num_priors'}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)  # chosen explicitly by the user
            torch.onnx.export(wrapper, (example,), path, dynamo=False, input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), opset_version=opset,
                              dynamic_axes=axes, do_constant_folding=True)


def add_metadata(onnx, path, variant, source):
    """Record the input/output conventions in the model file (metadata_props)."""
    model = onnx.load(path)
    props = {
        'input': f'{INPUT_NAME} float32 [B,3,H,W]: RGB minus {tuple(cfg.img_mean)}, unscaled',
        'outputs': 'loc [B,P,4] offsets; conf [B,P,2] softmax (background, face); '
                   'priors [P,4] normalised (cx, cy, w, h)',
        'variance': ' '.join(str(v) for v in cfg.VARIANCE),
        'mean_rgb': ' '.join(str(v) for v in cfg.img_mean),
        'steps': ' '.join(str(v) for v in cfg.STEPS),
        'anchor_sizes': ' '.join(str(v) for v in cfg.ANCHOR_SIZES),
        'variant': variant,
        'source_checkpoint': os.path.basename(source),
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, path)


def compare(session, wrapper, image, atol, rtol):
    """Max abs difference onnxruntime vs PyTorch per output: {'loc': ..., 'conf': ..., 'priors': ...}.

    Raises UserError when an output differs by more than atol + rtol * max|PyTorch output|.
    """
    with torch.no_grad():
        expected = wrapper(image)
    try:
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: image.numpy()})
    except Exception as e:  # onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0]
        raise UserError(f'onnxruntime could not run the export on a {tuple(image.shape)} input: {first}') from None
    diffs = {}
    for name, ref, out in zip(OUTPUT_NAMES, expected, got):
        if tuple(out.shape) != tuple(ref.shape):
            raise UserError(f'onnxruntime gave {name} of shape {tuple(out.shape)}, PyTorch {tuple(ref.shape)}')
        diffs[name] = (torch.from_numpy(out) - ref).abs().max().item()
        limit = atol + rtol * ref.abs().max().item()
        if diffs[name] > limit:
            raise UserError(f'the export disagrees with PyTorch on {name} for a {tuple(image.shape)} input: '
                            f'max abs difference {diffs[name]:.3g} > {limit:.3g} (--atol {atol}, --rtol {rtol})')
    return diffs


def default_check_size(height, width):
    """A second input size for --dynamic: about 3/4 of the first, not a multiple of 32."""
    return max(48, height * 3 // 4 + 4), max(48, width * 3 // 4 - 4)


def random_image(batch, height, width, generator):
    """A mean-subtracted RGB image batch [B, 3, H, W], pixel values uniform in 0..255."""
    pixels = torch.rand(batch, 3, height, width, generator=generator) * 255
    return pixels - torch.tensor(cfg.img_mean)[:, None, None]


def main(args):
    """Export, check with onnxruntime, write args.out. Returns {(B, H, W): {output: max abs diff}}."""
    onnx, ort = _import_onnx(args.exporter)
    height, width = args.input_size
    if min(height, width) < MIN_INPUT_SIDE:
        raise UserError(f'--input_size {height} {width}: both sides must be at least {MIN_INPUT_SIDE} pixels')
    check_output_file(args.out, '--out')
    net = load_model(args.model, phase='train', variant=args.variant).eval()
    generator = torch.Generator().manual_seed(args.seed)
    checks = [random_image(2, height, width, generator)]
    if args.dynamic:
        check_h, check_w = args.check_size or default_check_size(height, width)
        checks.append(random_image(1, check_h, check_w, generator))
    fixed_priors = None
    example = checks[0]
    if args.dynamic:
        # torch.export treats a size of 1 as a special case (0/1 specialisation): traced with
        # a 1x1 conv7_2 map, the in-graph priors would only work for 1x1. From 256 pixels
        # on, every source map has at least 2 cells (the checks still run at --input_size).
        example = random_image(2, max(height, MIN_DYNAMIC_EXAMPLE), max(width, MIN_DYNAMIC_EXAMPLE), generator)
    else:
        with torch.no_grad():
            fixed_priors = net(checks[0][:1])[2]
    wrapper = S3FDForExport(net, fixed_priors).eval()

    with atomic_path(args.out) as tmp:
        try:
            export(wrapper, example, tmp, args.dynamic, args.opset, args.exporter)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = '; --exporter torchscript may work' if args.exporter == 'dynamo' else ''
            raise UserError(f'{args.exporter} export of {args.model} failed: {first}{hint}') from None
        add_metadata(onnx, tmp, net.variant, args.model)
        session = ort.InferenceSession(tmp, providers=['CPUExecutionProvider'])
        results = {}
        for image in checks:
            key = tuple(image.shape[:1]) + tuple(image.shape[2:])
            results[key] = compare(session, wrapper, image, args.atol, args.rtol)
            shown = ', '.join(f'{k} {v:.2e}' for k, v in results[key].items())
            print(f'onnxruntime vs PyTorch, batch {key[0]} at {key[1]}x{key[2]}: max abs difference {shown}')
    shape = '[B, 3, H, W]' if args.dynamic else f'[B, 3, {height}, {width}]'
    print(f'wrote {args.out} ({args.exporter} exporter, opset {args.opset}, variant {net.variant}): '
          f'input {INPUT_NAME} {shape} RGB minus {tuple(cfg.img_mean)}; outputs loc, conf (softmax), priors')
    return results


if __name__ == '__main__':
    sys.exit(run_cli(main, parse_args, prog='export_onnx.py'))
