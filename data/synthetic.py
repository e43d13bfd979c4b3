"""A small synthetic WIDER FACE, in WIDER's exact on-disk layout.

Every script of the repository (prepare_wider_data.py, training, wider_test.py, wider_eval.py)
treats the output exactly like the real dataset, so the whole pipeline runs on a machine
without WIDER FACE::

    DIR/WIDER_train/images/<event>/<name>.jpg
    DIR/WIDER_val/images/<event>/<name>.jpg
    DIR/wider_face_split/wider_face_train_bbx_gt.txt
    DIR/wider_face_split/wider_face_val_bbx_gt.txt
    DIR/eval_tools/ground_truth/wider_face_val.mat
    DIR/eval_tools/ground_truth/wider_{easy,medium,hard}_val.mat
    DIR/synthetic_wider.json   (parameters and summary; "complete": true once all files are written)

Images are JPEG (quality 85), 640 to 1024 px wide, with cluttered backgrounds and 0 to 30
drawn faces from about 8 px to several hundred px tall: a skin-coloured ellipse with eyes,
eyebrows, nose, mouth, ears and hair, varied skin tones, roll and yaw, partial occlusion by an
object or a hand, blur and extreme lighting on some.

Annotations follow WIDER: a box ``x y w h`` in pixels (top-left corner, width, height) that
covers the face ellipse, lies inside the image (``x >= 0``, ``y >= 0``, ``x + w <= W``,
``y + h <= H``) and has ``w, h >= 1``, then the attribute flags ``blur`` (0 clear, 1 normal,
2 heavy), ``expression`` (1 = open mouth), ``illumination`` (1 = extreme), ``invalid`` (1 for
tiny faces that are also heavily blurred or occluded), ``occlusion`` (0 none, 1 up to a third
of the box covered, 2 more) and ``pose`` (1 = strong yaw or roll).

Difficulty settings of the evaluation .mat files (``gt_list``, 1-based indices of the faces
that count), by size as measured on the real val sets (the 1st percentile of counted face
heights is 10, 30 and 50 px in hard, medium and easy):
hard = valid faces at least 10 px tall; medium = hard faces at least 30 px tall;
easy = medium faces at least 50 px tall that are not heavily occluded.
So easy is a subset of medium, which is a subset of hard. As in the official files, an image
without faces has count 0 and a line of ten zeros in the text file, and one all-zero box row
(counted in no setting) in the .mat files.

Output is a pure function of (seed, counts): each image draws from its own
``numpy.random.default_rng([seed, split, index])``, JPEGs come from ``cv2.imencode`` and the
.mat header carries no date, so the same arguments give byte-identical files.

Command line::

    python -m data.synthetic --out DIR --train 200 --val 50 --seed 0 [--overwrite]
"""
import argparse
import io
import json
import math
import os
import shutil
import sys
import time

from utils.cli import HelpFormatter

PROG = 'python -m data.synthetic'  # how it is run: argparse starts its usage errors with it, main() its own


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog=PROG,
        description='Generate a synthetic WIDER FACE (images, bbx_gt annotation files, evaluation '
                    '.mat files) in the real dataset\'s on-disk layout.')
    parser.add_argument('--out', required=True,
                        help='output directory, the WIDER root (e.g. data/WIDER_synthetic)')
    parser.add_argument('--train', type=int, default=200, help='number of training images (0: none)')
    parser.add_argument('--val', type=int, default=50, help='number of validation images (0: none)')
    parser.add_argument('--seed', type=int, default=0,
                        help='random seed; the same seed and counts give identical files')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a synthetic dataset made with other arguments '
                             '(never a folder without the synthetic manifest)')
    return parser.parse_args(argv)


if __name__ == '__main__':
    parse_args()  # --help and usage errors answer here, before PyTorch is imported below


import cv2  # noqa: E402
import numpy as np  # noqa: E402
import scipy.io  # noqa: E402

from data.widerface import ATTRIBUTE_NAMES, annotation_path, image_root
from utils.files.fileio import atomic_write_bytes
from utils.evaluation.widerface_eval import FACE_MAT, SETTING_MATS, SETTINGS

GENERATOR_VERSION = 1
MANIFEST_NAME = 'synthetic_wider.json'
JPEG_QUALITY = 85
MAX_FACES = 30
MIN_FACE_HEIGHT = 8

# Size thresholds (pixels, box height) of the difficulty settings.
HARD_MIN_HEIGHT = 10
MEDIUM_MIN_HEIGHT = 30
EASY_MIN_HEIGHT = 50

SPLITS = ('train', 'val')
_SPLIT_ID = {'train': 0, 'val': 1}

