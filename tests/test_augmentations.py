"""utils/augmentations: the S3FD training transform on the real WIDER image and synthetic ones."""
import copy
import functools
import os
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from data.config import cfg
from data.widerface import read_wider_annotations
from utils.augmentations import TrainAugmentation, distort_image, fallback_plan, train_transform, val_transform
from utils.transforms import clip_boxes, subtract_mean, to_tensor, to_uint8_tensor
from utils.files.image_io import load_rgb

S = 640
MEAN = np.array([123, 117, 104], dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _annotations(path):
    return {r.name: r for r in read_wider_annotations(path)}


def _xyxy(xywh):
    b = np.asarray(xywh, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] += b[:, :2]
    return b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]


@pytest.fixture
def real_sample(real_image_path, real_val_annotations):
    """The real 1024x678 val image and its 126 faces (x1, y1, x2, y2) clipped to it."""
    name = '/'.join(real_image_path.split(os.sep)[-2:])
    image = load_rgb(real_image_path)
    boxes, _ = clip_boxes(_xyxy(_annotations(real_val_annotations)[name].boxes), image.shape[1], image.shape[0])
    return image, boxes


@pytest.fixture(scope='module')
def synthetic_samples(tmp_path_factory):
    """Images and faces of a small synthetic WIDER training split (data/synthetic.py)."""
    synthetic = pytest.importorskip('data.synthetic', reason='data/synthetic.py is not available')
    root = str(tmp_path_factory.mktemp('synthetic_wider'))
    synthetic.generate(root, 10, 0, seed=11)
    samples = []
    ann = os.path.join(root, 'wider_face_split', 'wider_face_train_bbx_gt.txt')
    for rec in read_wider_annotations(ann):
        image = load_rgb(os.path.join(root, 'WIDER_train', 'images', rec.name))
        boxes, _ = clip_boxes(_xyxy(rec.boxes), image.shape[1], image.shape[0])
        if len(boxes):
            samples.append((image, boxes))
    assert len(samples) >= 5
    return samples


def _params(**changes):
    params = copy.deepcopy(cfg)
    params.update(changes)
    return params


def _check_sample(image, boxes, plan, out, out_boxes):
    """The invariants every training sample must hold."""
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    assert out_boxes.dtype == np.float32 and out_boxes.shape == (len(plan.keep), 4)
    assert len(out_boxes) <= len(boxes)
    assert len(np.unique(plan.keep)) == len(plan.keep)
    assert (out_boxes >= 0).all() and (out_boxes <= S).all()
    w = out_boxes[:, 2] - out_boxes[:, 0]
    h = out_boxes[:, 3] - out_boxes[:, 1]
    assert (w > 0).all() and (h > 0).all() and (w * h >= cfg.min_face_size ** 2 - 1e-3).all()
    # No aspect change: a face fully inside the window keeps its width/height ratio, up to
    # the whole-pixel rounding of where the image part lands in the output.
    x0, y0, side = plan.window
    src = boxes[plan.keep]
    whole = ((src[:, 0] >= x0) & (src[:, 1] >= y0) & (src[:, 2] <= x0 + side) & (src[:, 3] <= y0 + side))
    dw, dh = plan.dst[2] - plan.dst[0], plan.dst[3] - plan.dst[1]
    ratio_in = (src[:, 2] - src[:, 0]) / (src[:, 3] - src[:, 1])
    ratio_out = w / h
    tol = 1.0 / dw + 1.0 / dh + 1e-4
    assert (np.abs(ratio_out / ratio_in - 1)[whole] <= tol).all()


def _many_samples(image, boxes, seeds, aug=None):
    aug = aug or TrainAugmentation(S)
    height, width = image.shape[:2]
    for seed in seeds:
        plan = aug.plan(boxes, width, height, np.random.default_rng([seed, 99]))
        out, out_boxes = aug.render(image, plan)
        yield plan, out, out_boxes


def test_invariants_on_the_real_image(real_sample):
    image, boxes = real_sample
    kinds = set()
    for plan, out, out_boxes in _many_samples(image, boxes, range(150)):
        _check_sample(image, boxes, plan, out, out_boxes)
        kinds.add(plan.kind)
    assert {'anchor', 'square'} <= kinds


