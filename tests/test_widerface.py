"""data/widerface.py and data/factory.py: parsing, the dataset contract, determinism, bad input."""
import copy
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import cfg
from data.factory import EpochBatchSampler, dataset_factory, detection_collate, make_loader
from data.widerface import AnnotationError, WIDERDetection, read_face_list, read_wider_annotations
from utils.cli import UserError
from utils.transforms import subtract_mean

SIZE = 160  # small output keeps the suite fast; 640 is covered by the real-image test


def _write(path, text):
    path.write_text(text)
    return str(path)


def _image(path, width=320, height=240, seed=0, mode='RGB'):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    img = img.convert(mode) if mode != 'RGB' else img
    img.save(path, **({'quality': 90} if str(path).endswith('.jpg') else {}))
    return str(path)


def _line(path, boxes):
    return f'{path} {len(boxes)} ' + ' '.join(f'{x} {y} {w} {h} 1' for x, y, w, h in boxes)


@pytest.fixture
def small_list(tmp_path):
    """Three 320x240 images with faces, one without; list file path."""
    lines = []
    faces = [[(20, 30, 40, 50), (200, 100, 30, 30)], [(100, 80, 60, 70)], [(10, 10, 12, 14), (150, 150, 80, 60)]]
    for k, boxes in enumerate(faces):
        lines.append(_line(_image(tmp_path / f'img{k}.jpg', seed=k), boxes))
    lines.append(_line(_image(tmp_path / 'empty.jpg', seed=9), []))
    return _write(tmp_path / 'list.txt', '\n'.join(lines) + '\n')


# -- official annotation files -------------------------------------------------------------

def test_real_val_annotations_parse(real_val_annotations):
    records = read_wider_annotations(real_val_annotations)
    assert len(records) == 3226
    assert sum(len(r.boxes) for r in records) == 39708
    first = records[0]
    assert first.name == '0--Parade/0_Parade_marchingband_1_465.jpg' and len(first.boxes) == 126
    np.testing.assert_array_equal(first.boxes[0], [345, 211, 4, 4])
    assert first.attributes.shape == (126, 6)


GOOD = """a/one.jpg
2
1 2 3 4 0 0 0 0 0 0
5 6 7 8 2 1 0 1 0 0
a/none.jpg
0
0 0 0 0 0 0 0 0 0 0
b/two.jpg
1
9 9 10 10 0 0 0 0 0 1
"""


def test_count_zero_images_and_attributes(tmp_path):
    records = read_wider_annotations(_write(tmp_path / 'gt.txt', GOOD))
    assert [r.name for r in records] == ['a/one.jpg', 'a/none.jpg', 'b/two.jpg']
    assert [len(r.boxes) for r in records] == [2, 0, 1]
    assert records[0].attributes[1].tolist() == [2, 1, 0, 1, 0, 0]
    assert [r.line for r in records] == [1, 5, 8]


@pytest.mark.parametrize('text, line, words', [
    (GOOD.replace('5 6 7 8 2 1 0 1 0 0', '5 6 x 8 2 1 0 1 0 0'), 4, 'non-numeric'),
    (GOOD.replace('\n1\n9 9', '\none\n9 9'), 9, 'number of faces'),
    (GOOD.replace('1 2 3 4 0 0 0 0 0 0', '1 2 3 4 0 0'), 3, 'expected 10 numbers'),
    ('a/one.jpg\n3\n1 2 3 4 0 0 0 0 0 0\n', 4, 'truncated'),
    ('a/one.jpg\n', 2, 'face count'),
    (b'a/one.jpg\n1\n1 2 3 4 0 0 0 0 0 0\nb/caf\xe9.jpg\n0\n', 4, 'not UTF-8'),
    (GOOD.replace('5 6 7 8 2 1 0 1 0 0', '5 nan 7 8 2 1 0 1 0 0'), 4, 'non-finite'),
])
def test_bad_annotation_files_name_file_and_line(tmp_path, text, line, words):
    if isinstance(text, bytes):
        (tmp_path / 'gt.txt').write_bytes(text)
        path = str(tmp_path / 'gt.txt')
    else:
        path = _write(tmp_path / 'gt.txt', text)
    with pytest.raises(AnnotationError, match=words) as info:
        read_wider_annotations(path)
    assert str(info.value).startswith(f'{path}:{line}: ')


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    # Notepad and PowerShell's Out-File write one; it used to lose the first image silently.
    (tmp_path / 'gt.txt').write_bytes(b'\xef\xbb\xbf' + GOOD.encode())
    assert read_wider_annotations(str(tmp_path / 'gt.txt'))[0].name == 'a/one.jpg'
    (tmp_path / 'l.txt').write_bytes(b'\xef\xbb\xbf/data/x.jpg 1 1 2 3 4 1\n')
    assert read_face_list(str(tmp_path / 'l.txt'))[0] == ['/data/x.jpg']
    (tmp_path / 'l.txt').write_bytes(b'\xef\xbb\xbf/a.jpg 1 1 2 3 4 1\n/\xe9.jpg 1 1 2 3 4 1\n')
    with pytest.raises(AnnotationError, match=r'l.txt:2: not UTF-8 text \(byte 0xe9\)'):
        read_face_list(str(tmp_path / 'l.txt'))