# (event folder, name stems, probability of a crowd scene of many small faces)
EVENTS = (
    ('0--Parade', ('marchingband', 'Parade'), 0.35),
    ('1--Handshaking', ('Handshaking',), 0.05),
    ('2--Demonstration', ('Protesters', 'Demonstrators'), 0.30),
    ('4--Dancing', ('Dancing',), 0.10),
    ('7--Cheering', ('Cheering',), 0.30),
    ('12--Group', ('Group', 'Team_Organized_Group'), 0.25),
    ('20--Family_Group', ('Family_Group',), 0.10),
    ('37--Soccer', ('soccer_ball', 'Soccer'), 0.15),
)

# (width, height) of the images.
IMAGE_SIZES = ((1024, 768), (1024, 683), (1024, 576), (800, 600), (768, 1024), (640, 480), (640, 640))

# RGB palettes; cv2 draws in BGR, see _bgr.
SKIN_TONES = ((255, 224, 196), (250, 211, 175), (241, 194, 125), (224, 172, 105), (198, 134, 66),
              (170, 110, 70), (141, 85, 36), (110, 70, 45), (92, 58, 34), (62, 40, 28))
HAIR_COLOURS = ((20, 18, 16), (45, 30, 20), (70, 45, 25), (110, 75, 45), (200, 170, 110),
                (150, 60, 30), (160, 160, 160), (225, 225, 220))
IRIS_COLOURS = ((30, 20, 15), (60, 40, 20), (40, 70, 110), (50, 90, 60))

ANNOTATION_FILES = {s: annotation_path('', s) for s in SPLITS}
GT_DIR = os.path.join('eval_tools', 'ground_truth')
MAT_FILES = (FACE_MAT,) + tuple(SETTING_MATS[s] for s in SETTINGS)
# Top-level entries of DIR that this generator owns (removed by overwrite=True).
_OWNED = ('WIDER_train', 'WIDER_val', 'wider_face_split', 'eval_tools')

_SHIFT = 4                 # cv2 drawing with 4 fractional bits: sub-pixel positions for tiny faces
_ONE = 1 << _SHIFT


# ----------------------------------------------------------------------------- small helpers
def _bgr(rgb):
    return (float(rgb[2]), float(rgb[1]), float(rgb[0]))


def _fx(v):
    """Pixel coordinate -> cv2 fixed point (shift=_SHIFT)."""
    return int(round(v * _ONE))


def _pt(x, y):
    return (_fx(x), _fx(y))


def _ellipse(img, centre, axes, angle, colour, thickness=-1, start=0, end=360):
    ax = (max(1, _fx(axes[0])), max(1, _fx(axes[1])))
    cv2.ellipse(img, _pt(*centre), ax, angle, start, end, colour, thickness, cv2.LINE_AA, _SHIFT)


def _jitter(rng, rgb, amount):
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)


def _random_colour(rng):
    return tuple(float(c) for c in rng.uniform(0, 255, 3))


def image_name(event, index):
    """File stem of image `index` of a split in `event`, e.g. '0_Parade_marchingband_0_17'
    (train and val may share a stem: their paths differ, as in WIDER)."""
    number, label = event[0].split('--', 1)
    stems = event[1]
    return f'{number}_{label}_{stems[index % len(stems)]}_{number}_{index}'


