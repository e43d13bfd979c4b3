"""Detect faces in images and save copies with the boxes and scores drawn.

    python demo.py --model weights/sfd_face.pth IMAGE_OR_DIR [IMAGE_OR_DIR ...] [--out runs/demo]
        [--thresh 0.6] [--mode single|multiscale] [--max_size N] [--device cpu|gpu|npu]
        [--device_id N] [--variant reference|caffe] [--annotations LIST]

Each IMAGE_OR_DIR is an image or a directory (its images, not its subdirectories: .jpg,
.jpeg, .png, .bmp, .webp, .tif, .tiff); give several, or a shell glob (photos/*.jpg). Each
result is written to ``OUT/<file name>`` in the input's format (two inputs of the same file
name are refused: one would replace the other); one line per image gives the number of
detections at ``--thresh`` and the detection time (preprocessing, network and
post-processing on the device; decoding and drawing excluded; the first image also pays the
warm-up). Detections are what the model takes for faces, false ones included: with
``--annotations LIST`` (a list file as prepare_wider_data.py writes, e.g. data/face_val.txt),
the images it lists also get how many detections fall on an annotated face (IoU >= 0.5, one
detection per face, higher scores first) and how many elsewhere, drawn green and red.
Unreadable images are skipped and reported; the exit status is 1 when no image could be
processed.
"""
import argparse
import collections
import os
import sys
import time

from data.config import MODEL_VARIANTS, cfg
from utils.cli import HelpFormatter, UserError, input_side, run_cli

# PyTorch, OpenCV and the model are imported inside the functions that use them, so that
# `--help` and usage errors answer at once.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
MATCH_IOU = 0.5  # a detection on an annotated face: the WIDER FACE protocol's overlap
ON_FACE, ELSEWHERE = (0, 255, 0), (255, 0, 0)  # RGB colours of the boxes with --annotations


class ImageResult(collections.namedtuple('ImageResult', 'path out faces seconds')):
    """One processed image: input path, output path, detections at --thresh (`faces`: what
    the model takes for faces) and seconds. `annotated` (the faces the --annotations list gives
    the image) and `matched` (detections on one of them) are None when it lists no such image."""
    annotated = None
    matched = None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description='S3FD face detection demo: draw the detected faces.')
    parser.add_argument('paths', nargs='+', metavar='IMAGE_OR_DIR',
                        help='images or directories of images (several, or a shell glob)')
    parser.add_argument('--model', default='weights/sfd_face.pth',
                        help='weights: a state_dict or a training checkpoint (default weights/sfd_face.pth)')
    parser.add_argument('--out', default=os.path.join('runs', 'demo'), help='output directory (default runs/demo)')
    parser.add_argument('--thresh', type=float, default=0.6, help='draw and count faces scoring >= this')
    parser.add_argument('--mode', default='single', choices=('single', 'multiscale'),
                        help='single pass (default) or the S3FD multi-scale + flip test')
    parser.add_argument('--max_size', type=input_side, default=None,
                        help='cap the longer input side at N px (default: H*W <= 1700*1200)')
    parser.add_argument('--device', default=None, choices=('cpu', 'gpu', 'npu'),
                        help='default: gpu when CUDA is available, else cpu')
    parser.add_argument('--device_id', type=int, default=0, help='GPU/NPU index')
    parser.add_argument('--variant', default=None, choices=MODEL_VARIANTS,
                        help='network variant (default: from the checkpoint, else cfg.MODEL_VARIANT)')
    parser.add_argument('--annotations', metavar='LIST', default=None,
                        help='a list file (prepare_wider_data.py\'s, e.g. data/face_val.txt): for the images it '
                             'lists, count the detections on annotated faces (IoU >= 0.5) and elsewhere, and '
                             'draw them green and red')
    return parser.parse_args(argv)


def read_annotations(list_file):
    """{real path of an image: float32 [n, 4] (x1, y1, x2, y2) pixels} from a list file."""
    from data.widerface import AnnotationError, read_face_list

    try:
        paths, boxes = read_face_list(list_file)
    except FileNotFoundError:
        raise UserError(f'--annotations {list_file}: no such file') from None
    except AnnotationError as exc:
        raise UserError(str(exc)) from None
    return {os.path.realpath(p): b[:, :4].copy() for p, b in zip(paths, boxes)}


def on_annotated_faces(dets, faces):
    """Which detections (float32 [n, 5] x1, y1, x2, y2, score, pixels) fall on an annotated
    face (float32 [m, 4]): each face takes at most one detection, the detections taken in
    order of score, each the free face of highest IoU, at least MATCH_IOU. Returns a bool [n]."""
    import numpy as np
    import torch
    from torchvision.ops import box_iou

    hit = np.zeros(len(dets), dtype=bool)
    if not len(dets) or not len(faces):
        return hit
    iou = box_iou(torch.from_numpy(np.ascontiguousarray(dets[:, :4])), torch.from_numpy(faces)).numpy()
    free = np.ones(len(faces), dtype=bool)
    for i in np.argsort(-dets[:, 4], kind='stable'):
        candidates = np.where(free & (iou[i] >= MATCH_IOU))[0]
        if len(candidates):
            free[candidates[np.argmax(iou[i, candidates])]] = False
            hit[i] = True
    return hit