# -- list files ---------------------------------------------------------------------------

def test_list_file_parsing_with_spaces_comments_and_blank_lines(tmp_path):
    text = ('# comment\n\n/data/my images/a b.jpg 2 1 2 3 4 1 10 20 5 6 1\n/x.jpg 0\n'
            '/data/trip 2019 12/c 3.jpg 1 5 6 7 8 1\n')
    paths, boxes = read_face_list(_write(tmp_path / 'l.txt', text))
    assert paths == ['/data/my images/a b.jpg', '/x.jpg', '/data/trip 2019 12/c 3.jpg']
    np.testing.assert_array_equal(boxes[0], [[1, 2, 4, 6, 1], [10, 20, 15, 26, 1]])
    assert boxes[1].shape == (0, 5)
    np.testing.assert_array_equal(boxes[2], [[5, 6, 12, 14, 1]])


@pytest.mark.parametrize('text, line, words', [
    ('/a.jpg 1 1 2 3 4 1\n/b.jpg 2 1 2 3 4 1\n', 2, 'need 10 numbers'),
    ('/a.jpg 1 1 2 3 4 1\n\n/b.jpg 1 1 2 z 4 1\n', 3, 'non-numeric'),
    ('/a.jpg x 1 2 3 4 1\n', 1, 'face count'),
    ('/a.jpg\n', 1, 'expected'),
    # A wrong count must not turn the first face's numbers into part of the image path.
    ('/a.jpg 1 1 2 3 4 1\n/b.jpg 3 10 20 30 40 1 50 60 70 80 1\n', 2, '3 faces need 15 numbers after the count, found 10'),
    ('/a.jpg 1 10 20 30 40 1 50 60 70 80 1\n', 1, '1 faces need 5 numbers'),
    ('/a.jpg 2 1 2 3 4 1 5 6 7 8 0\n', 1, 'face 2 has label 0'),
    ('/a.jpg 1 1 2 3 4 2\n', 1, 'face 1 has label 2'),
    ('/a.jpg 1 1 2 3 4 1.5\n', 1, 'label 1.5'),
    (b'/a.jpg 1 1 2 3 4 1\n/caf\xe9.jpg 1 1 2 3 4 1\n', 2, 'not UTF-8 text .byte 0xe9'),
    ('/a.jpg 1 1 2 3 4 1\n/b.jpg 1 1 2 inf 4 1\n', 2, 'non-finite'),
    # A bad number among many faces is named with its place, not quoted with the whole line.
    ('/a.jpg 100 ' + '1 2 3 4 1 ' * 42 + '1 2 nan 4 1 ' + '1 2 3 4 1 ' * 57 + '\n', 1,
     r"non-finite number \(nan or inf\) 'nan' in a box \(face 43, number 3 of 5\)$"),
])
def test_malformed_list_line_names_file_and_line(tmp_path, text, line, words):
    if isinstance(text, bytes):
        (tmp_path / 'l.txt').write_bytes(text)
        path = str(tmp_path / 'l.txt')
    else:
        path = _write(tmp_path / 'l.txt', text)
    with pytest.raises(AnnotationError, match=words) as info:
        WIDERDetection(path, 'val')
    assert str(info.value).startswith(f'{path}:{line}: ')


@pytest.mark.parametrize('text', ['', '\n\n', '# only a comment\n'])
def test_empty_list_file_is_a_clear_error(tmp_path, text):
    path = _write(tmp_path / 'l.txt', text)
    with pytest.raises(AnnotationError, match='empty'):
        WIDERDetection(path, 'train')