def test_invariants_on_synthetic_images(synthetic_samples):
    for k, (image, boxes) in enumerate(synthetic_samples):
        for plan, out, out_boxes in _many_samples(image, boxes, range(100 * k, 100 * k + 25)):
            _check_sample(image, boxes, plan, out, out_boxes)


def test_same_generator_state_gives_the_same_sample(real_sample):
    image, boxes = real_sample
    aug = TrainAugmentation(S)
    first = aug(image, boxes, np.random.default_rng(5))
    again = aug(image, boxes, np.random.default_rng(5))
    other = aug(image, boxes, np.random.default_rng(6))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def _colour_boxes_image(rng):
    """A 360x500 image with 6 flat-coloured rectangles as faces (sizes 20..150 px)."""
    colours = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)],
                       dtype=np.uint8)
    image = np.full((360, 500, 3), 40, dtype=np.uint8)
    boxes = []
    for colour in colours:
        while True:
            w = int(rng.integers(20, 150))
            h = int(w * rng.uniform(0.7, 1.4))
            x, y = int(rng.integers(0, 500 - w)), int(rng.integers(0, 360 - h))
            if all(x >= b[2] + 2 or x + w + 2 <= b[0] or y >= b[3] + 2 or y + h + 2 <= b[1] for b in boxes):
                break
        image[y:y + h, x:x + w] = colour
        boxes.append((x, y, x + w, y + h))
    return image, np.array(boxes, dtype=np.float32), colours


def test_boxes_follow_the_pixels():
    """Without photometric distortion, the inside of every output box shows its face's colour
    (crop, resize with any interpolation, padding and mirror all move pixels and boxes alike)."""
    aug = TrainAugmentation(S, _params(apply_distort=False))
    checked, mirrored = 0, 0
    for seed in range(40):
        image, boxes, colours = _colour_boxes_image(np.random.default_rng(seed))
        plan = aug.plan(boxes, image.shape[1], image.shape[0], np.random.default_rng([seed, 1]))
        out, out_boxes = aug.render(image, plan)
        mirrored += plan.mirror
        for k, (x1, y1, x2, y2) in zip(plan.keep, out_boxes):
            if min(x2 - x1, y2 - y1) < 12:
                continue
            for fx, fy in ((0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)):
                px = out[int(y1 + fy * (y2 - y1)), int(x1 + fx * (x2 - x1))].astype(int)
                assert np.abs(px - colours[k]).max() <= 40, (seed, plan.kind, k, px, colours[k])
            checked += 1
    assert checked > 60 and 0 < mirrored < 40


def test_mirrored_sample_mirrors_image_and_boxes(real_sample, synthetic_samples):
    aug = TrainAugmentation(S)
    for image, boxes in [real_sample] + synthetic_samples[:3]:
        for plan, out, out_boxes in _many_samples(image, boxes, range(8), aug):
            flipped_plan = replace(plan, mirror=not plan.mirror)
            out2, boxes2 = aug.render(image, flipped_plan)
            np.testing.assert_array_equal(out2, out[:, ::-1])
            np.testing.assert_allclose(boxes2[:, [0, 2]], S - out_boxes[:, [2, 0]], atol=1e-4)
            np.testing.assert_allclose(boxes2[:, [1, 3]], out_boxes[:, [1, 3]], atol=1e-4)


