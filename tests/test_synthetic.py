"""data/synthetic.py: WIDER FACE layout, annotation formats, .mat structure, determinism."""
import hashlib
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.io

from data import synthetic

ATTRS = ('blur', 'expression', 'illumination', 'invalid', 'occlusion', 'pose')
MATS = ('wider_face_val.mat', 'wider_easy_val.mat', 'wider_medium_val.mat', 'wider_hard_val.mat')


def read_bbx_gt(path):
    """Strict reader of a WIDER bbx_gt file: [(relative path, int array [n, 10])]."""
    with open(path, encoding='ascii') as f:
        lines = f.read().split('\n')
    assert lines[-1] == '', f'{path}: must end with a newline'
    lines = lines[:-1]
    out, i = [], 0
    while i < len(lines):
        rel = lines[i]
        assert rel.endswith('.jpg') and rel.count('/') == 1, f'{path}:{i + 1}: bad path line {rel!r}'
        n = int(lines[i + 1])
        rows = lines[i + 2:i + 2 + max(n, 1)]
        assert len(rows) == max(n, 1), f'{path}: truncated after line {i + 2}'
        for k, row in enumerate(rows):
            # Official formatting: ten integers separated by one space, and a trailing space.
            assert row.endswith(' ') and len(row.split(' ')) == 11, f'{path}:{i + 3 + k}: {row!r}'
        vals = np.array([[int(v) for v in row.split()] for row in rows], dtype=np.int64).reshape(-1, 10)
        if n == 0:
            assert (vals == 0).all(), f'{path}:{i + 3}: an image without faces has one line of ten zeros'
            vals = vals[:0]
        out.append((rel, vals))
        i += 2 + max(n, 1)
    return out