# -- the dataset ----------------------------------------------------------------------------

def _check_item(item, size):
    image, target = item
    assert image.dtype == torch.float32 and image.shape == (3, size, size)
    assert target.dtype == torch.float32 and target.ndim == 2 and target.shape[1] == 5
    assert (target[:, :4] >= 0).all() and (target[:, :4] <= 1).all()
    assert (target[:, 2] > target[:, 0]).all() and (target[:, 3] > target[:, 1]).all()
    assert target[:, 4].eq(1).all()
    # RGB minus (123, 117, 104), not scaled.
    assert image.min() >= -123 and image.max() <= 255 - 104
    return target


def test_train_mode_leaves_out_faceless_images_and_says_so(small_list, capsys):
    ds = WIDERDetection(small_list, 'train', input_size=SIZE)
    assert len(ds) == 3 and ds.num_without_face == 1
    assert '1 of 4 images have no face' in capsys.readouterr().err
    val = WIDERDetection(small_list, 'val', input_size=SIZE)
    assert len(val) == 4
    assert _check_item(val[3], SIZE).shape == (0, 5)


def test_training_samples_are_a_pure_function_of_seed_epoch_index(small_list):
    ds = WIDERDetection(small_list, 'train', input_size=SIZE, seed=3)
    twin = WIDERDetection(small_list, 'train', input_size=SIZE, seed=3)
    other_seed = WIDERDetection(small_list, 'train', input_size=SIZE, seed=4)
    for index in range(len(ds)):
        a = ds[(2, index)]
        twin.set_epoch(2)
        b = twin[index]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(ds[(2, 0)][0], ds[(3, 0)][0])
    assert not torch.equal(ds[(2, 0)][0], other_seed[(2, 0)][0])


def test_uint8_samples_give_the_float_samples_after_subtract_mean(small_list):
    for mode in ('train', 'val'):
        floats = WIDERDetection(small_list, mode, input_size=SIZE, seed=3)
        raw = WIDERDetection(small_list, mode, input_size=SIZE, seed=3, normalize=False)
        for index in range(len(floats)):
            (image, target), (image_u8, target_u8) = floats[(1, index)], raw[(1, index)]
            assert image_u8.dtype == torch.uint8 and image_u8.shape == (3, SIZE, SIZE)
            assert torch.equal(subtract_mean(image_u8[None])[0], image) and torch.equal(target_u8, target)


def test_val_samples_are_plain_resizes(small_list):
    val = WIDERDetection(small_list, 'val', input_size=SIZE)
    image, target = val[0]
    np.testing.assert_allclose(target[:, :4].numpy(),
                               [[20 / 320, 30 / 240, 60 / 320, 80 / 240], [200 / 320, 100 / 240, 230 / 320, 130 / 240]],
                               atol=1e-6)
    assert torch.equal(val[0][0], image)


def test_real_image_at_640_never_returns_an_empty_training_sample(real_image_path, tmp_path):
    with Image.open(real_image_path) as im:
        width, height = im.size
    rng = np.random.default_rng(0)
    # Few tiny faces: the augmentation often drops them all, so samples get redrawn.
    boxes = [(int(x), int(y), 4, 5) for x, y in zip(rng.integers(0, width - 5, 3), rng.integers(0, height - 5, 3))]
    list_file = _write(tmp_path / 'l.txt', (_line(real_image_path, boxes) + '\n') * 40)
    ds = WIDERDetection(list_file, 'train')
    for index in range(len(ds)):
        target = _check_item(ds[(1, index)], cfg.INPUT_SIZE)
        assert 1 <= len(target) <= 3


