"""utils/training/val_ap.py: the AP train.py --val_ap reports is the AP that wider_test.py + wider_eval.py
give for the same weights, and its fall-back to the list's own faces."""
import os
import shutil

import numpy as np
import pytest
import torch

import prepare_wider_data
import wider_test
from data.synthetic import generate
from s3fd import build_s3fd, init_weights_from_scratch
from utils.files.weights import atomic_save
from utils.device import setup_device
from utils.cli import UserError
from utils.training.val_ap import ValAP, format_ap_line, image_key, list_ground_truth, mean_ap
from utils.evaluation.widerface_eval import evaluate_detections


@pytest.fixture(scope='module')
def wider(tmp_path_factory):
    root = tmp_path_factory.mktemp('val_ap')
    generate(str(root / 'WIDER'), 2, 4, seed=5)
    prepare_wider_data.main(prepare_wider_data.parse_args(['--dataset_dir', str(root / 'WIDER'),
                                                           '--out_dir', str(root)]))
    return root


def test_image_key_is_the_event_and_the_name_of_the_mat_files():
    assert image_key('/d/WIDER_val/images/0--Parade/0_Parade_marchingband_1_465.jpg') == \
        ('0--Parade', '0_Parade_marchingband_1_465')


def test_list_ground_truth_counts_every_listed_face():
    boxes = [np.array([[10, 20, 30, 50, 1], [40, 40, 44, 46, 1]], np.float32), np.zeros((0, 5), np.float32)]
    gt = list_ground_truth([('e', 'a'), ('e', 'b')], boxes)
    assert gt.num_faces == {'all': 2} and list(gt.counted) == ['all']
    perfect = {('e', 'a'): np.array([[10, 20, 20, 30, 0.9], [40, 40, 4, 6, 0.8]])}
    assert evaluate_detections(perfect, gt, arithmetic='double')[0] == {'all': 1.0}
    half = {('e', 'a'): np.array([[10, 20, 20, 30, 0.9]])}
    assert evaluate_detections(half, gt, warn=lambda m: None, arithmetic='double')[0]['all'] == pytest.approx(0.5)


def test_ap_during_training_equals_wider_test_then_wider_eval(wider, tmp_path):
    torch.manual_seed(0)
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    val_ap = ValAP(str(wider / 'face_val.txt'), max_size=96)
    assert val_ap.settings == ['easy', 'medium', 'hard'] and 'official ground truth' in val_ap.describe()
    aps = val_ap.evaluate(net, setup_device('cpu', amp='off'))
    assert net.phase == 'train' and net.training  # left as it was
    atomic_save(net.state_dict(), str(tmp_path / 'model.pth'))
    gt_dir = str(wider / 'WIDER' / 'eval_tools' / 'ground_truth')
    printed = wider_test.main(wider_test.parse_args([
        '--model', str(tmp_path / 'model.pth'), '--dataset_dir', str(wider / 'WIDER'), '--out', str(tmp_path / 'pred'),
        '--device', 'cpu', '--max_size', '96', '--workers', '0', '--eval', gt_dir]))
    assert aps == printed  # the same detections, written and read back, the same arithmetic
    assert format_ap_line(3, aps, 4, 1.25) == (f'val AP epoch:3 || Easy:{aps["easy"]:.4f} Medium:{aps["medium"]:.4f} '
                                               f'Hard:{aps["hard"]:.4f} || 4 images, 1.2s')
    assert mean_ap(aps) == pytest.approx(sum(aps.values()) / 3)


def test_without_the_official_files_one_ap_over_the_listed_faces(wider, tmp_path):
    # The same images in a folder without eval_tools/ beside it.
    images = tmp_path / 'WIDER_val' / 'images'
    shutil.copytree(wider / 'WIDER' / 'WIDER_val' / 'images', images)
    lines = open(wider / 'face_val.txt').read().replace(str(wider / 'WIDER' / 'WIDER_val'), str(tmp_path / 'WIDER_val'))
    (tmp_path / 'val.txt').write_text(lines)
    val_ap = ValAP(str(tmp_path / 'val.txt'), max_images=3, max_size=64)
    assert val_ap.settings == ['all'] and len(val_ap.paths) == 3
    assert 'one AP over the' in val_ap.describe()
    torch.manual_seed(0)
    net = build_s3fd('train')
    aps = val_ap.evaluate(net, setup_device('cpu', amp='off'))
    assert set(aps) == {'all'} and 0.0 <= aps['all'] <= 1.0
    # An explicit --eval_gt that does not hold the listed images is refused in one line.
    first = lines.splitlines()[0].split(' ', 1)
    renamed = os.path.join(os.path.dirname(first[0]), 'not_in_the_mat.jpg')
    shutil.copy(first[0], renamed)
    (tmp_path / 'one.txt').write_text(f'{renamed} {first[1]}\n')
    gt_dir = str(wider / 'WIDER' / 'eval_tools' / 'ground_truth')
    with pytest.raises(UserError, match=r'--eval_gt .*: 1 of the 1 images of .* are not in its '
                                         r'wider_face_val.mat \(first: .*/not_in_the_mat\)'):
        ValAP(str(tmp_path / 'one.txt'), gt_dir)
