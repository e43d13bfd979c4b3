"""Write the WIDER FACE list files used for training and validation.

    python prepare_wider_data.py --dataset_dir /data/WIDER [--out_dir data] [--drop_invalid]

Reads `<dataset_dir>/wider_face_split/wider_face_{train,val}_bbx_gt.txt` and writes
`<out_dir>/face_train.txt` and `<out_dir>/face_val.txt`, one image per line:
`<absolute image path> <n> x y w h 1 x y w h 1 ...` (pixels, top-left corner and size),
in the order of the annotation file. Faces with w <= 0 or h <= 0 are dropped, and with
`--drop_invalid` also the faces flagged invalid; an image left without a face is still
written, with count 0 (training leaves it out, validation keeps it). Image paths are
`<dataset_dir>/WIDER_<split>/images/<name>`; missing image files are counted, not fatal.
The defaults come from data/config.py (cfg.FACE.WIDER_DIR, the folder of cfg.FACE.TRAIN_FILE).
"""
import argparse
import os


from data.config import cfg
from utils.cli import HelpFormatter
from utils.files.fileio import OutputDirError, atomic_write_text, make_output_dir

# The annotation parser (data/widerface.py, which loads PyTorch for its dataset) is imported
# inside the functions that use it, so that `--help` answers at once.

SPLITS = ('train', 'val')
PROG = 'prepare_wider_data.py'  # the start of its error lines, as argparse's


def parse_args(argv=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description='Write face_train.txt / face_val.txt from WIDER FACE.')
    parser.add_argument('--dataset_dir', default=cfg.FACE.WIDER_DIR,
                        help='WIDER FACE root holding wider_face_split/ and WIDER_{train,val}/images '
                             '(default: cfg.FACE.WIDER_DIR = %(default)s)')
    parser.add_argument('--out_dir', default=os.path.dirname(cfg.FACE.TRAIN_FILE) or '.',
                        help='folder of the list files (default: %(default)s)')
    parser.add_argument('--drop_invalid', action='store_true',
                        help='also drop the faces whose "invalid" flag is 1')
    return parser.parse_args(argv)


def _number(value):
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def convert_split(annotation_file, images_dir, drop_invalid=False):
    """Annotation file -> (list-file lines, stats dict with images, faces, dropped_size,
    dropped_invalid, missing, first_missing (a path or None), repeated (images listed again)).
    Raises AnnotationError for a malformed file or one without any image."""
    from data.widerface import ATTRIBUTE_NAMES, AnnotationError, read_wider_annotations

    records = read_wider_annotations(annotation_file)
    if not records:
        raise AnnotationError(annotation_file, 0, 'no image in the file')
    images_dir = os.path.abspath(images_dir)
    lines = []
    stats = dict(images=0, faces=0, dropped_size=0, dropped_invalid=0, missing=0, first_missing=None,
                 repeated=0)
    seen = set()
    for rec in records:
        boxes = rec.boxes
        keep = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
        stats['dropped_size'] += int((~keep).sum())
        if drop_invalid:
            invalid = keep & (rec.attributes[:, ATTRIBUTE_NAMES.index('invalid')] != 0)
            stats['dropped_invalid'] += int(invalid.sum())
            keep &= ~invalid
        kept = boxes[keep]
        path = os.path.join(images_dir, rec.name)
        if not os.path.isfile(path):
            stats['missing'] += 1
            stats['first_missing'] = stats['first_missing'] or path
        if path in seen:
            stats['repeated'] += 1
        seen.add(path)
        fields = [path, str(len(kept))]
        for x, y, w, h in kept.tolist():
            fields += [_number(x), _number(y), _number(w), _number(h), '1']
        lines.append(' '.join(fields))
        stats['images'] += 1
        stats['faces'] += len(kept)
    return lines, stats


def write_atomic(path, lines):
    """Write text lines to `path` atomically (temporary file in the same folder, then rename)."""
    atomic_write_text(path, ''.join(line + '\n' for line in lines), sync=True)


def main(args):
    """Convert every split whose annotation file exists; returns {split: stats}."""
    from data.widerface import AnnotationError, annotation_path, image_root

    found = {s: annotation_path(args.dataset_dir, s) for s in SPLITS}
    present = {s: p for s, p in found.items() if os.path.isfile(p)}
    if not present:
        raise SystemExit(f'{PROG}: error: no WIDER FACE annotation file found: looked for '
                         f'{found["train"]} and {found["val"]} (set --dataset_dir)')
    try:
        make_output_dir(args.out_dir, '--out_dir')
    except OutputDirError as exc:
        raise SystemExit(f'{PROG}: error: {exc}') from None
    results = {}
    for split in SPLITS:
        if split not in present:
            print(f'{split}: skipped, {found[split]} not found')
            continue
        try:
            lines, stats = convert_split(present[split], image_root(args.dataset_dir, split),
                                         args.drop_invalid)
        except AnnotationError as exc:
            raise SystemExit(f'{PROG}: error: {exc}') from None
        out_file = os.path.join(args.out_dir, f'face_{split}.txt')
        write_atomic(out_file, lines)
        dropped = f'dropped {stats["dropped_size"]} faces with w<=0 or h<=0'
        if args.drop_invalid:
            dropped += f' and {stats["dropped_invalid"]} flagged invalid'
        missing = f'{stats["missing"]} image files missing'
        if stats['missing']:
            missing += f', first: {stats["first_missing"]}'
        repeated = f'; {stats["repeated"]} images listed more than once' if stats['repeated'] else ''
        print(f'{split}: {stats["images"]} images, {stats["faces"]} faces -> {out_file} '
              f'({dropped}; {missing}{repeated})')
        results[split] = stats
    return results


if __name__ == '__main__':
    main(parse_args())