def test_fallback_after_failed_redraws_is_deterministic_and_keeps_a_face(tmp_path):
    image = _image(tmp_path / 'a.jpg', 400, 300)
    list_file = _write(tmp_path / 'l.txt', _line(image, [(200, 150, 2, 2)]) + '\n')
    params = copy.deepcopy(cfg)
    params.resample_attempts = 0  # straight to the deterministic fallback crop
    ds = WIDERDetection(list_file, 'train', input_size=SIZE, params=params)
    first, again = ds[(0, 0)], ds[(5, 0)]
    assert len(_check_item(first, SIZE)) == 1
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_unreadable_images_are_skipped_counted_and_warned_once(small_list, tmp_path, capsys):
    bad = str(tmp_path / 'corrupt.jpg')
    with open(bad, 'wb') as handle:
        handle.write(b'not a jpeg at all')
    missing = _image(tmp_path / 'missing.jpg', 64, 48)  # deleted once the dataset is built
    never = str(tmp_path / 'never_there.jpg')
    with open(small_list, 'a') as handle:
        handle.write(_line(bad, [(1, 1, 20, 20)]) + '\n' + _line(missing, [(1, 1, 20, 20)]) + '\n'
                     + _line(never, [(1, 1, 20, 20)]) + '\n')
    ds = WIDERDetection(small_list, 'train', input_size=SIZE)
    # A listed image that does not exist is reported up front, but stays: every process of a
    # distributed run must build a dataset of the same length.
    assert ds.missing_images == 1 and ds.paths[-1] == never and len(ds) == 6
    assert f'1 of 7 listed images do not exist (first: {never})' in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match='never_there.jpg'):
        _check_item(ds[(0, len(ds) - 1)], SIZE)
    val = WIDERDetection(small_list, 'val', input_size=SIZE)
    os.remove(missing)
    bad_index, missing_index = len(ds) - 3, len(ds) - 2
    with pytest.warns(RuntimeWarning, match='corrupt.jpg'):
        item = ds[(0, bad_index)]
    assert len(_check_item(item, SIZE)) >= 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        again = ds[(0, bad_index)]  # same replacement, no second warning for the same file
    assert torch.equal(item[0], again[0])
    with pytest.warns(RuntimeWarning, match='missing.jpg'):
        ds[(1, missing_index)]
    assert set(ds.bad_images) == {bad, missing, never}
    with pytest.warns(RuntimeWarning) as record:
        _check_item(val[bad_index + 1], SIZE)  # val keeps the faceless image: one index later
    assert {bad, missing, never} == set(val.bad_images)
    assert len(record) == 3 and all(str(w.message).count('cannot read image') == 1 for w in record)


def test_all_images_unreadable_is_a_clear_error_not_a_hang(tmp_path):
    gone = str(tmp_path / 'gone.jpg')
    list_file = _write(tmp_path / 'l.txt', (_line(gone, [(1, 1, 9, 9)]) + '\n') * 2)
    with pytest.raises(AnnotationError, match=f'l.txt: none of its 2 images exists \\(first: {gone}\\)'):
        WIDERDetection(list_file, 'val', input_size=SIZE)
    with open(gone, 'wb') as handle:
        handle.write(b'corrupt')
    ds = WIDERDetection(list_file, 'train', input_size=SIZE)
    with pytest.warns(RuntimeWarning) as caught, pytest.raises(UserError, match='no readable training image'):
        ds[0]
    shown = warnings.formatwarning(caught[0].message, caught[0].category, caught[0].filename, caught[0].lineno)
    assert shown.count('\n') == 1 and 'skipping unreadable image' in shown, shown  # no source line under it


def test_faces_outside_the_image_are_clipped_or_dropped(tmp_path, capsys):
    image = _image(tmp_path / 'a.png', 200, 100)
    outside_only = _image(tmp_path / 'b.png', 200, 100, seed=1)
    sliver_only = _image(tmp_path / 'c.png', 200, 100, seed=2)
    list_file = _write(tmp_path / 'l.txt', _line(image, [(150, 50, 100, 100), (300, 300, 10, 10),
                                                         (-20, 10, 20.004, 30)]) + '\n'
                       + _line(outside_only, [(500, 10, 20, 20)]) + '\n'
                       + _line(sliver_only, [(-20, 10, 20.004, 30)]) + '\n')
    val = WIDERDetection(list_file, 'val', input_size=SIZE)
    np.testing.assert_allclose(val[0][1].numpy(), [[0.75, 0.5, 1.0, 1.0, 1.0]], atol=1e-6)
    assert val.faces_outside == {image: 2}
    assert f'{image}: 2 of its 3 faces lie outside the 200x100 image' in capsys.readouterr().err
    val[0]
    assert 'lie outside' not in capsys.readouterr().err  # once per path
    assert len(val[2][1]) == 0  # validation keeps the image, without the face
    train = WIDERDetection(list_file, 'train', input_size=SIZE)
    for epoch in range(5):
        _check_item(train[(epoch, 0)], SIZE)
    # An image left without a face inside (a sliver of 0.004 px is none) is replaced.
    with pytest.warns(RuntimeWarning, match='none of its 1 faces'):
        for index in (1, 2):
            assert len(_check_item(train[(0, index)], SIZE)) >= 1
    assert set(train.bad_images) == {outside_only, sliver_only}


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'CMYK'])
def test_grayscale_alpha_and_cmyk_images_load(tmp_path, mode):
    ext = 'png' if mode == 'RGBA' else 'jpg'
    image = _image(tmp_path / f'a.{ext}', 200, 150, mode=mode)
    list_file = _write(tmp_path / 'l.txt', _line(image, [(50, 40, 60, 60)]) + '\n')
    _check_item(WIDERDetection(list_file, 'train', input_size=SIZE)[0], SIZE)
    _check_item(WIDERDetection(list_file, 'val', input_size=SIZE)[0], SIZE)