def mat_signature(value, depth=0):
    """Nesting, types and dtypes of a loadmat value, without sizes that depend on the data."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        assert value.ndim == 2 and value.shape[1] == 1, f'cell of shape {value.shape}'
        return ('cell', frozenset(mat_signature(v, depth + 1) for v in value[:, 0]))
    if isinstance(value, np.ndarray) and value.dtype.kind == 'U':
        return ('char', value.ndim, value.shape)
    assert isinstance(value, np.ndarray), type(value)
    # Numeric leaves: dtype, number of dimensions, number of columns (or the 0x0 empty case).
    return ('num', value.dtype.str, value.ndim, value.shape[1], value.size == 0 and value.shape == (0, 0))


def flatten_signature(sig):
    """Set of root-to-leaf paths of a signature, so a synthetic file may use a subset of leaves."""
    if sig[0] == 'cell':
        return {('cell',) + p for child in sig[1] for p in flatten_signature(child)}
    return {sig}


def load_mat(path):
    return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith('__')}


def mat_faces(mat):
    """[(event/name, boxes [n,4], labels {attr: [n]}, gt {setting: indices or None})] in file order."""
    out = []
    for e in range(mat['event_list'].shape[0]):
        event = str(mat['event_list'][e, 0][0])
        for j in range(mat['file_list'][e, 0].shape[0]):
            name = str(mat['file_list'][e, 0][j, 0][0])
            boxes = mat['face_bbx_list'][e, 0][j, 0]
            labels = {a: mat[f'{a}_label_list'][e, 0][j, 0][:, 0] for a in ATTRS}
            gt = mat['gt_list'][e, 0][j, 0].ravel().astype(np.int64) if 'gt_list' in mat else None
            out.append((f'{event}/{name}.jpg', boxes, labels, gt))
    return out


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic') / 'WIDER'
    summary = synthetic.generate(str(root), 40, 24, seed=0)
    return str(root), summary


def test_layout_and_annotation_format(dataset):
    root, summary = dataset
    assert not summary['reused']
    for split, count in (('train', 40), ('val', 24)):
        records = read_bbx_gt(os.path.join(root, 'wider_face_split', f'wider_face_{split}_bbx_gt.txt'))
        assert len(records) == count == summary[split]['images']
        assert sum(len(v) for _, v in records) == summary[split]['faces']
        events = set()
        for rel, vals in records:
            event, name = rel.split('/')
            events.add(event)
            number, label = event.split('--', 1)
            assert number.isdigit() and name.startswith(f'{number}_{label}_')
            img = cv2.imread(os.path.join(root, f'WIDER_{split}', 'images', rel))
            assert img is not None, rel
            height, width = img.shape[:2]
            assert 640 <= width <= 1024 and 480 <= height <= 1024
            x, y, w, h = vals[:, 0], vals[:, 1], vals[:, 2], vals[:, 3]
            assert (w >= 1).all() and (h >= 1).all(), rel
            assert (x >= 0).all() and (y >= 0).all(), rel
            assert (x + w <= width).all() and (y + h <= height).all(), rel
            assert vals[:, 4].max(initial=0) <= 2 and vals[:, 8].max(initial=0) <= 2
            assert set(np.unique(vals[:, [5, 6, 7, 9]])) <= {0, 1}
            assert vals.min(initial=0) >= 0
        assert len(events) >= 5, 'WIDER-like: several event folders'
        # Every image on disk is annotated, and nothing else is there.
        on_disk = {os.path.relpath(os.path.join(d, f), os.path.join(root, f'WIDER_{split}', 'images'))
                   for d, _, files in os.walk(os.path.join(root, f'WIDER_{split}', 'images')) for f in files}
        assert on_disk == {rel for rel, _ in records}
    assert not [f for d, _, fs in os.walk(root) for f in fs if f.endswith('.tmp')], 'temporary files left'


def test_face_counts_and_sizes_span_wider_like_range(dataset):
    root, _ = dataset
    records = (read_bbx_gt(os.path.join(root, 'wider_face_split', 'wider_face_train_bbx_gt.txt'))
               + read_bbx_gt(os.path.join(root, 'wider_face_split', 'wider_face_val_bbx_gt.txt')))
    counts = np.array([len(v) for _, v in records])
    heights = np.concatenate([v[:, 3] for _, v in records])
    assert counts.max() <= synthetic.MAX_FACES
    assert (counts == 0).any(), 'some images have no face'
    assert (counts >= 15).any(), 'some images have many faces'
    assert heights.min() >= synthetic.MIN_FACE_HEIGHT and heights.min() <= 12
    assert heights.max() >= 150
    assert 12 <= np.median(heights) <= 60
    vals = np.concatenate([v for _, v in records])
    for col, name in ((4, 'blur'), (8, 'occlusion')):
        assert set(np.unique(vals[:, col])) == {0, 1, 2}, name
    for col, name in ((5, 'expression'), (6, 'illumination'), (9, 'pose')):
        assert set(np.unique(vals[:, col])) == {0, 1}, name
    assert vals[:, 7].mean() < 0.05, 'invalid is rare'


def test_mat_files_agree_with_val_text_file(dataset):
    root, summary = dataset
    records = read_bbx_gt(os.path.join(root, 'wider_face_split', 'wider_face_val_bbx_gt.txt'))
    gt_dir = os.path.join(root, 'eval_tools', 'ground_truth')
    mats = {m: mat_faces(load_mat(os.path.join(gt_dir, m))) for m in MATS}
    base = mats['wider_face_val.mat']
    assert [rel for rel, *_ in base] == [rel for rel, _ in records]
    for (rel, vals), (_, boxes, labels, _) in zip(records, base):
        assert boxes.dtype == np.int32 and boxes.shape[1] == 4
        real = boxes[(boxes[:, 2] > 0) & (boxes[:, 3] > 0)]
        np.testing.assert_array_equal(real, vals[:, :4], err_msg=rel)
        for k, attr in enumerate(ATTRS):
            np.testing.assert_array_equal(labels[attr][:len(vals)], vals[:, 4 + k], err_msg=f'{rel} {attr}')
    # An image without faces holds one all-zero box row and an empty 0x0 gt_list, as in the official files.
    empty = [k for k, (_, vals) in enumerate(records) if len(vals) == 0]
    assert len(empty) == summary['val']['images_without_faces'] >= 1
    for k in empty:
        np.testing.assert_array_equal(base[k][1], np.zeros((1, 4), np.int32))
        raw = scipy.io.loadmat(os.path.join(gt_dir, 'wider_hard_val.mat'))['gt_list']
        flat = [g for e in range(raw.shape[0]) for g in raw[e, 0][:, 0]]
        assert flat[k].shape == (0, 0)
    for m in MATS[1:]:
        for (rel, boxes, labels, _), (rel2, boxes2, labels2, _) in zip(base, mats[m]):
            assert rel == rel2
            np.testing.assert_array_equal(boxes, boxes2)
    counted = {s: sum(len(g) for *_, g in mats[f'wider_{s}_val.mat']) for s in ('easy', 'medium', 'hard')}
    assert counted == {s: summary['val'][s] for s in counted}
    assert 0 < counted['easy'] < counted['medium'] < counted['hard'] <= summary['val']['faces']


def test_difficulty_settings_are_nested_and_follow_size(dataset):
    root, _ = dataset
    gt_dir = os.path.join(root, 'eval_tools', 'ground_truth')
    sets = {s: mat_faces(load_mat(os.path.join(gt_dir, f'wider_{s}_val.mat')))
            for s in ('easy', 'medium', 'hard')}
    for k, (rel, boxes, labels, hard) in enumerate(sets['hard']):
        easy, medium = sets['easy'][k][3], sets['medium'][k][3]
        assert set(easy) <= set(medium) <= set(hard), rel
        for idx in (easy, medium, hard):
            assert ((idx >= 1) & (idx <= len(boxes))).all(), f'{rel}: gt_list is 1-based into face_bbx_list'
        heights = boxes[:, 3]
        assert (heights[hard - 1] >= synthetic.HARD_MIN_HEIGHT).all()
        assert (labels['invalid'][hard - 1] == 0).all()
        assert (heights[medium - 1] >= synthetic.MEDIUM_MIN_HEIGHT).all()
        assert (heights[easy - 1] >= synthetic.EASY_MIN_HEIGHT).all()
        assert (labels['occlusion'][easy - 1] < 2).all()
        # Every valid face of at least the threshold size is counted.
        valid_big = np.flatnonzero((heights >= synthetic.MEDIUM_MIN_HEIGHT) & (labels['invalid'] == 0)) + 1
        assert set(valid_big) == set(medium), rel


def test_mat_structure_matches_real_wider_files(dataset, real_gt_dir):
    root, _ = dataset
    gt_dir = os.path.join(root, 'eval_tools', 'ground_truth')
    for m in MATS:
        real = load_mat(os.path.join(real_gt_dir, m))
        synth = load_mat(os.path.join(gt_dir, m))
        assert set(synth) == set(real), m
        for key in real:
            assert synth[key].dtype == real[key].dtype == object and synth[key].ndim == 2, (m, key)
            real_paths = flatten_signature(mat_signature(real[key]))
            synth_paths = flatten_signature(mat_signature(synth[key]))
            assert synth_paths <= real_paths, (m, key, synth_paths - real_paths)


def _tree_digest(root):
    digest = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, 'rb') as fh:
                digest[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return digest


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = synthetic.generate(str(tmp_path / 'a'), 5, 4, seed=7)
    b = synthetic.generate(str(tmp_path / 'b'), 5, 4, seed=7)
    synthetic.generate(str(tmp_path / 'c'), 5, 4, seed=8)
    da, db, dc = (_tree_digest(str(tmp_path / n)) for n in 'abc')
    assert da == db
    assert a['train'] == b['train'] and a['val'] == b['val']
    images = [k for k in da if k.endswith('.jpg')]
    assert len(images) == 9 and set(images) == {k for k in dc if k.endswith('.jpg')}
    assert all(da[k] != dc[k] for k in images)
    assert da[os.path.join('wider_face_split', 'wider_face_train_bbx_gt.txt')] != \
        dc[os.path.join('wider_face_split', 'wider_face_train_bbx_gt.txt')]


def test_existing_dataset_is_reused_replaced_or_protected(tmp_path):
    root = tmp_path / 'wider'
    first = synthetic.generate(str(root), 3, 2, seed=1)
    ann = root / 'wider_face_split' / 'wider_face_train_bbx_gt.txt'
    stamp = ann.stat().st_mtime_ns
    again = synthetic.generate(str(root), 3, 2, seed=1)
    assert again['reused'] and not first['reused']
    assert again['train'] == first['train'] and ann.stat().st_mtime_ns == stamp

    with pytest.raises(FileExistsError, match='overwrite'):
        synthetic.generate(str(root), 2, 2, seed=2)
    replaced = synthetic.generate(str(root), 2, 2, seed=2, overwrite=True)
    assert replaced['train']['images'] == 2 and not replaced['reused']
    images = [f for _, _, fs in os.walk(root / 'WIDER_train') for f in fs]
    assert len(images) == 2, 'images of the previous dataset are removed'

    # An interrupted run (manifest still incomplete) is regenerated without --overwrite.
    manifest = root / synthetic.MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    redone = synthetic.generate(str(root), 1, 1, seed=3)
    assert redone['train']['images'] == 1 and not redone['reused']

    # A folder with WIDER data that this generator did not write is never touched.
    real = tmp_path / 'real'
    (real / 'wider_face_split').mkdir(parents=True)
    (real / 'wider_face_split' / 'wider_face_val_bbx_gt.txt').write_text('keep me\n')
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match='real WIDER FACE'):
            synthetic.generate(str(real), 1, 1, overwrite=overwrite)
    assert (real / 'wider_face_split' / 'wider_face_val_bbx_gt.txt').read_text() == 'keep me\n'


def test_zero_split_is_not_written_and_bad_counts_are_refused(tmp_path):
    out = synthetic.generate(str(tmp_path / 'only_val'), 0, 2, seed=0)
    assert 'train' not in out and out['val']['images'] == 2
    assert not (tmp_path / 'only_val' / 'WIDER_train').exists()
    assert not (tmp_path / 'only_val' / 'wider_face_split' / 'wider_face_train_bbx_gt.txt').exists()
    assert (tmp_path / 'only_val' / 'eval_tools' / 'ground_truth' / 'wider_hard_val.mat').exists()
    with pytest.raises(ValueError, match='both 0'):
        synthetic.generate(str(tmp_path / 'x'), 0, 0)
    with pytest.raises(ValueError, match='num_train'):
        synthetic.generate(str(tmp_path / 'x'), -1, 2)


def test_command_line(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / 'cli'
    cmd = [sys.executable, '-m', 'data.synthetic', '--out', str(out), '--train', '2', '--val', '1', '--seed', '5']
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'train: 2 images' in proc.stdout and 'val: 1 images' in proc.stdout
    assert (out / 'WIDER_val' / 'images').is_dir()
    again = synthetic.main(synthetic.parse_args(['--out', str(out), '--train', '3', '--val', '1']))
    assert again == 2  # refuses to replace without --overwrite, with a one-line message