def list_inputs(path):
    """Image files of ``path`` (a file, or a directory's image files sorted by name)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise UserError(f'{path}: no image files ({", ".join(IMAGE_EXTENSIONS)}) in this directory')
        return files
    raise UserError(f'{path}: no such file or directory')


def list_all_inputs(paths):
    """The image files of every path in order, each file once. UserError when two different
    files have the same name: their results (OUT/<file name>) would replace each other."""
    files, seen, by_name = [], set(), {}
    for path in paths:
        for file in list_inputs(path):
            real = os.path.realpath(file)
            if real in seen:
                continue
            seen.add(real)
            name = os.path.basename(file)
            if name in by_name:
                raise UserError(f'{by_name[name]} and {file}: both would be saved as {name} in --out, one over '
                                f'the other: give them in separate runs with separate --out folders')
            by_name[name] = file
            files.append(file)
    return files


def save_image(path, rgb):
    """Write ``rgb`` (uint8 [H, W, 3]) to ``path`` atomically, in the format of its extension."""
    import cv2

    from utils.files.fileio import atomic_write_bytes

    ext = os.path.splitext(path)[1].lower() or '.jpg'
    ok, data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UserError(f'{path}: OpenCV cannot encode {ext} images')
    atomic_write_bytes(path, data.tobytes())


def main(args):
    """Process every image; returns a list of ImageResult (input path, output path, faces,
    seconds; with --annotations, `annotated` and `matched`).

    Raises UserError, CheckpointError or DeviceUnavailable (one-line messages) for bad input.
    """
    from utils.files.weights import load_model
    from utils.files.fileio import make_output_dir
    from utils.files.image_io import ImageReadError, load_rgb
    from utils.inference.detector import Detector, draw_detections, inference_device

    files = list_all_inputs(args.paths)
    annotations = read_annotations(args.annotations) if args.annotations else {}
    out_dir = os.path.abspath(args.out)
    if any(os.path.dirname(os.path.abspath(f)) == out_dir for f in files):
        raise UserError(f'--out {args.out} is the input directory: the results would replace the images')
    runtime = inference_device(args.device, args.device_id)
    net = load_model(args.model, 'test', runtime.device, args.variant)
    # Each pass keeps the protocol's candidates; --thresh selects what is drawn and counted.
    detector = Detector(net, runtime.device, thresh=min(args.thresh, cfg.CONF_THRESH), max_size=args.max_size)
    make_output_dir(out_dir, '--out')
    results, skipped = [], []
    for path in files:
        try:
            rgb = load_rgb(path, exif_orientation=True)  # a photo as a viewer shows it
        except ImageReadError as exc:
            skipped.append(str(exc))
            print(f'skipped: {exc}', file=sys.stderr)
            continue
        runtime.synchronize()
        start = time.perf_counter()
        dets = detector.detect(rgb, args.mode)
        runtime.synchronize()
        seconds = time.perf_counter() - start
        shown = dets[dets[:, 4] >= args.thresh]
        annotated = annotations.get(os.path.realpath(path))
        if annotated is None:
            drawn, faces = draw_detections(rgb, shown)
            found = ''
        else:
            hit = on_annotated_faces(shown, annotated)
            drawn, _ = draw_detections(rgb, shown[~hit], color=ELSEWHERE)
            drawn, _ = draw_detections(drawn, shown[hit], color=ON_FACE)
            faces = len(shown)
            found = (f', {int(hit.sum())} on the {len(annotated)} annotated face(s) (IoU >= {MATCH_IOU:g}, green) '
                     f'and {int((~hit).sum())} elsewhere (red)')
        out_path = os.path.join(out_dir, os.path.basename(path))
        save_image(out_path, drawn)
        print(f'{path}: {faces} detection(s) at score >= {args.thresh:g}{found}, {seconds * 1000:.1f} ms '
              f'({rgb.shape[1]}x{rgb.shape[0]}) -> {out_path}', flush=True)
        result = ImageResult(path, out_path, faces, seconds)
        if annotated is not None:
            result.annotated, result.matched = len(annotated), int(hit.sum())
        results.append(result)
    if skipped:
        print(f'warning: skipped {len(skipped)} unreadable image(s)', file=sys.stderr)
    if not results:
        raise UserError(f'none of the {len(files)} image(s) could be read')
    if len(results) > 1:
        mean = sum(r[3] for r in results[1:]) / (len(results) - 1)
        print(f'{len(results)} image(s), {sum(r.faces for r in results)} detection(s); '
              f'{mean * 1000:.1f} ms per image after the first')
    return results


def cli(argv=None):
    """Command-line entry: one-line errors and exit status 1 instead of tracebacks."""
    return run_cli(main, parse_args, argv, prog='demo.py')


if __name__ == '__main__':
    sys.exit(cli())
