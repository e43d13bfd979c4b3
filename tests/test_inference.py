"""utils/inference.py: preprocessing, box conversion, the multi-scale plan, box voting, output rows."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from data.config import cfg
from s3fd import MIN_INPUT_SIDE, build_s3fd
from utils.inference import (Detector, bbox_vote, draw_detections, images_to_input,
                             max_shrink, multi_scale_plan, single_scale, to_pixel_boxes, to_wider_rows)


class FixedBoxNet(nn.Module):
    """Stands in for build_s3fd('test'): every image gets the same normalised face boxes."""

    def __init__(self, rows):
        super().__init__()
        self.rows = torch.tensor(rows, dtype=torch.float32)  # [n, 5] (score, x1, y1, x2, y2)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(tuple(x.shape))
        out = torch.zeros(x.shape[0], 2, cfg.TOP_K, 5)
        out[:, 1, :len(self.rows)] = self.rows
        return out


def test_images_to_input_is_rgb_minus_mean_chw_float():
    rgb = np.zeros((40, 50, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 123, 117, 104   # the mean colour -> zeros
    rgb[3, 4] = (200, 0, 255)
    x = images_to_input([rgb, rgb])
    assert x.shape == (2, 3, 40, 50) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)   # the HWC data as it is, no reordering copy
    assert x[:, :, 3, 4].tolist() == [[77.0, -117.0, 151.0]] * 2   # R, G, B order, no scaling
    x[:, :, 3, 4] = 0
    assert not x.any()
    flipped = images_to_input(rgb, flip=True)
    assert flipped.shape[0] == 2 and flipped[1, 0, 3, 50 - 1 - 4] == 77.0


def test_small_inputs_are_padded_with_the_mean_and_boxes_do_not_move():
    rgb = np.full((10, 20, 3), 50, dtype=np.uint8)
    x = images_to_input(rgb)
    assert x.shape == (1, 3, MIN_INPUT_SIDE, MIN_INPUT_SIDE)
    assert (x[..., 10:, :] == 0).all() and (x[..., :, 20:] == 0).all()
    net = FixedBoxNet([[0.9, 0.25, 0.25, 0.5, 0.5]])
    dets = Detector(net).detect_at_scale(rgb, 1.0)
    # normalised to the padded 32x32 input: 0.25 * 32 = 8 px, 0.5 * 32 = 16 px.
    assert dets[:, :4].tolist() == [[8.0, 8.0, 16.0, 16.0]]
    # A real network accepts it too.
    out = build_s3fd('test').eval()(x)
    assert out.shape == (1, 2, cfg.TOP_K, 5)


def test_to_pixel_boxes_scales_to_the_original_image_and_mirrors_flipped_ones():
    out = torch.zeros(2, 2, cfg.TOP_K, 5)
    out[:, 1, 0] = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.6])
    out[:, 1, 1] = torch.tensor([0.04, 0.5, 0.5, 0.6, 0.6])   # below thresh
    # 100x200 input tensor holding a 100x200 resize of a 300x600 image (scale 1/3).
    dets = to_pixel_boxes(out, (100, 200), (100, 200), (300, 600), thresh=0.05, flipped=[False, True])
    np.testing.assert_allclose(dets[0], [[60, 60, 180, 180, 0.9]], rtol=1e-5)
    np.testing.assert_allclose(dets[1], [[600 - 180, 60, 600 - 60, 180, 0.9]], rtol=1e-5)


def test_detector_maps_every_scale_back_to_the_same_pixels():
    net = FixedBoxNet([[0.8, 0.1, 0.2, 0.3, 0.4]])
    det = Detector(net)
    rgb = np.zeros((90, 120, 3), dtype=np.uint8)
    for scale in (0.5, 1.0, 1.5):
        normal, mirrored = det.detect_at_scale(rgb, scale, flip=True)
        np.testing.assert_allclose(normal[:, :4], [[12, 18, 36, 36]], atol=1e-4)
        np.testing.assert_allclose(mirrored[:, :4], [[120 - 36, 18, 120 - 12, 36]], atol=1e-4)
    assert net.inputs == [(2, 3, 45, 60), (2, 3, 90, 120), (2, 3, 135, 180)]


def test_scales_follow_the_1700x1200_rule_and_max_size():
    assert max_shrink(1200, 1700) == pytest.approx(1.0)
    assert single_scale(678, 1024) == 1.0                                # WIDER images are not enlarged
    assert single_scale(2000, 2000) == pytest.approx(np.sqrt(1700 * 1200 / 4e6))
    assert single_scale(678, 1024, max_size=512) == pytest.approx(0.5)
    assert single_scale(100, 200, max_size=512) == 1.0


def test_multi_scale_plan_matches_the_s3fd_rules():
    real = multi_scale_plan(678, 1024)             # m = 1.71: original, 0.5, and m for small faces
    m = np.sqrt(1700 * 1200 / (678 * 1024))
    assert real['base'] == 1.0 and real['shrink'] == 0.5
    assert real['enlarge'] == pytest.approx([m]) and real['enlarge_keeps_small']
    small = multi_scale_plan(200, 200)             # m = 7.14: 2, 4 and m
    assert small['enlarge'] == pytest.approx([2, 4, np.sqrt(1700 * 1200 / 40000)])
    assert small['enlarge_keeps_small']
    big = multi_scale_plan(3000, 4000)             # m = 0.41 < 0.75: everything shrinks
    m = np.sqrt(1700 * 1200 / 12e6)
    assert big['base'] == pytest.approx(m) and big['shrink'] == pytest.approx(0.5 * m)
    assert big['enlarge'] == pytest.approx([0.75 * m]) and not big['enlarge_keeps_small']


def test_bbox_vote_merges_to_the_score_weighted_average_with_the_best_score():
    dets = np.array([[10, 10, 50, 50, 0.9],
                     [14, 12, 54, 56, 0.3],         # IoU 0.7 with the first: same cluster
                     [200, 200, 240, 240, 0.8],
                     [202, 198, 242, 238, 0.8],
                     [400, 400, 420, 420, 0.99]],   # alone: dropped, as in the reference
                    dtype=np.float32)
    out = bbox_vote(dets[::-1])
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out[0], [(10 * .9 + 14 * .3) / 1.2, (10 * .9 + 12 * .3) / 1.2,
                                        (50 * .9 + 54 * .3) / 1.2, (50 * .9 + 56 * .3) / 1.2, 0.9], rtol=1e-5)
    np.testing.assert_allclose(out[1], [201, 199, 241, 239, 0.8], rtol=1e-5)
    kept = bbox_vote(dets, keep_single=True)
    np.testing.assert_allclose(kept[0], dets[4], rtol=1e-6)
    assert len(bbox_vote(dets, top_k=1)) == 1
    assert bbox_vote(np.zeros((0, 5))).shape == (0, 5)


def test_bbox_vote_uses_the_pixel_inclusive_iou():
    # Widths 10 (x2 - x1 + 1): IoU 5*10 / 150 = 0.333 >= 0.3; without the +1 it would be 0.286.
    dets = np.array([[0, 0, 9, 9, 0.6], [5, 0, 14, 9, 0.6]], dtype=np.float32)
    assert len(bbox_vote(dets)) == 1
    apart = np.array([[0, 0, 9, 9, 0.6], [6, 0, 15, 9, 0.6]], dtype=np.float32)   # 40 / 160 = 0.25
    assert len(bbox_vote(apart)) == 0


def test_multi_scale_detect_merges_all_passes_into_one_face():
    # A centred box: every pass and the mirrored one find it at the same pixels.
    net = FixedBoxNet([[0.7, 0.4, 0.3, 0.6, 0.7]])
    rgb = np.zeros((200, 200, 3), dtype=np.uint8)
    dets = Detector(net).multi_scale_detect(rgb)
    np.testing.assert_allclose(dets, [[80, 60, 120, 140, 0.7]], atol=1e-3)
    # one batch of two (original + mirror) at scale 1, then 0.5, 2, 4 and m = 7.14
    assert [s[0] for s in net.inputs] == [2, 1, 1, 1, 1]
    assert [s[2] for s in net.inputs] == [200, 100, 400, 800, round(200 * np.sqrt(1700 * 1200 / 40000))]


def test_batched_detection_equals_one_image_at_a_time():
    torch.manual_seed(0)
    det = Detector(build_s3fd('test').eval())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]
    hws = [(128, 192), (64, 96), (96, 144)]
    together = det.detect_resized(images, hws)
    for image, hw, batched in zip(images, hws, together):
        alone = det.detect_resized([image], [hw])[0]
        assert alone.shape == batched.shape and len(alone) > 0
        np.testing.assert_allclose(alone, batched, rtol=1e-4, atol=1e-3)


def test_to_wider_rows_clips_and_uses_the_annotation_width():
    dets = np.array([[-5, 10, 30, 40, 0.5],
                     [90, 80, 130, 120, 0.9],      # partly outside a 100x100 image
                     [120, 10, 140, 30, 0.95]],    # entirely outside: dropped
                    dtype=np.float32)
    rows = to_wider_rows(dets, 100, 100)
    np.testing.assert_allclose(rows, [[90, 80, 10, 20, 0.9], [0, 10, 30, 30, 0.5]], rtol=1e-6)


def test_draw_detections_marks_boxes_above_the_threshold():
    rgb = np.zeros((100, 120, 3), dtype=np.uint8)
    dets = np.array([[20, 30, 60, 80, 0.9], [70, 10, 90, 30, 0.2]], dtype=np.float32)
    image, count = draw_detections(rgb, dets, thresh=0.5)
    assert count == 1 and image.shape == rgb.shape and not rgb.any()
    assert (image[60, 20] == (0, 255, 0)).all() and (image[79, 40] == (0, 255, 0)).all()
    assert not image[20:28, 75:88].any()        # the low-scoring box is not drawn


def test_bench_infer_prints_one_json_object(capsys):
    import json
    from benchmarks import bench_infer
    report = bench_infer.main(bench_infer.parse_args(['--width', '64', '--height', '48', '--batch_sizes', '1,2',
                                                      '--iters', '1', '--warmup', '0', '--threads', '2']))
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    assert set(printed['results']) == {'1', '2'} and printed['input'] == '64x48'
    for batch in printed['results'].values():
        assert batch['images_per_s'] > 0 and 0 < batch['boxes_per_image'] <= cfg.TOP_K