def test_raw_access_and_index_checks(small_list):
    ds = WIDERDetection(small_list, 'train', input_size=SIZE)
    assert ds.pull_image(1).shape == (240, 320, 3)
    np.testing.assert_array_equal(ds.pull_anno(1), [[100, 80, 160, 150, 1]])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match='mode'):
        WIDERDetection(small_list, 'test')


# -- factory, collate, sampler -------------------------------------------------------------

def test_dataset_factory_defaults_and_missing_files(small_list, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cfg.FACE, 'TRAIN_FILE', small_list)
    monkeypatch.setattr(cfg.FACE, 'VAL_FILE', small_list)
    train, val = dataset_factory('face', input_size=SIZE, seed=1)
    assert train.mode == 'train' and val.mode == 'val' and len(val) == 4 and train.seed == 1
    train, val = dataset_factory('face', input_size=SIZE, val_file=str(tmp_path / 'none.txt'))
    assert val is None and 'none.txt not found' in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match='prepare_wider_data.py'):
        dataset_factory('face', train_file=str(tmp_path / 'none.txt'))
    with pytest.raises(ValueError, match='unknown dataset'):
        dataset_factory('voc')


def test_loader_with_epoch_sampler_and_persistent_workers(small_list):
    ds = WIDERDetection(small_list, 'train', input_size=SIZE, seed=2)
    sampler = EpochBatchSampler(len(ds), batch_size=2, seed=2, drop_last=False)
    loader = make_loader(ds, sampler, num_workers=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = [i for batch in sampler for _, i in batch]
        assert sorted(order) == list(range(len(ds)))
        seen = 0
        for images, targets in loader:
            assert images.shape == (len(targets), 3, SIZE, SIZE) and isinstance(targets, list)
            for k, target in enumerate(targets):
                expected = ds[(epoch, order[seen + k])]
                assert torch.equal(images[k], expected[0]) and torch.equal(target, expected[1])
            seen += len(targets)
        assert seen == len(ds)
    sampler.set_epoch(1, start_batch=1)
    assert [i for batch in sampler for _, i in batch] == order[2:]


def test_epoch_batch_sampler_shards_and_resumes():
    full = EpochBatchSampler(10, batch_size=2, seed=5)
    full.set_epoch(3)
    batches = list(full)
    assert len(batches) == 5 and all(e == 3 for b in batches for e, _ in b)
    shards = [EpochBatchSampler(10, batch_size=2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    seen = []
    for s in shards:
        s.set_epoch(3)
        assert len(s) == 2
        seen += [i for b in s for _, i in b]
    assert len(set(seen)) == 8  # disjoint shards, incomplete last batch dropped
    full.set_epoch(3, start_batch=3)
    assert list(full) == batches[3:] and len(full) == 2
    other = EpochBatchSampler(10, batch_size=2, seed=5)
    other.set_epoch(4)
    assert list(other) != batches


def test_sampler_length_matches_its_batches_on_every_rank():
    # 10 samples on 4 processes: shards of 3, 3, 2, 2. Without drop_last ranks 0 and 1 get two
    # batches and ranks 2 and 3 one; len() (what len(loader) reports) must say the same.
    for drop_last in (True, False):
        for rank in range(4):
            sampler = EpochBatchSampler(10, batch_size=2, rank=rank, world_size=4, shuffle=False,
                                        drop_last=drop_last)
            batches = list(sampler)
            assert len(sampler) == len(batches) == (1 if drop_last else 2 - rank // 2)
            assert [i for b in batches for _, i in b] == list(range(rank, 10, 4))[:2 * len(batches)]


def test_synthetic_wider_end_to_end(tmp_path):
    synthetic = pytest.importorskip('data.synthetic', reason='data/synthetic.py is not available')
    from prepare_wider_data import main, parse_args
    root = tmp_path / 'wider'
    synthetic.generate(str(root), 6, 3, seed=5)
    main(parse_args(['--dataset_dir', str(root), '--out_dir', str(tmp_path)]))
    train, val = dataset_factory('face', input_size=SIZE, train_file=str(tmp_path / 'face_train.txt'),
                                 val_file=str(tmp_path / 'face_val.txt'))
    images, targets = detection_collate([train[(0, i)] for i in range(len(train))])
    assert images.shape == (len(train), 3, SIZE, SIZE) and all(len(t) >= 1 for t in targets)
    for i in range(len(val)):
        _check_item(val[i], SIZE)
    assert not os.path.exists(tmp_path / 'face_train.txt.tmp')


def test_an_image_whose_faces_all_lie_outside_it_is_not_called_unreadable(tmp_path):
    """It reads fine: the warning and the error say what is wrong with it (its boxes)."""
    good = _image(tmp_path / 'a.png', 200, 100)
    outside = _image(tmp_path / 'b.png', 200, 100, seed=1)
    list_file = _write(tmp_path / 'l.txt', _line(good, [(50, 20, 40, 40)]) + '\n'
                       + _line(outside, [(500, 10, 20, 20)]) + '\n')
    train = WIDERDetection(list_file, 'train', input_size=SIZE)
    with pytest.warns(RuntimeWarning) as record:
        _check_item(train[(0, 1)], SIZE)
    assert [str(w.message) for w in record] == [
        f'skipping image without a face inside it (1 so far in this process): {outside}: none of its 1 faces '
        f'lies inside the 200x100 image (the image reads fine: are the listed boxes those of another image, '
        f'or of another size of it?)']
    only_outside = WIDERDetection(_write(tmp_path / 'o.txt', _line(outside, [(500, 10, 20, 20)]) + '\n'),
                                  'train', input_size=SIZE)
    with pytest.warns(RuntimeWarning), pytest.raises(UserError) as info:
        only_outside[0]
    assert 'no usable training image' in str(info.value) and 'cannot read image' not in str(info.value)
    assert 'none of its 1 faces lies inside the 200x100 image' in str(info.value)


def test_a_directory_given_as_a_list_is_not_reported_missing(small_list, tmp_path):
    for option in ('train_file', 'val_file'):
        with pytest.raises(IsADirectoryError) as info:
            dataset_factory('face', input_size=SIZE, **{'train_file': small_list, option: str(tmp_path)})
        kind = 'training' if option == 'train_file' else 'validation'
        assert str(info.value).startswith(f'{kind} list {tmp_path} is a directory: give the list file in it')
        assert 'not found' not in str(info.value)


def test_more_workers_than_cores_start_as_many_as_the_cores_saying_so_once(small_list, monkeypatch, capsys):
    """The default --num_workers 4 on a 2-core machine: two loaders (training, validation) and
    the AP test's decoder start 2 processes each, with one line saying why, instead of PyTorch's
    two-line warning that the workers may run slowly or freeze."""
    import data.factory
    from utils.inference.batch_detect import detect_files

    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)  # PyTorch reads it too
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    monkeypatch.setattr(data.factory, '_capped', set())
    ds = WIDERDetection(small_list, mode='val', input_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # PyTorch's warning would fail the test
        loaders = [make_loader(ds, EpochBatchSampler(len(ds), 2, shuffle=shuffle), num_workers=4)
                   for shuffle in (True, False)]
        assert [loader.num_workers for loader in loaders] == [2, 2]
        assert make_loader(ds, EpochBatchSampler(len(ds), 2), num_workers=2).num_workers == 2

        class Detector:  # what detect_files asks of utils.inference.detector.Detector in 'multiscale' mode
            max_size = None

            def detect(self, rgb, mode):
                return np.zeros((0, 5), np.float32)

        paths = [os.path.join(os.path.dirname(small_list), 'img0.jpg')]
        assert [r[0] for r in detect_files(Detector(), paths, 'multiscale', workers=4, option='--num_workers')] == [0]
    assert capsys.readouterr().err == ('--num_workers 4: this process may use 2 CPU cores, so 2 data loading '
                                       'processes start (more would only compete for the cores)\n')
