"""demo.py: boxes drawn on saved copies, face counts and times printed, bad input."""
import os

import cv2
import numpy as np
import pytest
import torch

import demo
from s3fd import build_s3fd
from utils.files import weights as checkpoint
from s3fd import MIN_INPUT_SIDE


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp('model') / 'random.pth')
    torch.save(build_s3fd('test').state_dict(), path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / 'in'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(90, 120), (100, 80)]):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f'im{k}.png'), rgb)
    return folder


def run(*argv):
    return demo.main(demo.parse_args([str(a) for a in argv]))


def test_saves_each_image_with_boxes_and_prints_counts_and_times(model, images, tmp_path, capsys):
    results = run('--model', model, images, '--out', tmp_path / 'out', '--thresh', '0.05', '--device', 'cpu')
    out = capsys.readouterr().out
    assert len(results) == 2
    for src, dst, faces, seconds in results:
        original = cv2.imread(src)
        drawn = cv2.imread(dst)
        assert os.path.dirname(dst) == str(tmp_path / 'out') and os.path.basename(dst) == os.path.basename(src)
        assert drawn.shape == original.shape
        assert faces > 0 and seconds > 0        # random weights score ~0.5 everywhere
        assert (np.abs(drawn.astype(int) - original.astype(int)).sum(axis=2) > 0).any()
        assert f'{src}: {faces} detection(s) at score >= 0.05, ' in out
    assert 'ms per image after the first' in out


def test_high_threshold_draws_nothing(model, images, tmp_path, capsys):
    results = run('--model', model, images / 'im0.png', '--out', tmp_path / 'out', '--thresh', '1.01',
                  '--device', 'cpu')
    (src, dst, faces, _), = results
    assert faces == 0
    assert (cv2.imread(dst) == cv2.imread(src)).all()   # png: lossless
    assert '0 detection(s)' in capsys.readouterr().out