def _event_of(index, count):
    """Images are assigned to events in contiguous blocks, so files are grouped by event."""
    return EVENTS[index * min(count, len(EVENTS)) // count]


# ----------------------------------------------------------------------------- background
def _background(rng, width, height):
    """Cluttered BGR uint8 background [height, width, 3]."""
    lw, lh = max(2, width // 32), max(2, height // 32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(0.0, 1.0, lw)[None, :]
    ys = np.linspace(0.0, 1.0, lh)[:, None]
    t = xs * math.cos(theta) + ys * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    small = c0 + t[..., None] * (c1 - c0)
    blotch = rng.normal(0.0, rng.uniform(5, 45), (max(2, lh // 4), max(2, lw // 4), 3))
    small = small + cv2.resize(blotch, (lw, lh), interpolation=cv2.INTER_CUBIC)
    img = cv2.resize(np.clip(small, 0, 255).astype(np.float32), (width, height),
                     interpolation=cv2.INTER_LINEAR).astype(np.uint8)

    for _ in range(int(rng.integers(8, 40))):
        _clutter_shape(rng, img, width, height)

    amp = int(rng.integers(0, 20))
    if amp:
        noise = rng.integers(-amp, amp + 1, (height // 2, width // 2, 3), dtype=np.int16)
        noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_NEAREST)
        img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return img


def _clutter_shape(rng, img, width, height):
    kind = rng.choice(7, p=(0.22, 0.12, 0.2, 0.16, 0.12, 0.1, 0.08))
    size = math.exp(rng.uniform(math.log(5), math.log(0.6 * width)))
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    colour = _random_colour(rng)
    if kind == 0:    # filled rectangle
        w, h = size, size * rng.uniform(0.2, 2.0)
        cv2.rectangle(img, _pt(cx - w / 2, cy - h / 2), _pt(cx + w / 2, cy + h / 2), colour, -1,
                      cv2.LINE_8, _SHIFT)
    elif kind == 1:  # rectangle outline
        w, h = size, size * rng.uniform(0.2, 2.0)
        cv2.rectangle(img, _pt(cx - w / 2, cy - h / 2), _pt(cx + w / 2, cy + h / 2), colour,
                      int(rng.integers(1, 6)), cv2.LINE_8, _SHIFT)
    elif kind == 2:  # filled ellipse
        _ellipse(img, (cx, cy), (size / 2, size / 2 * rng.uniform(0.3, 1.5)), rng.uniform(0, 180), colour)
    elif kind == 3:  # thick line
        a = rng.uniform(0, 2 * math.pi)
        cv2.line(img, _pt(cx, cy), _pt(cx + size * math.cos(a), cy + size * math.sin(a)), colour,
                 int(rng.integers(1, 12)), cv2.LINE_AA, _SHIFT)
    elif kind == 4:  # polygon
        n = int(rng.integers(3, 7))
        pts = np.stack([cx + rng.uniform(-size, size, n) / 2, cy + rng.uniform(-size, size, n) / 2], 1)
        cv2.fillPoly(img, [np.round(pts * _ONE).astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)
    elif kind == 5:  # striped patch (fences, windows, text-like texture)
        w, h = size, size * rng.uniform(0.3, 1.5)
        step = rng.uniform(3, 14)
        x0, y0 = cx - w / 2, cy - h / 2
        vertical = rng.random() < 0.5
        n = int((w if vertical else h) / step)
        thick = int(rng.integers(1, 4))
        for k in range(min(n, 80)):
            if vertical:
                cv2.line(img, _pt(x0 + k * step, y0), _pt(x0 + k * step, y0 + h), colour, thick,
                         cv2.LINE_8, _SHIFT)
            else:
                cv2.line(img, _pt(x0, y0 + k * step), _pt(x0 + w, y0 + k * step), colour, thick,
                         cv2.LINE_8, _SHIFT)
    else:            # featureless skin-coloured blob: a hard negative
        tone = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 15)
        _ellipse(img, (cx, cy), (size / 4, size / 4 * rng.uniform(0.8, 1.6)), rng.uniform(0, 180), _bgr(tone))


# ----------------------------------------------------------------------------- faces
def _scene_heights(rng, height, crowd_prob):
    """Face heights (pixels) of one image; empty for a scene without faces."""
    u = rng.random()
    if u < 0.08:
        return []
    if u < 0.08 + crowd_prob:
        n = int(rng.integers(12, MAX_FACES + 1))
        return list(np.exp(rng.uniform(math.log(MIN_FACE_HEIGHT), math.log(40), n)))
    hmax = min(0.8 * height, 450.0)
    if rng.random() < 0.15:  # portrait: one or two large faces
        n = int(rng.integers(1, 3))
        return list(rng.uniform(150, max(151.0, hmax), n))
    n = min(int(rng.geometric(0.3)), 12)
    return list(np.exp(rng.uniform(math.log(12), math.log(hmax), n)))


def _local_to_image(face, u, v):
    """Face-local coordinates (u along the width, v down, in semi-axes) -> image pixels."""
    x, y = u * face['a'], v * face['b']
    c, s = face['cos'], face['sin']
    return face['cx'] + c * x - s * y, face['cy'] + s * x + c * y


def _extent(face, us, vs):
    pts = [_local_to_image(face, u, v) for u in us for v in vs]
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _sample_face(rng, h):
    """Shape and attributes of one face of height about `h` px (placement comes later)."""
    pose = int(rng.random() < 0.15)
    roll, yaw = rng.normal(0, 7), rng.uniform(-0.25, 0.25)
    if pose:
        if rng.random() < 0.6:
            yaw = rng.choice((-1, 1)) * rng.uniform(0.5, 0.9)
        else:
            roll = rng.choice((-1, 1)) * rng.uniform(25, 45)
    b = h / 2
    a = b * rng.uniform(0.72, 0.86) * (1 - 0.2 * abs(yaw))
    th = math.radians(roll)
    face = dict(a=a, b=b, roll=roll, yaw=yaw, cos=math.cos(th), sin=math.sin(th), pose=pose)
    face['hx'] = math.hypot(a * face['cos'], b * face['sin'])
    face['hy'] = math.hypot(a * face['sin'], b * face['cos'])
    return face


def _place_faces(rng, heights, width, height):
    """Position faces so that no two head regions (face, hair, hat, ears) overlap."""
    placed = []
    heads = np.zeros((0, 4))
    for h in sorted(heights, reverse=True):
        face = _sample_face(rng, min(h, 0.85 * height, 0.85 * width))
        if 2 * face['hx'] >= width or 2 * face['hy'] >= height:
            continue
        for _ in range(25):
            face['cx'] = rng.uniform(face['hx'], width - face['hx'])
            face['cy'] = rng.uniform(face['hy'], height - face['hy'])
            head = np.array(_extent(face, (-1.35, 1.35), (-1.7, 1.25)))
            if len(heads) == 0 or not np.any((heads[:, 0] < head[2]) & (head[0] < heads[:, 2]) &
                                             (heads[:, 1] < head[3]) & (head[1] < heads[:, 3])):
                break
        else:
            continue
        x1 = max(0, math.floor(face['cx'] - face['hx']))
        y1 = max(0, math.floor(face['cy'] - face['hy']))
        x2 = min(width, math.ceil(face['cx'] + face['hx']))
        y2 = min(height, math.ceil(face['cy'] + face['hy']))
        face['box'] = (x1, y1, x2 - x1, y2 - y1)
        face['head'] = head
        heads = np.vstack([heads, head])
        placed.append(face)
    return placed


def _draw_body(rng, img, face):
    """Neck and shoulders below the face (sometimes none): drawn before every face, so they
    never cover one."""
    x, y, w, h = face['box']
    kind = rng.choice(3, p=(0.25, 0.4, 0.35))
    if kind == 0:
        return
    colour = _random_colour(rng)
    cx, top = x + w / 2, y + 1.05 * h
    spread = rng.uniform(0.9, 1.5)
    if kind == 1:
        _ellipse(img, (cx, top + 1.3 * h), (spread * w, 1.5 * h), rng.normal(0, 5), colour)
    else:
        pts = np.array([[cx - 0.5 * w, top], [cx + 0.5 * w, top], [cx + spread * w, top + 0.35 * h],
                        [cx + spread * w, top + 3 * h], [cx - spread * w, top + 3 * h],
                        [cx - spread * w, top + 0.35 * h]])
        cv2.fillPoly(img, [np.round(pts * _ONE).astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)
    neck = _bgr(np.array(face['skin']) * 0.8)
    cv2.rectangle(img, _pt(x + 0.32 * w, y + 0.7 * h), _pt(x + 0.68 * w, top + 0.1 * h), neck, -1,
                  cv2.LINE_8, _SHIFT)


def _face_attributes(rng, face):
    """Draw the attribute flags and the colours of one face."""
    h = face['box'][3]
    face['expression'] = int(rng.random() < 0.12)
    face['illumination'] = int(rng.random() < 0.1)
    face['blur'] = int(rng.choice(3, p=(0.55, 0.3, 0.15)))
    face['occ_frac'] = 0.0
    if h >= 12 and rng.random() < 0.2:
        face['occ_frac'] = rng.uniform(0.1, 0.33) if rng.random() < 0.6 else rng.uniform(0.36, 0.6)
    face['occlusion'] = 0 if face['occ_frac'] == 0 else (1 if face['occ_frac'] <= 0.33 else 2)
    face['invalid'] = int(h < HARD_MIN_HEIGHT and (face['blur'] == 2 or face['occlusion'] == 2))
    face['skin'] = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 12)
    face['hair'] = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] if rng.random() < 0.85 else None
    face['iris'] = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]
    # Extreme illumination: every colour of the face scaled towards black or towards white.
    face['light'] = (0, 1.0)
    if face['illumination']:
        face['light'] = (0, rng.uniform(0.3, 0.5)) if rng.random() < 0.6 else (255, rng.uniform(0.25, 0.45))


def _lit(face, rgb):
    """RGB colour of the face under its lighting -> BGR for cv2."""
    base, k = face['light']
    return _bgr([base + (c - base) * k for c in rgb])


def _thick(v):
    return max(1, int(round(v)))


def _draw_face(rng, img, face):
    """Hair, ears, face, eyes, eyebrows, nose, mouth, accessories, occluder and blur of one face.

    Positions are in face-local units (see _local_to_image); yaw moves the features sideways
    and narrows the far eye, roll rotates everything.
    """
    a, b, roll, yaw = face['a'], face['b'], face['roll'], face['yaw']
    h = face['box'][3]
    skin = face['skin']
    dark_skin = tuple(c * 0.72 for c in skin)

    def at(u, v):
        return _local_to_image(face, u, v)

    if face['hair'] is not None:
        hair = _jitter(rng, face['hair'], 10)
        _ellipse(img, at(-0.25 * yaw, -0.18), (1.1 * a, 1.02 * b), roll, _lit(face, hair))
    if h >= 20:
        for side in (-1, 1):
            if side * yaw > 0.5:
                continue  # the far ear is hidden by a turned head
            _ellipse(img, at(side * (1.0 - 0.25 * side * yaw), 0.05), (0.16 * a, 0.28 * b), roll,
                     _lit(face, dark_skin))
    _ellipse(img, (face['cx'], face['cy']), (a, b), roll, _lit(face, skin))
    if face['hair'] is not None and rng.random() < 0.7:  # fringe
        _ellipse(img, at(-0.1 * yaw, -0.95), (0.85 * a, 0.32 * b), roll, _lit(face, hair), start=0, end=180)
    if rng.random() < 0.07 and h >= 20:  # hat
        hat = _lit(face, _random_colour(rng))
        _ellipse(img, at(0, -1.0), (1.25 * a, 0.25 * b), roll, hat)
        _ellipse(img, at(0, -1.1), (0.95 * a, 0.5 * b), roll, hat, start=180, end=360)

    shift = 0.35 * yaw
    brow = _lit(face, tuple(c * 0.5 for c in (face['hair'] or (60, 40, 25))))
    eyes_closed = rng.random() < 0.05
    for side in (-1, 1):
        u = side * 0.38 + shift
        squash = 1.0 - 0.6 * max(0.0, side * yaw)
        if abs(u) > 0.85:
            continue  # turned out of sight
        ex, ey = at(u, -0.12)
        if eyes_closed:
            _ellipse(img, (ex, ey), (0.16 * a * squash, 0.03 * b), roll, _lit(face, (40, 30, 25)),
                     _thick(0.045 * b), 0, 180)
        elif h < 20:  # a dark dot is all a few pixels can show
            _ellipse(img, (ex, ey), (max(0.7, 0.13 * a * squash), max(0.6, 0.07 * b)), roll,
                     _lit(face, (35, 25, 20)))
        else:
            px = ex + 0.03 * a * yaw
            _ellipse(img, (ex, ey), (0.17 * a * squash, 0.075 * b), roll, _lit(face, (235, 235, 230)))
            _ellipse(img, (px, ey), (0.075 * b * squash, 0.07 * b), roll, _lit(face, face['iris']))
            _ellipse(img, (px, ey), (0.03 * b * squash, 0.03 * b), roll, _lit(face, (10, 10, 10)))
        _ellipse(img, at(u, -0.26), (0.2 * a * squash, 0.09 * b), roll, brow, _thick(0.055 * b), 200, 340)
    if h >= 24:
        cv2.line(img, _pt(*at(shift * 1.2, -0.02)), _pt(*at(shift * 1.4 + 0.06, 0.22)), _lit(face, dark_skin),
                 _thick(0.04 * b), cv2.LINE_AA, _SHIFT)
    lips = _lit(face, (150, 50, 55) if skin[0] > 180 else (90, 30, 35))
    mouth_w = 0.3 * a * (1 - 0.3 * abs(yaw))
    if face['expression']:  # open mouth
        centre = at(shift * 0.9, 0.5)
        _ellipse(img, centre, (mouth_w * 0.85, 0.16 * b), roll, _lit(face, (50, 15, 20)))
        _ellipse(img, centre, (mouth_w * 0.85, 0.16 * b), roll, lips, _thick(0.04 * b))
    else:
        _ellipse(img, at(shift * 0.9, 0.45), (mouth_w, rng.uniform(0.02, 0.12) * b), roll, lips,
                 _thick(0.05 * b), 0, 180)
    if rng.random() < 0.08 and h >= 30:  # glasses
        frame = _lit(face, (20, 20, 20))
        for side in (-1, 1):
            u = side * 0.38 + shift
            if abs(u) <= 0.85:
                _ellipse(img, at(u, -0.12), (0.22 * a, 0.14 * b), roll, frame, _thick(0.025 * b))
        cv2.line(img, _pt(*at(shift - 0.16, -0.14)), _pt(*at(shift + 0.16, -0.14)), frame, _thick(0.025 * b),
                 cv2.LINE_AA, _SHIFT)

    if face['occlusion']:
        _draw_occluder(rng, img, face)
    if face['blur']:
        _blur_face(img, face)


def _draw_occluder(rng, img, face):
    """Cover `occ_frac` of the face box from one side, staying inside the face's head region."""
    x, y, w, h = face['box']
    hx1, hy1, hx2, hy2 = face['head']
    f = face['occ_frac']
    side = rng.choice(4, p=(0.3, 0.3, 0.3, 0.1))
    if side == 0:
        rect = (hx1, hy1 + rng.uniform(0, 0.3) * h, x + f * w, hy2)
    elif side == 1:
        rect = (x + (1 - f) * w, hy1 + rng.uniform(0, 0.3) * h, hx2, hy2)
    elif side == 2:
        rect = (hx1, y + (1 - f) * h, hx2, hy2)
    else:
        rect = (hx1, hy1, hx2, y + f * h)
    if rng.random() < 0.3:  # a hand: skin-coloured, rounded
        colour = _lit(face, _jitter(rng, face['skin'], 20))
        cx, cy = (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2
        cv2.rectangle(img, _pt(rect[0], rect[1]), _pt(rect[2], rect[3]), colour, -1, cv2.LINE_8, _SHIFT)
        _ellipse(img, (cx, cy), ((rect[2] - rect[0]) / 2, (rect[3] - rect[1]) / 2), 0,
                 _lit(face, tuple(c * 0.85 for c in face['skin'])), _thick(0.03 * h))
    else:
        colour = _random_colour(rng)
        cv2.rectangle(img, _pt(rect[0], rect[1]), _pt(rect[2], rect[3]), colour, -1, cv2.LINE_8, _SHIFT)
        if rng.random() < 0.5:
            stripe = _random_colour(rng)
            step = max(2.0, (rect[3] - rect[1]) / rng.uniform(3, 8))
            yy = rect[1] + step / 2
            while yy < rect[3]:
                cv2.line(img, _pt(rect[0], yy), _pt(rect[2], yy), stripe, max(1, int(step / 3)),
                         cv2.LINE_8, _SHIFT)
                yy += step


def _blur_face(img, face):
    """Gaussian blur over the head region, blended in with a soft elliptical mask."""
    height, width = img.shape[:2]
    h = face['box'][3]
    sigma = max(0.6, 0.03 * h) if face['blur'] == 1 else max(1.2, 0.07 * h)
    hx1, hy1, hx2, hy2 = face['head']
    x1, y1 = max(0, int(hx1)), max(0, int(hy1))
    x2, y2 = min(width, int(math.ceil(hx2))), min(height, int(math.ceil(hy2)))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return
    roi = img[y1:y2, x1:x2]
    blurred = cv2.GaussianBlur(roi, (0, 0), sigma)
    mask = np.zeros(roi.shape[:2], np.float32)
    cx, cy = (hx1 + hx2) / 2 - x1, (hy1 + hy2) / 2 - y1
    _ellipse(mask, (cx, cy), ((hx2 - hx1) * 0.45, (hy2 - hy1) * 0.45), 0, (1.0,))
    mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.08 * (hx2 - hx1)))[..., None]
    roi[:] = (blurred * mask + roi * (1 - mask) + 0.5).astype(np.uint8)


def render_image(seed, split, index, crowd_prob):
    """One synthetic image and its faces.

    Returns ``(image, faces)``: image is BGR uint8 ``[H, W, 3]``; faces is a list of dicts
    with ``box`` ``(x, y, w, h)`` in pixels (inside the image, ``w, h >= 1``) and the WIDER
    attribute flags ``blur expression illumination invalid occlusion pose``.
    """
    rng = np.random.default_rng([seed, _SPLIT_ID[split], index])
    width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    heights = _scene_heights(rng, height, crowd_prob)
    img = _background(rng, width, height)
    faces = _place_faces(rng, heights, width, height)
    for face in faces:
        _face_attributes(rng, face)
    for face in sorted(faces, key=lambda f: f['box'][1]):
        _draw_body(rng, img, face)
    for face in faces:
        _draw_face(rng, img, face)
    # Reading order (top to bottom, left to right), as the annotations are listed.
    faces.sort(key=lambda f: (f['box'][1], f['box'][0]))
    return img, [{'box': f['box'], **{k: f[k] for k in ATTRIBUTE_NAMES}} for f in faces]


# ----------------------------------------------------------------------------- annotation files
def _annotation_text(records):
    """WIDER bbx_gt text: a path line, a count line, then per face
    `x y w h blur expression illumination invalid occlusion pose ` (trailing space, as the official
    files); an image without faces has count 0 and one line of ten zeros."""
    lines = []
    for rec in records:
        lines.append(f"{rec['event']}/{rec['name']}.jpg")
        lines.append(str(len(rec['faces'])))
        if not rec['faces']:
            lines.append('0 0 0 0 0 0 0 0 0 0 ')
        for f in rec['faces']:
            vals = list(f['box']) + [f[k] for k in ATTRIBUTE_NAMES]
            lines.append(' '.join(str(int(v)) for v in vals) + ' ')
    return ('\n'.join(lines) + '\n').encode('ascii')


def difficulty_masks(faces):
    """Boolean arrays (easy, medium, hard) over `faces`, easy ⊆ medium ⊆ hard."""
    h = np.array([f['box'][3] for f in faces], dtype=np.int64)
    valid = np.array([f['invalid'] == 0 for f in faces], dtype=bool)
    occ = np.array([f['occlusion'] for f in faces], dtype=np.int64)
    hard = valid & (h >= HARD_MIN_HEIGHT)
    medium = hard & (h >= MEDIUM_MIN_HEIGHT)
    easy = medium & (h >= EASY_MIN_HEIGHT) & (occ < 2)
    return easy, medium, hard


def _cell(items):
    arr = np.empty((len(items), 1), dtype=object)
    for k, item in enumerate(items):
        arr[k, 0] = item
    return arr


def _gt_indices(mask, rows):
    """1-based indices as MATLAB's find() gives them: the smallest integer type that holds them;
    an empty result of a one-row image is 0x0, otherwise 0x1."""
    idx = np.flatnonzero(mask) + 1
    if idx.size == 0:
        return np.zeros((0, 0) if rows == 1 else (0, 1), dtype=np.uint8)
    dtype = np.uint8 if idx.max() <= 255 else np.uint16
    return idx.astype(dtype).reshape(-1, 1)


def _mat_bytes(variables):
    """savemat into memory, with a fixed header text instead of the creation date."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=True, oned_as='column')
    data = bytearray(buf.getvalue())
    text = f'MATLAB 5.0 MAT-file, synthetic WIDER FACE ground truth, data/synthetic.py v{GENERATOR_VERSION}'
    data[:116] = text.encode('ascii').ljust(116, b' ')
    return bytes(data)


def _eval_mats(records):
    """The four evaluation files as {file name: bytes}, nested exactly like the official ones:
    every variable is an [events, 1] cell; per event a [images, 1] cell of per-image arrays
    (face_bbx int32 [n, 4]; labels uint8 [n, 1]); event_list holds the event names.
    An image without faces has one all-zero box row, as in the official files."""
    events = []
    for rec in records:
        if not events or events[-1] != rec['event']:
            events.append(rec['event'])
    per_event = {e: [r for r in records if r['event'] == e] for e in events}
    common = {'event_list': _cell(events)}
    file_lists, bbx_lists = [], []
    label_lists = {k: [] for k in ATTRIBUTE_NAMES}
    gt_lists = {s: [] for s in SETTINGS}
    for e in events:
        files, bbxs = [], []
        labels = {k: [] for k in ATTRIBUTE_NAMES}
        gts = {s: [] for s in gt_lists}
        for rec in per_event[e]:
            faces = rec['faces']
            rows = max(1, len(faces))
            files.append(rec['name'])
            box = np.zeros((rows, 4), np.int32)
            if faces:
                box[:] = [f['box'] for f in faces]
            bbxs.append(box)
            for k in ATTRIBUTE_NAMES:
                lab = np.zeros((rows, 1), np.uint8)
                if faces:
                    lab[:, 0] = [f[k] for f in faces]
                labels[k].append(lab)
            for s, m in zip(SETTINGS, difficulty_masks(faces)):
                gts[s].append(_gt_indices(m, rows))
        file_lists.append(_cell(files))
        bbx_lists.append(_cell(bbxs))
        for k in ATTRIBUTE_NAMES:
            label_lists[k].append(_cell(labels[k]))
        for s in gt_lists:
            gt_lists[s].append(_cell(gts[s]))
    common['file_list'] = _cell(file_lists)
    common['face_bbx_list'] = _cell(bbx_lists)
    for k in ATTRIBUTE_NAMES:
        common[f'{k}_label_list'] = _cell(label_lists[k])
    out = {FACE_MAT: _mat_bytes(common)}
    for s in SETTINGS:
        out[SETTING_MATS[s]] = _mat_bytes({**common, 'gt_list': _cell(gt_lists[s])})
    return out


# ----------------------------------------------------------------------------- dataset
def _read_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: unreadable synthetic-dataset manifest ({e}); '
                         f'delete it to regenerate') from None
    if not isinstance(manifest, dict) or manifest.get('generator') != 'data/synthetic.py':
        raise ValueError(f'{path}: not a manifest written by data/synthetic.py')
    return manifest


def _expected_files(num_train, num_val):
    files = [ANNOTATION_FILES[s] for s, n in zip(SPLITS, (num_train, num_val)) if n]
    if num_val:
        files += [os.path.join(GT_DIR, m) for m in MAT_FILES]
    return files


def _manifest_bytes(params, complete, summary=None):
    body = {'generator': 'data/synthetic.py', 'version': GENERATOR_VERSION, **params, 'complete': complete}
    if summary is not None:
        body['summary'] = summary
    return (json.dumps(body, indent=2, sort_keys=True) + '\n').encode('utf-8')


def generate(out_dir, num_train, num_val, seed=0, overwrite=False, progress=False):
    """Write a synthetic WIDER FACE of `num_train` training and `num_val` validation images.

    A split with 0 images is not written (no image folder, annotation file, or for val the
    .mat files). `out_dir/synthetic_wider.json` is written first with ``complete: false`` and
    rewritten last with ``complete: true``; the annotation and .mat files are written
    atomically, after all images of their split.

    What happens when `out_dir` already holds data:

    - a complete synthetic dataset made with the same seed and counts: nothing is written and
      its summary is returned with ``reused=True`` (whatever `overwrite` says: it would be
      regenerated byte for byte);
    - a synthetic dataset made with other arguments: FileExistsError unless `overwrite`, which
      deletes WIDER_train, WIDER_val, wider_face_split and eval_tools and generates afresh;
    - an incomplete synthetic dataset (an interrupted run): regenerated from scratch;
    - WIDER folders without the synthetic manifest (e.g. the real dataset): FileExistsError,
      even with `overwrite`, so a real dataset is never deleted by mistake.

    Returns a dict: ``{'out_dir', 'seed', 'reused', 'seconds', 'train': {'images', 'faces',
    'images_without_faces', 'max_faces_per_image'}, 'val': {the same, plus 'easy', 'medium',
    'hard': faces counted in each setting}}``; a split not written is absent.
    `progress` prints a line to stderr every 500 images.
    """
    for label, n in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f'{label} must be a non-negative integer, got {n!r}')
    if num_train + num_val == 0:
        raise ValueError('num_train and num_val are both 0: nothing to generate')
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
    out_dir = os.path.abspath(out_dir)
    params = {'seed': int(seed), 'num_train': int(num_train), 'num_val': int(num_val)}

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f'{out_dir}: exists and is not a directory')
    manifest = _read_manifest(out_dir) if os.path.isdir(out_dir) else None
    present = [e for e in _OWNED if os.path.exists(os.path.join(out_dir, e))]
    if manifest is None and present:
        raise FileExistsError(f'{out_dir}: already holds {", ".join(present)} but no {MANIFEST_NAME}; '
                              f'refusing to write a synthetic dataset over what may be the real WIDER FACE '
                              f'(choose another directory)')
    if manifest is not None:
        same = (manifest.get('complete') and manifest.get('version') == GENERATOR_VERSION
                and all(manifest.get(k) == v for k, v in params.items()))
        expected = _expected_files(num_train, num_val)
        if same and all(os.path.isfile(os.path.join(out_dir, p)) for p in expected):
            return dict(manifest['summary'], out_dir=out_dir, reused=True, seconds=0.0)
        if manifest.get('complete') and not same and not overwrite:
            raise FileExistsError(
                f'{out_dir}: holds a synthetic dataset made with seed={manifest.get("seed")}, '
                f'train={manifest.get("num_train")}, val={manifest.get("num_val")} (generator version '
                f'{manifest.get("version")}); pass overwrite=True (--overwrite) to replace it')
        for entry in present:
            shutil.rmtree(os.path.join(out_dir, entry))

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, MANIFEST_NAME), _manifest_bytes(params, False), sync=True)
    summary = {'seed': int(seed)}
    for split, count in zip(SPLITS, (num_train, num_val)):
        if count == 0:
            continue
        records = []
        images_dir = image_root(out_dir, split)
        for index in range(count):
            event = _event_of(index, count)
            img, faces = render_image(int(seed), split, index, event[2])
            ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f'cv2.imencode failed for image {index} of {split}')
            name = image_name(event, index)
            atomic_write_bytes(os.path.join(images_dir, event[0], name + '.jpg'), buf.tobytes())
            records.append({'event': event[0], 'name': name, 'faces': faces})
            if progress and (index + 1) % 500 == 0:
                print(f'{split}: {index + 1}/{count} images', file=sys.stderr, flush=True)
        atomic_write_bytes(os.path.join(out_dir, ANNOTATION_FILES[split]), _annotation_text(records), sync=True)
        all_faces = [f for r in records for f in r['faces']]
        stats = {'images': count, 'faces': len(all_faces),
                 'images_without_faces': sum(1 for r in records if not r['faces']),
                 'max_faces_per_image': max(len(r['faces']) for r in records)}
        if split == 'val':
            for name, data in _eval_mats(records).items():
                atomic_write_bytes(os.path.join(out_dir, GT_DIR, name), data, sync=True)
            for s, m in zip(SETTINGS, difficulty_masks(all_faces)):
                stats[s] = int(m.sum())
        summary[split] = stats
    atomic_write_bytes(os.path.join(out_dir, MANIFEST_NAME), _manifest_bytes(params, True, summary), sync=True)
    summary.update(out_dir=out_dir, reused=False, seconds=round(time.perf_counter() - start, 3))
    return summary


def main(args):
    try:
        summary = generate(args.out, args.train, args.val, seed=args.seed, overwrite=args.overwrite,
                           progress=True)
    except (ValueError, FileExistsError, OSError) as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 2
    verb = ('already complete, nothing written' if summary['reused']
            else f'written in {summary["seconds"]:.1f} s')
    print(f'synthetic WIDER FACE at {summary["out_dir"]} (seed {summary["seed"]}): {verb}')
    for split in SPLITS:
        if split not in summary:
            continue
        s = summary[split]
        line = (f'  {split}: {s["images"]} images, {s["faces"]} faces ({s["images_without_faces"]} '
                f'images without faces, at most {s["max_faces_per_image"]} per image)')
        if split == 'val':
            line += f'; counted faces easy {s["easy"]}, medium {s["medium"]}, hard {s["hard"]}'
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main(parse_args()))