def test_data_anchor_sampling_scales_the_chosen_face_to_the_chosen_anchor(real_sample, synthetic_samples):
    aug = TrainAugmentation(S, _params(data_anchor_sampling_prob=1.0))
    anchors = np.array(cfg.ANCHOR_SIZES, dtype=float)
    targets, measured = set(), 0
    for k, (image, boxes) in enumerate([real_sample] + synthetic_samples):
        for plan, out, out_boxes in _many_samples(image, boxes, range(1000 * k, 1000 * k + 30), aug):
            if plan.kind != 'anchor':
                continue
            face = boxes[plan.face]
            side = float(np.sqrt((face[2] - face[0]) * (face[3] - face[1])))
            nearest = int(np.argmin(np.abs(anchors - side)))
            assert plan.anchor in anchors[:min(nearest + 1, 5) + 1]
            wanted = plan.anchor * 2.0 ** plan.jitter
            # The chosen face at the output scale: anchor * 2^U(-1, 1), up to the whole-pixel window.
            assert abs(side * plan.scale / wanted - 1) <= 0.5 / plan.window[2] + 1e-6
            targets.add(plan.anchor)
            x0, y0, win = plan.window
            inside = face[0] >= x0 and face[1] >= y0 and face[2] <= x0 + win and face[3] <= y0 + win
            if inside and plan.face in plan.keep:
                box = out_boxes[list(plan.keep).index(plan.face)]
                got = np.sqrt((box[2] - box[0]) * (box[3] - box[1]))
                assert plan.anchor / 2 * 0.97 <= got <= plan.anchor * 2 * 1.03
                assert abs(got / wanted - 1) < 0.03 + 1.0 / got
                measured += 1
    assert measured >= 30 and len(targets) >= 3


def test_padding_keeps_the_exact_mean(real_sample):
    image, boxes = real_sample
    aug = TrainAugmentation(S, _params(data_anchor_sampling_prob=1.0, mirror_prob=0.0))
    padded = 0
    for plan, out, _ in _many_samples(image, boxes, range(60), aug):
        x0, y0, x1, y1 = plan.dst
        if (x0, y0, x1, y1) == (0, 0, S, S):
            continue
        mask = np.ones((S, S), dtype=bool)
        mask[y0:y1, x0:x1] = False
        assert (out[mask] == MEAN).all()
        padded += 1
    assert padded >= 5


def test_crop_then_resize_without_distortion_is_a_plain_resize_of_the_crop(real_sample):
    image, boxes = real_sample
    aug = TrainAugmentation(S, _params(apply_distort=False, mirror_prob=0.0))
    for plan, out, _ in _many_samples(image, boxes, range(10), aug):
        sx0, sy0, sx1, sy1 = plan.src
        dx0, dy0, dx1, dy1 = plan.dst
        expected = cv2.resize(image[sy0:sy1, sx0:sx1], (dx1 - dx0, dy1 - dy0), interpolation=plan.interpolation)
        np.testing.assert_array_equal(out[dy0:dy1, dx0:dx1], expected)


def test_photometric_distortions_act_as_named():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, (64, 64, 3), dtype=np.uint8)
    image[:16, :16] = (200, 30, 30)
    base = image.astype(float)
    np.testing.assert_array_equal(distort_image(image, (0, None, None, None, None)), image)
    bright = distort_image(image, (0, 1.1, None, None, None)).astype(float)
    assert abs(bright.mean() / base.mean() - 1.1) < 0.01
    for order in (0, 1):
        contrast = distort_image(image, (order, None, 1.5, None, None)).astype(float)
        assert contrast.std() > 1.4 * base.std() and abs(contrast.mean() - base.mean()) < 4
    dull = distort_image(image, (0, None, None, 0.5, None)).astype(float)
    assert (dull.max(-1) - dull.min(-1)).mean() < 0.6 * (base.max(-1) - base.min(-1)).mean()
    shifted = distort_image(image, (0, None, None, None, 18.0))
    red = shifted[:16, :16].reshape(-1, 3).mean(0)
    assert red[1] > 60 and red[0] > 150  # red turned towards orange (+25 degrees of hue)


def test_a_face_too_small_for_one_draw_survives_another():
    """A lone 3x3 face is dropped by full-image square crops; some draws keep it, enlarged."""
    boxes = np.array([[500, 300, 503, 303]], dtype=np.float32)
    aug = TrainAugmentation(S)
    kept = [len(aug.plan(boxes, 1000, 700, np.random.default_rng(s)).boxes) for s in range(40)]
    assert 0 < sum(kept) < 40


@pytest.mark.parametrize('face', [(500, 300, 503, 303), (100, 50, 102, 650), (0, 0, 1000, 700),
                                  (990, 690, 1000, 700)])