def test_unreadable_images_are_skipped_and_reported(model, images, tmp_path, capsys):
    (images / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    results = run('--model', model, images, '--out', tmp_path / 'out', '--device', 'cpu', '--max_size', '64')
    err = capsys.readouterr().err
    assert len(results) == 2 and 'broken.jpg' in err and 'skipped 1 unreadable image(s)' in err
    assert not (tmp_path / 'out' / 'broken.jpg').exists()


def cli_error(capsys, *argv):
    status = demo.cli([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and err[-1].startswith('demo.py: error: ') and not any('Traceback' in line for line in err)
    return err[-1]


def test_bad_input_is_a_one_line_error(model, images, tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'notes.txt').write_text('not an image')
    assert 'no image files' in cli_error(capsys, '--model', model, empty, '--device', 'cpu')
    assert 'no such file or directory' in cli_error(capsys, '--model', model, tmp_path / 'nope', '--device', 'cpu')
    assert 'no such file' in cli_error(capsys, '--model', tmp_path / 'absent.pth', images, '--device', 'cpu')
    assert 'would replace the images' in cli_error(capsys, '--model', model, images, '--out', images,
                                                   '--device', 'cpu')
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'a.jpg').write_bytes(b'nothing')
    assert 'none of the 1 image(s) could be read' in cli_error(capsys, '--model', model, broken,
                                                               '--out', tmp_path / 'o', '--device', 'cpu')
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    assert 'a file is in the way' in cli_error(capsys, '--model', model, images, '--out', a_file,
                                               '--device', 'cpu')
    with pytest.raises(SystemExit):
        demo.parse_args([str(images), '--max_size', '-5'])
    assert f'argument --max_size: must be at least {MIN_INPUT_SIDE}, got -5' in capsys.readouterr().err


class _FixedScores(torch.nn.Module):
    """Test-phase output with one face per score in `scores` (a stand-in for the network)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, x):
        out = torch.zeros(x.shape[0], 2, len(self.scores), 5)
        for k, score in enumerate(self.scores):
            out[:, 1, k] = torch.tensor([score, 0.1 + 0.1 * k, 0.1, 0.2 + 0.1 * k, 0.3])
        return out


def test_a_thresh_below_the_per_pass_threshold_keeps_the_low_scoring_faces(monkeypatch, images, tmp_path):
    # demo.py lowers the detector's per-pass threshold (cfg.CONF_THRESH) to --thresh when that is lower.
    from data.config import cfg
    low = cfg.CONF_THRESH / 2
    monkeypatch.setattr(checkpoint, 'load_model', lambda *a, **k: _FixedScores([0.9, low]))  # demo.main's import
    image = images / 'im0.png'
    (_, _, faces, _), = run('--model', 'model.pth', image, '--out', tmp_path / 'a', '--thresh', low / 2, '--device', 'cpu')
    assert faces == 2
    (_, _, faces, _), = run('--model', 'model.pth', image, '--out', tmp_path / 'b', '--thresh', cfg.CONF_THRESH,
                            '--device', 'cpu')
    assert faces == 1


def test_nan_weights_and_a_full_disk_are_one_line_errors(model, images, tmp_path, capsys, monkeypatch):
    from small_disk import SimulatedFullDisk
    state = torch.load(model, weights_only=True)
    state['loc.0.bias'][0] = float('inf')
    torch.save(state, tmp_path / 'diverged.pth')
    assert cli_error(capsys, '--model', tmp_path / 'diverged.pth', images, '--out', tmp_path / 'o',
                     '--device', 'cpu') == (f'demo.py: error: {tmp_path / "diverged.pth"}: 1 of 65 weight tensors hold NaN or '
                                            f'inf (loc.0.bias): the model had diverged when it was saved; use an '
                                            f'earlier checkpoint')
    assert not (tmp_path / 'o').exists() or os.listdir(tmp_path / 'o') == []
    SimulatedFullDisk(monkeypatch, budget=0)
    err = cli_error(capsys, '--model', model, images, '--out', tmp_path / 'out', '--device', 'cpu')
    assert err.startswith(f'demo.py: error: {tmp_path / "out" / "im0.png"}: no space left on the device (0 bytes free in ')
    assert err.endswith('needed); nothing was written') and os.listdir(tmp_path / 'out') == []


def test_several_images_and_folders_as_a_shell_glob_gives_them(model, images, tmp_path, capsys):
    """`demo.py a.jpg b.jpg` and `demo.py photos/*.png` (the shell expands the glob into several
    arguments): every image once, in the order given."""
    more = tmp_path / 'more'
    more.mkdir()
    cv2.imwrite(str(more / 'im2.png'), np.full((70, 90, 3), 128, np.uint8))
    results = run('--model', model, images / 'im1.png', more, images / 'im0.png', images / 'im1.png',
                  '--out', tmp_path / 'out', '--device', 'cpu', '--max_size', '64')
    assert [os.path.basename(r[0]) for r in results] == ['im1.png', 'im2.png', 'im0.png']
    assert sorted(os.listdir(tmp_path / 'out')) == ['im0.png', 'im1.png', 'im2.png']
    capsys.readouterr()
    (more / 'im0.png').write_bytes((images / 'im0.png').read_bytes())   # another file of the same name
    err = cli_error(capsys, '--model', model, images, more, '--out', tmp_path / 'out2', '--device', 'cpu')
    assert err == (f'demo.py: error: {images / "im0.png"} and {more / "im0.png"}: both would be saved as im0.png in '
                   f'--out, one over the other: give them in separate runs with separate --out folders')
    assert not (tmp_path / 'out2').exists()


def test_with_annotations_false_detections_are_counted_and_drawn_apart(model, images, tmp_path, capsys,
                                                                       monkeypatch):
    """What the model takes for faces includes false ones: with the image's annotations, the
    line says how many detections are on an annotated face (one per face, best score first)
    and how many elsewhere, and draws them green and red."""
    from utils.inference.detector import Detector
    dets = np.array([[10, 10, 50, 50, 0.9],     # on the face
                     [12, 12, 48, 48, 0.7],     # on the same face again: a duplicate
                     [60, 40, 100, 80, 0.8],    # nothing there
                     [5, 60, 25, 80, 0.2]],     # below --thresh: neither drawn nor counted
                    np.float32)
    monkeypatch.setattr(Detector, 'detect', lambda self, rgb, mode='single': dets.copy())
    image = images / 'im0.png'   # 90x120
    listed = tmp_path / 'face_val.txt'
    listed.write_text(f'{image} 1 10 10 40 40 1\n')
    (result,) = run('--model', model, image, '--out', tmp_path / 'out', '--thresh', '0.5', '--device', 'cpu',
                    '--annotations', listed)
    assert (result.faces, result.annotated, result.matched) == (3, 1, 1)
    assert (f'{image}: 3 detection(s) at score >= 0.5, 1 on the 1 annotated face(s) (IoU >= 0.5, green) and 2 '
            f'elsewhere (red), ') in capsys.readouterr().out
    drawn = cv2.cvtColor(cv2.imread(result.out), cv2.COLOR_BGR2RGB)
    assert tuple(drawn[70, 60]) == (255, 0, 0) and tuple(drawn[30, 10]) == (0, 255, 0)   # left edges
    (other,) = run('--model', model, images / 'im1.png', '--out', tmp_path / 'out', '--thresh', '0.5',
                   '--device', 'cpu', '--annotations', listed)
    assert other.matched is None and other.faces == 3   # an image the list does not give
