"""prepare_wider_data.py: list files from the official annotation files."""
import os
import subprocess
import sys

import pytest

from data.config import cfg
from data.widerface import read_face_list
from prepare_wider_data import main, parse_args, write_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plain_parse(path):
    """Independent minimal reader of an official annotation file: [(name, [[10 ints]...])]."""
    with open(path) as handle:
        lines = [line.strip() for line in handle]
    out, i = [], 0
    while i < len(lines):
        if not lines[i]:
            i += 1
            continue
        name, count = lines[i], int(lines[i + 1])
        rows = [[int(float(v)) for v in lines[i + 2 + k].split()] for k in range(count)]
        i += 2 + max(count, 1)  # count 0 is followed by one line of zeros
        out.append((name, rows))
    return out


def _run(dataset_dir, out_dir, *extra):
    return main(parse_args(['--dataset_dir', str(dataset_dir), '--out_dir', str(out_dir), *extra]))


def test_real_val_split_counts_and_round_trip(real_val_annotations, tmp_path, capsys):
    dataset_dir = os.path.dirname(os.path.dirname(real_val_annotations))
    stats = _run(dataset_dir, tmp_path)
    out = capsys.readouterr().out
    assert 'train: skipped' in out
    assert 'val: 3226 images, 39697 faces' in out
    assert stats['val']['images'] == 3226 and stats['val']['faces'] == 39697
    paths, boxes = read_face_list(tmp_path / 'face_val.txt')
    expected = _plain_parse(real_val_annotations)
    assert len(paths) == len(expected)
    root = os.path.join(os.path.abspath(dataset_dir), 'WIDER_val', 'images')
    for path, table, (name, rows) in zip(paths, boxes, expected):
        assert path == os.path.join(root, name)
        kept = [r[:4] for r in rows if r[2] > 0 and r[3] > 0]
        got = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2, _ in table.tolist()]
        assert got == kept
        assert all(label == 1 for label in table[:, 4])
    assert stats['val']['missing'] == sum(not os.path.isfile(p) for p in paths)


def test_real_val_drop_invalid(real_val_annotations, tmp_path):
    dataset_dir = os.path.dirname(os.path.dirname(real_val_annotations))
    stats = _run(dataset_dir, tmp_path, '--drop_invalid')
    rows = [r for _, rs in _plain_parse(real_val_annotations) for r in rs if r[2] > 0 and r[3] > 0]
    assert stats['val']['faces'] == sum(r[7] == 0 for r in rows)
    assert stats['val']['dropped_invalid'] == sum(r[7] != 0 for r in rows) > 0


ANNOTATIONS = """0--Parade/a.jpg
3
10 20 30 40 0 0 0 0 0 0
5 5 0 12 0 0 0 0 0 0
50 60 7 8 2 0 0 1 0 0
0--Parade/empty.jpg
0
0 0 0 0 0 0 0 0 0 0
1--Handshaking/missing.jpg
1
1 2 3 4 0 0 0 0 0 0
"""


def _dataset(root, splits=('train', 'val'), text=ANNOTATIONS):
    os.makedirs(os.path.join(root, 'wider_face_split'), exist_ok=True)
    for split in splits:
        with open(os.path.join(root, 'wider_face_split', f'wider_face_{split}_bbx_gt.txt'), 'w') as handle:
            handle.write(text)
        folder = os.path.join(root, f'WIDER_{split}', 'images', '0--Parade')
        os.makedirs(folder, exist_ok=True)
        for name in ('a.jpg', 'empty.jpg'):
            open(os.path.join(folder, name), 'wb').close()
    return root