def test_fallback_plan_always_keeps_a_face(face):
    image = np.full((700, 1000, 3), 90, dtype=np.uint8)
    boxes = np.array([face, (10, 10, 11, 11)], dtype=np.float32)
    aug = TrainAugmentation(S)
    plan = fallback_plan(aug, boxes, 1000, 700)
    out, out_boxes = aug.render(image, plan)
    assert plan.kind == 'fallback' and 0 in plan.keep and out.shape == (S, S, 3)
    w = out_boxes[:, 2] - out_boxes[:, 0]
    h = out_boxes[:, 3] - out_boxes[:, 1]
    assert (w * h >= cfg.min_face_size ** 2).all()
    again = fallback_plan(aug, boxes, 1000, 700)
    assert again.window == plan.window and np.array_equal(again.boxes, plan.boxes)


def test_train_transform_clips_boxes_partly_outside():
    image = np.full((200, 300, 3), 60, dtype=np.uint8)
    image[20:120, 200:300] = 250
    boxes = np.array([[200, 20, 350, 120]], dtype=np.float32)  # 50 px past the right edge
    out, out_boxes = train_transform(image, boxes, np.random.default_rng(3), 160)
    assert out.shape == (160, 160, 3) and (out_boxes >= 0).all() and (out_boxes <= 160).all()


def test_val_transform_is_a_plain_resize_with_clipped_boxes():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 20, 30], [190, 90, 230, 120], [300, 0, 310, 10]], dtype=np.float32)
    out, out_boxes = val_transform(image, boxes, 64)
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(out_boxes, [[3.2, 6.4, 6.4, 19.2], [60.8, 57.6, 64, 64]], atol=1e-4)


def test_to_tensor_is_rgb_minus_mean_chw():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 200, 100, 0
    out = to_tensor(image)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 6)
    assert out[0].eq(200 - 123).all() and out[1].eq(100 - 117).all() and out[2].eq(-104).all()


def test_subtract_mean_of_uint8_batches_equals_to_tensor():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    batch = torch.stack([to_uint8_tensor(image) for image in images])
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 5, 7)
    out = subtract_mean(batch)
    assert torch.equal(out, torch.stack([to_tensor(image) for image in images]))
    assert batch.dtype == torch.uint8 and int(batch.max()) > 200  # the input is left alone


def test_to_uint8_tensor_is_a_view_and_the_collated_batch_is_the_packed_transpose():
    from data.factory import detection_collate
    images = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    views = [to_uint8_tensor(image) for image in images]
    for image, view in zip(images, views):
        assert view.shape == (3, 5, 7) and view.data_ptr() == image.ctypes.data  # no copy made
        assert torch.equal(view, torch.from_numpy(image.transpose(2, 0, 1).copy()))
    batch, _ = detection_collate([(view, torch.zeros(0, 5)) for view in views])
    assert batch.is_contiguous() and batch.shape == (3, 3, 5, 7)
    assert torch.equal(batch, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    flipped = images[0][:, ::-1]  # negative strides: copied, same values
    assert torch.equal(to_uint8_tensor(flipped), torch.from_numpy(flipped.transpose(2, 0, 1).copy()))


def test_unknown_interpolation_name_is_a_clear_error():
    with pytest.raises(ValueError, match='bogus'):
        TrainAugmentation(S, _params(resize_interpolations=('linear', 'bogus')))


def test_faces_under_the_minimum_side_are_dropped_by_area():
    """The reference's rule: a face stays when w * h >= min_face_size ** 2 in output pixels,
    so a thin but large-enough face (5x8) is kept and a 4x8 one is not."""
    aug = TrainAugmentation(S)
    assert aug.min_face == cfg.min_face_size == 6.0
    boxes = np.array([[100, 100, 105, 108], [300, 300, 304, 308], [400, 400, 406, 406],
                      [500, 500, 536, 501]], dtype=np.float32)
    plan = aug._finish(boxes, S, S, 'square', (0, 0, S), cv2.INTER_LINEAR, None, False)
    assert plan.keep.tolist() == [0, 2, 3]
    np.testing.assert_allclose(plan.boxes, boxes[[0, 2, 3]])