def test_list_format_dropping_and_counts(tmp_path, capsys):
    root = _dataset(str(tmp_path / 'wider'))
    stats = _run(root, tmp_path / 'out')
    lines = (tmp_path / 'out' / 'face_train.txt').read_text().splitlines()
    base = os.path.join(os.path.abspath(root), 'WIDER_train', 'images')
    assert lines == [f'{base}/0--Parade/a.jpg 2 10 20 30 40 1 50 60 7 8 1',
                     f'{base}/0--Parade/empty.jpg 0',
                     f'{base}/1--Handshaking/missing.jpg 1 1 2 3 4 1']
    assert stats['train'] == dict(images=3, faces=3, dropped_size=1, dropped_invalid=0, missing=1,
                                  first_missing=f'{base}/1--Handshaking/missing.jpg', repeated=0)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith('train: 3 images, 3 faces')
    assert out[0].endswith(f'1 image files missing, first: {base}/1--Handshaking/missing.jpg)')
    stats = _run(root, tmp_path / 'out', '--drop_invalid')
    assert stats['val']['faces'] == 2 and stats['val']['dropped_invalid'] == 1
    assert (tmp_path / 'out' / 'face_val.txt').read_text().splitlines()[0].endswith(' 1 10 20 30 40 1')


def test_missing_split_is_skipped_and_both_missing_is_an_error(tmp_path, capsys):
    root = _dataset(str(tmp_path / 'wider'), splits=('val',))
    stats = _run(root, tmp_path / 'out')
    assert list(stats) == ['val'] and 'train: skipped' in capsys.readouterr().out
    assert not (tmp_path / 'out' / 'face_train.txt').exists()
    with pytest.raises(SystemExit, match='no WIDER FACE annotation file found'):
        _run(tmp_path / 'nothing_here', tmp_path / 'out')


def test_repeated_images_empty_files_and_bad_out_dir_are_reported(tmp_path, capsys):
    root = _dataset(str(tmp_path / 'wider'), splits=('val',), text=ANNOTATIONS + ANNOTATIONS[:ANNOTATIONS.index('0--Parade/empty')])
    stats = _run(root, tmp_path / 'out')
    assert stats['val']['repeated'] == 1 and stats['val']['images'] == 4
    assert '; 1 images listed more than once)' in capsys.readouterr().out
    ann = os.path.join(root, 'wider_face_split', 'wider_face_val_bbx_gt.txt')
    with open(ann, 'w') as handle:
        handle.write('\n')
    with pytest.raises(SystemExit, match=f'prepare_wider_data.py: error: {ann}: no image in the file'):
        _run(root, tmp_path / 'out')
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(SystemExit, match='prepare_wider_data.py: error: --out_dir .*a_file: cannot create the directory'):
        _run(root, tmp_path / 'a_file')


def test_malformed_annotation_names_file_and_line_and_keeps_old_output(tmp_path):
    root = _dataset(str(tmp_path / 'wider'), splits=('train',),
                    text=ANNOTATIONS.replace('50 60 7 8', '50 sixty 7 8'))
    out_file = tmp_path / 'out' / 'face_train.txt'
    out_file.parent.mkdir()
    out_file.write_text('previous\n')
    ann = os.path.join(root, 'wider_face_split', 'wider_face_train_bbx_gt.txt')
    with pytest.raises(SystemExit, match=f'{ann}:5: non-numeric'):
        _run(root, tmp_path / 'out')
    assert out_file.read_text() == 'previous\n'


def test_write_atomic_leaves_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / 'face_val.txt'
    target.write_text('old\n')

    def lines():
        yield 'first'
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(target), lines())
    assert target.read_text() == 'old\n' and os.listdir(tmp_path) == ['face_val.txt']
    write_atomic(str(target), ['a', 'b'])
    assert target.read_text() == 'a\nb\n' and oct(target.stat().st_mode & 0o044) == oct(0o044 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_defaults_come_from_config():
    args = parse_args([])
    assert args.dataset_dir == cfg.FACE.WIDER_DIR
    assert os.path.normpath(os.path.join(args.out_dir, 'face_train.txt')) == os.path.normpath(cfg.FACE.TRAIN_FILE)
    assert args.drop_invalid is False


def test_command_line(tmp_path):
    root = _dataset(str(tmp_path / 'wider'))
    script = os.path.join(REPO_ROOT, 'prepare_wider_data.py')
    ok = subprocess.run([sys.executable, script, '--dataset_dir', root, '--out_dir', str(tmp_path / 'o')],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count('\n') == 2 and (tmp_path / 'o' / 'face_val.txt').exists()
    bad = subprocess.run([sys.executable, script, '--dataset_dir', str(tmp_path / 'none')],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and bad.stderr.strip().count('\n') == 0 and 'error:' in bad.stderr
