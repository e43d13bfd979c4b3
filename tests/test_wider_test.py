"""wider_test.py on a tiny synthetic WIDER FACE: prediction files, modes, evaluation, bad input."""
import contextlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import s3fd_reference
import wider_test
from conftest import REPO_ROOT
from data.config import cfg
from data.synthetic import generate
from data.widerface import read_wider_annotations
from layers.modules.multibox_loss import MultiBoxLoss
from s3fd import build_s3fd, init_weights_from_scratch
from utils.files.weights import CheckpointError, load_model
from utils.files.image_io import load_rgb
from utils.inference.detector import images_to_input, resize_rgb, single_scale, to_wider_rows
from utils.evaluation.widerface_eval import read_prediction_file, read_predictions, load_ground_truth

MAX_SIZE = 128


@pytest.fixture(scope='module')
def wider(tmp_path_factory):
    root = tmp_path_factory.mktemp('wider_test')
    generate(str(root / 'WIDER'), 0, 6, seed=0)
    return str(root / 'WIDER')


@pytest.fixture(scope='module')
def random_model(tmp_path_factory):
    torch.manual_seed(0)
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    path = str(tmp_path_factory.mktemp('model') / 'random.pth')
    torch.save(net.state_dict(), path)
    return path


def gt_dir(wider):
    return os.path.join(wider, 'eval_tools', 'ground_truth')


def run(model, wider, out, *extra):
    args = ['--model', model, '--dataset_dir', wider, '--out', str(out), '--device', 'cpu',
            '--max_size', str(MAX_SIZE), '--workers', '0', *extra]
    return wider_test.main(wider_test.parse_args(args))


def annotations(wider):
    return read_wider_annotations(os.path.join(wider, 'wider_face_split', 'wider_face_val_bbx_gt.txt'))


def test_writes_one_official_file_per_image(wider, random_model, tmp_path, capsys):
    assert run(random_model, wider, tmp_path / 'pred') is None
    printed = capsys.readouterr().out
    assert f'python wider_eval.py -p {tmp_path / "pred"} -g {gt_dir(wider)}' in printed
    for record in annotations(wider):
        event, file_name = record.name.split('/')
        path = tmp_path / 'pred' / event / (file_name[:-4] + '.txt')
        lines = path.read_text().splitlines()
        assert lines[0] == file_name and int(lines[1]) == len(lines) - 2 > 0
        rows = read_prediction_file(str(path), expected_name=file_name[:-4])
        h, w = load_rgb(os.path.join(wider, 'WIDER_val', 'images', record.name)).shape[:2]
        assert (rows[:, :2] >= 0).all() and (rows[:, 2:4] > 0).all()
        assert (rows[:, 0] + rows[:, 2] <= w + 0.051).all() and (rows[:, 1] + rows[:, 3] <= h + 0.051).all()
        assert (np.diff(rows[:, 4]) <= 0).all() and (rows[:, 4] >= cfg.CONF_THRESH).all()
        assert len(rows) <= cfg.TOP_K
    _, stats = read_predictions(str(tmp_path / 'pred'), load_ground_truth(gt_dir(wider)))
    assert stats['matched'] == 6 and stats['missing'] == 0


def test_batching_same_size_images_gives_the_same_files(wider, random_model, tmp_path):
    run(random_model, wider, tmp_path / 'one', '--batch_size', '1')
    run(random_model, wider, tmp_path / 'four', '--batch_size', '4', '--workers', '1')   # decoding process
    images = [load_rgb(os.path.join(wider, 'WIDER_val', 'images', r.name)) for r in annotations(wider)]
    sizes = {resize_rgb(im, single_scale(*im.shape[:2], max_size=MAX_SIZE)).shape for im in images}
    assert len(sizes) < 6   # some images share an input size, so batches of several ran
    for record in annotations(wider):
        rel = record.name[:-4] + '.txt'
        one = read_prediction_file(str(tmp_path / 'one' / rel))
        four = read_prediction_file(str(tmp_path / 'four' / rel))
        assert one.shape == four.shape
        np.testing.assert_allclose(one, four, atol=0.11)


def test_single_mode_files_hold_the_reference_pass(wider, random_model, tmp_path):
    """wider_test.py --mode single (images resized in the loader, batched by input size) writes
    the boxes of the reference port's normal pass at the single-scale scale: its resize
    (cv2.resize with fx = fy = s) and its mapping back (resized size over s), as rewritten
    independently in tests/s3fd_reference.py; to the file's 0.1 px and 5-digit scores."""
    run(random_model, wider, tmp_path / 'pred', '--batch_size', '4')
    net = load_model(random_model, 'test', 'cpu')
    odd = 0
    for record in annotations(wider):
        rgb = load_rgb(os.path.join(wider, 'WIDER_val', 'images', record.name))
        h, w = rgb.shape[:2]
        scale = single_scale(h, w, max_size=MAX_SIZE)
        odd += (h * scale) % 1 != 0 or (w * scale) % 1 != 0     # a grid the explicit size would miss
        expected = to_wider_rows(s3fd_reference.detect_pass(net, rgb, scale, cfg.CONF_THRESH), h, w)
        written = read_prediction_file(str(tmp_path / 'pred' / (record.name[:-4] + '.txt')))
        assert written.shape == expected.shape and len(written) > 0
        assert_same_rows(written, expected)
    assert odd > 0


def assert_same_rows(written, expected):
    """The same boxes and scores, to the file's 0.1 px and 5 digits (plus float32 noise): row
    by row, except that boxes whose scores differ by less than that noise may swap places (a
    batch of 4 and one image at a time add in other orders, and on some CPUs near-equal
    scores come out in the other order)."""
    from scipy.optimize import linear_sum_assignment

    close = ((np.abs(written[:, None, :4] - expected[None, :, :4]) <= 0.051 + 0.01).all(-1)
             & (np.abs(written[:, None, 4] - expected[None, :, 4]) <= 5e-6 + 1e-5))
    rows, cols = linear_sum_assignment(~close)
    assert close[rows, cols].all(), f'{int((~close[rows, cols]).sum())} written rows match no expected row'
    swapped = rows != cols
    assert np.abs(expected[rows[swapped], 4] - expected[cols[swapped], 4]).max(initial=0) <= 2e-5


def test_eval_returns_the_aps_and_prints_the_table(wider, random_model, tmp_path, capsys):
    aps = run(random_model, wider, tmp_path / 'pred', '--eval', gt_dir(wider))
    assert set(aps) == {'easy', 'medium', 'hard'} and all(0 <= v <= 1 for v in aps.values())
    out = capsys.readouterr().out
    assert '==================== Results ====================' in out
    assert f'Hard   Val AP: {aps["hard"]:.4f}' in out


def test_multiscale_mode_on_a_subset(wider, random_model, tmp_path, capsys):
    aps = run(random_model, wider, tmp_path / 'ms', '--mode', 'multiscale', '--num_images', '2',
              '--max_size', '96', '--eval', gt_dir(wider))
    assert 'scoring the 2 images run' in capsys.readouterr().out
    files = sorted(p for p in (tmp_path / 'ms').rglob('*.txt'))
    assert len(files) == 2
    for path in files:
        rows = read_prediction_file(str(path))
        assert len(rows) <= 750 and (np.diff(rows[:, 4]) <= 0).all()
    assert set(aps) == {'easy', 'medium', 'hard'}


def train_briefly(wider, steps=50, max_size=160, seed=0):
    """From-scratch S3FD trained for a few Adam steps on the (val) images at test geometry."""
    torch.manual_seed(seed)
    samples = []
    for record in annotations(wider):
        rgb = load_rgb(os.path.join(wider, 'WIDER_val', 'images', record.name))
        h, w = rgb.shape[:2]
        b = record.boxes.astype(np.float32)
        target = np.column_stack([b[:, 0] / w, b[:, 1] / h, (b[:, 0] + b[:, 2]) / w, (b[:, 1] + b[:, 3]) / h,
                                  np.ones(len(b))])
        samples.append((images_to_input(resize_rgb(rgb, single_scale(h, w, max_size=max_size))),
                        torch.from_numpy(target).float()))
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    random_state = {k: v.clone() for k, v in net.state_dict().items()}
    criterion = MultiBoxLoss(cfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    # One thread: on a 2-core machine shared with other jobs, two OpenMP threads waiting for
    # each other made these steps 3-4x slower than one; one thread keeps the time steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            x, target = samples[step % len(samples)]
            loss_l, loss_c = criterion(net(x), [target])
            optimizer.zero_grad()
            (loss_l + loss_c).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return random_state, net.state_dict()


def test_briefly_trained_model_scores_above_random_weights(wider, tmp_path):
    random_state, trained_state = train_briefly(wider, steps=30, max_size=128)
    torch.save(random_state, tmp_path / 'random.pth')
    # A training checkpoint layout with a DDP prefix: load_model must unwrap it.
    torch.save({'weight': {'module.' + k: v for k, v in trained_state.items()}, 'iteration': 50},
               tmp_path / 'trained.pth')
    common = ['--max_size', '128', '--eval', gt_dir(wider)]
    random_aps = run(str(tmp_path / 'random.pth'), wider, tmp_path / 'p_random', *common)
    trained_aps = run(str(tmp_path / 'trained.pth'), wider, tmp_path / 'p_trained', *common)
    for setting in ('easy', 'medium', 'hard'):
        assert trained_aps[setting] > random_aps[setting]
    # Random weights find about one face in a thousand (seen: AP 0.001 or less); 30 steps on
    # these images several in a hundred at least (seen: 0.16 / 0.07 / 0.03).
    assert min(trained_aps.values()) > 0.01 > max(random_aps.values())


# ----------------------------------------------------------------------------- bad input

def test_unreadable_image_is_skipped_reported_and_counted_as_missed(wider, random_model, tmp_path, capsys):
    copy = tmp_path / 'WIDER'
    shutil.copytree(wider, copy)
    run(random_model, str(copy), tmp_path / 'pred')   # an earlier run: a prediction for every image
    broken = annotations(wider)[1].name
    (copy / 'WIDER_val' / 'images' / broken).write_bytes(b'not a jpeg')
    stale = tmp_path / 'pred' / (broken[:-4] + '.txt')
    assert stale.exists()
    capsys.readouterr()
    aps = run(random_model, str(copy), tmp_path / 'pred', '--eval', gt_dir(str(copy)))
    err = capsys.readouterr().err
    assert 'skipped 1 unreadable image(s)' in err and broken.split('/')[1] in err
    assert not stale.exists()   # an old prediction must not score for the unreadable image
    assert len(list((tmp_path / 'pred').rglob('*.txt'))) == 5
    assert set(aps) == {'easy', 'medium', 'hard'}


def test_a_prediction_folder_never_mixes_two_runs(wider, random_model, tmp_path, capsys):
    out = tmp_path / 'pred'
    run(random_model, wider, out)
    names = [r.name for r in annotations(wider)]
    unrelated = out / 'notes.txt'
    unrelated.write_text('mine')
    capsys.readouterr()
    with pytest.raises(CheckpointError):   # a mistyped --model leaves the old predictions alone
        run(str(tmp_path / 'typo.pth'), wider, out, '--num_images', '2')
    assert len(list(out.rglob('*.txt'))) == len(names) + 1
    run(random_model, wider, out, '--num_images', '2')
    assert (f'removed the {len(names)} prediction files of the earlier run in {out} (model {random_model} on '
            f'{wider}, split val, mode single, started ') in capsys.readouterr().out
    left = sorted(str(p.relative_to(out)) for p in out.rglob('*.txt') if p != unrelated)
    assert left == sorted(name[:-4] + '.txt' for name in names[:2])
    assert unrelated.read_text() == 'mine'   # not a prediction file: left alone


def test_a_folder_of_another_dataset_is_cleared_whole_before_the_run(wider, random_model, tmp_path, capsys):
    """The issue's case: a folder holding another dataset's predictions (9 images, one of the
    same name as this dataset's) must hold this run's 6 only, and score as a fresh folder."""
    other = tmp_path / 'other'
    generate(str(other), 0, 9, seed=1)
    out = tmp_path / 'pred'
    run(random_model, str(other), out)
    capsys.readouterr()
    aps = run(random_model, wider, out, '--eval', gt_dir(wider))
    captured = capsys.readouterr()
    assert f'removed the 9 prediction files of the earlier run in {out} (model {random_model} on {other}' \
        in captured.out
    assert 'warning' not in captured.err
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*.txt')) == \
        sorted(r.name[:-4] + '.txt' for r in annotations(wider))
    assert aps == run(random_model, wider, tmp_path / 'fresh', '--eval', gt_dir(wider))


def test_prediction_files_no_run_recorded_are_not_deleted_but_refuse_the_run(wider, random_model, tmp_path,
                                                                               capsys):
    """Files of another tool (or of an older wider_test.py) would be scored with this run's; the
    run is refused rather than delete what this script did not write."""
    event, file_name = annotations(wider)[0].name.split('/')
    foreign = tmp_path / 'pred' / 'other_event' / 'someone_else.txt'
    foreign.parent.mkdir(parents=True)
    foreign.write_text('someone_else.jpg\n1\n1 1 10 10 0.9\n')
    err = cli_error(capsys, '--model', random_model, '--dataset_dir', wider, '--device', 'cpu',
                    '--out', str(tmp_path / 'pred'))
    assert err == (f'wider_test.py: error: --out {tmp_path / "pred"}: holds 1 prediction file(s) that no '
                   f'wider_test.py run recorded there (e.g. {foreign}; another tool\'s, or an older '
                   f'wider_test.py\'s): they would be scored with this run\'s, and are not this script\'s to '
                   f'delete: move them away or give another --out')
    assert foreign.read_text().startswith('someone_else.jpg') and not (tmp_path / 'pred' / event).exists()


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_lives(wider, random_model, tmp_path, capsys):
    """Two runs started together on one --out: the second is refused, naming the first, and
    leaves the folder to it (before, both wrote into it and both scored a mixture)."""
    out = tmp_path / 'pred'
    out.mkdir()
    # The first run, holding the folder as wider_test.py does (its lock), in another process.
    holder = subprocess.Popen([sys.executable, '-c', f'import sys, time; sys.path.insert(0, {REPO_ROOT!r}); '
                               f'import wider_test; lock = wider_test.claim_out_dir({str(out)!r})[0]; '
                               f'print("held", flush=True); time.sleep(60)'],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        err = cli_error(capsys, '--model', random_model, '--dataset_dir', wider, '--device', 'cpu',
                        '--out', str(out), '--max_size', str(MAX_SIZE), '--workers', '0')
    finally:
        holder.kill()
        holder.wait()
    assert err.startswith(f'wider_test.py: error: --out {out}: in use by another wider_test.py run '
                          f'(pid {holder.pid} on host ')
    assert err.endswith('two runs in one folder would mix their predictions: wait for it to end, or give '
                        'another --out')
    assert not list(out.rglob('*.txt'))   # the refused run wrote nothing
    wider_test.claim_out_dir(str(out))[0].release()   # the holder gone (killed), the folder is free again


def test_each_model_dataset_and_test_gets_its_own_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = wider_test.parse_args([]).out
    assert re.fullmatch(r'eval_output/sfd_face-WIDER-val_single-[0-9a-f]{6}', default.replace(os.sep, '/'))
    outs = {default,
            wider_test.parse_args(['--num_images', '50', '--mode', 'multiscale']).out,   # a quick subset
            wider_test.parse_args(['--model', 'data/demo/weights/sfd_face.pth']).out,    # another sfd_face.pth
            wider_test.parse_args(['--dataset_dir', 'data/demo/WIDER']).out,             # another WIDER
            wider_test.parse_args(['--split', 'test']).out}
    assert len(outs) == 5
    assert '_first50' in wider_test.parse_args(['--num_images', '50']).out
    assert wider_test.parse_args(['--model', './weights/../weights/sfd_face.pth']).out == default


@pytest.mark.parametrize('option, value', [('--workers', '-1'), ('--batch_size', '0'), ('--max_size', '0'),
                                           ('--num_images', '0')])
def test_out_of_range_numbers_are_usage_errors(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        wider_test.parse_args([option, value])
    assert exc.value.code == 2 and f'argument {option}: must be at least' in capsys.readouterr().err


def test_image_list_falls_back_to_the_mat_file(wider, random_model, tmp_path):
    copy = tmp_path / 'WIDER'
    shutil.copytree(wider, copy)
    os.remove(copy / 'wider_face_split' / 'wider_face_val_bbx_gt.txt')
    items, source = wider_test.image_list(str(copy), 'val')
    assert source.endswith(os.path.join('ground_truth', 'wider_face_val.mat'))
    assert sorted(f'{e}/{n}.jpg' for e, n, _ in items) == sorted(r.name for r in annotations(wider))
    assert all(os.path.isfile(p) for _, _, p in items)


def cli_error(capsys, *argv):
    status = wider_test.cli(list(argv))
    err = capsys.readouterr().err.strip()
    assert status == 1 and err.startswith('wider_test.py: error: ') and '\n' not in err and 'Traceback' not in err
    return err


def test_missing_split_and_missing_dataset_are_one_line_errors(wider, random_model, tmp_path, capsys):
    err = cli_error(capsys, '--model', random_model, '--dataset_dir', wider, '--split', 'train', '--device', 'cpu')
    assert "no image list for split 'train'" in err and 'wider_face_train_bbx_gt.txt' in err
    err = cli_error(capsys, '--model', random_model, '--dataset_dir', str(tmp_path / 'nowhere'), '--device', 'cpu')
    assert 'does not exist' in err
    copy = tmp_path / 'WIDER'
    shutil.copytree(wider, copy)
    shutil.rmtree(copy / 'WIDER_val')
    err = cli_error(capsys, '--model', random_model, '--dataset_dir', str(copy), '--device', 'cpu')
    assert os.path.join('WIDER_val', 'images') in err


def test_bad_model_files_are_one_line_errors(wider, tmp_path, capsys):
    err = cli_error(capsys, '--model', str(tmp_path / 'absent.pth'), '--dataset_dir', wider, '--device', 'cpu')
    assert 'absent.pth' in err and 'no such file' in err
    torch.save({'conv.weight': torch.zeros(3)}, tmp_path / 'other.pth')
    err = cli_error(capsys, '--model', str(tmp_path / 'other.pth'), '--dataset_dir', wider, '--device', 'cpu')
    assert 'other.pth' in err and 'missing keys' in err
    err = cli_error(capsys, '--model', str(tmp_path / 'absent.pth'), '--dataset_dir', wider, '--device', 'cpu',
                    '--eval', str(tmp_path))
    assert 'lacks wider_face_val.mat' in err   # a bad GT directory fails before the run


def test_command_line_failure_has_no_traceback(wider, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'wider_test.py'), '--model',
                           str(tmp_path / 'absent.pth'), '--dataset_dir', wider, '--device', 'cpu'],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith('wider_test.py: error: ') and 'Traceback' not in proc.stderr


@pytest.mark.parametrize('disk', ['tmpfs', 'simulated'])
def test_a_full_disk_is_one_line_naming_the_file_and_the_space(wider, random_model, tmp_path, monkeypatch,
                                                               capsys, disk):
    from small_disk import SimulatedFullDisk, fill, require_tmpfs, tmpfs
    with tmpfs(tmp_path / 'disk', '1m') if disk == 'tmpfs' else contextlib.nullcontext(str(tmp_path)) as root:
        out = os.path.join(require_tmpfs(root), 'pred')
        # Room for the folder's lock and the run's record (a few hundred bytes each), not for a prediction.
        if disk == 'tmpfs':
            os.makedirs(out)
            fill(root, leave=8192)   # a page for the lock file, one for the record
        else:
            SimulatedFullDisk(monkeypatch, budget=4096)
        status = wider_test.cli(['--model', random_model, '--dataset_dir', wider, '--out', out, '--device', 'cpu',
                                 '--max_size', str(MAX_SIZE), '--workers', '0'])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        # Not "OSError: [Errno 28]" and a traceback: the file, the space, how far it got.
        assert status == 1 and 'Traceback' not in err and last.startswith(f'wider_test.py: error: {out}{os.sep}')
        assert re.search(r'\.txt: no space left on the device \(.* free in .*, about [\d.]+ KiB needed\); '
                         r'nothing was written; stopped after 0 of 6 prediction files: free some space \(or give '
                         r'another --out\) and run again$', last), last


def test_nan_weights_are_refused_before_any_prediction(wider, random_model, tmp_path, capsys):
    event, file_name = annotations(wider)[0].name.split('/')
    run(random_model, wider, tmp_path / 'pred', '--num_images', '1')
    earlier = tmp_path / 'pred' / event / (file_name[:-4] + '.txt')  # an earlier run's prediction
    kept = earlier.read_text()
    capsys.readouterr()
    state = torch.load(random_model, weights_only=True)
    state['conf.5.weight'][0, 0, 0, 0] = float('nan')
    torch.save(state, tmp_path / 'diverged.pth')
    err = cli_error(capsys, '--model', str(tmp_path / 'diverged.pth'), '--dataset_dir', wider, '--device', 'cpu',
                    '--out', str(tmp_path / 'pred'))
    assert err == (f'wider_test.py: error: {tmp_path / "diverged.pth"}: 1 of 65 weight tensors hold NaN or inf '
                   f'(conf.5.weight): '
                   f'the model had diverged when it was saved; use an earlier checkpoint')
    assert earlier.read_text() == kept  # kept: the run did not start


# ----------------------------------------------------------------------------- test size

def train_py_save_folder(folder, model, input_size):
    """A save folder as train.py leaves it: the best weights sfd_face.pth (weights only) and
    sfd_face_checkpoint.pth, whose 'args' are train.py's options (utils.training.checkpoint.save_checkpoint
    keeps the plain values of vars(args))."""
    import train
    folder.mkdir()
    shutil.copyfile(model, folder / 'sfd_face.pth')
    options = {k: v for k, v in vars(train.parse_args(['--input_size', str(input_size)])).items()
               if isinstance(v, (int, float, str, bool, type(None)))}
    torch.save({'weight': torch.load(model, weights_only=True), 'args': options}, folder / 'sfd_face_checkpoint.pth')
    return folder / 'sfd_face.pth'


def test_a_model_trained_small_and_tested_at_full_size_gets_the_max_size_that_matches(random_model, tmp_path):
    """The issue's case: trained at --input_size 160, tested at the official size (a longer
    side of 1024 px on WIDER): faces 4x larger than any it saw. sfd_face.pth holds weights
    only; the options of its run are in the checkpoint beside it."""
    best = train_py_save_folder(tmp_path / 'weights', random_model, 160)
    trained = wider_test.training_input_size(str(best))
    assert trained == (160, str(tmp_path / 'weights' / 'sfd_face_checkpoint.pth'))
    assert wider_test.size_mismatch_warning(trained, 1024, None, 'weights/sfd_face.pth') == (
        f'warning: weights/sfd_face.pth was trained at --input_size 160 (training options in {trained[1]}); this '
        f'test runs the images at a longer side of about 1024 px, 4x the 256 px that matches that training '
        f'(training at 640 matches the official 1024 px), and finds few faces of sizes it never saw: add '
        f'--max_size 256')
    assert wider_test.size_mismatch_warning(trained, 1024, 240, 'm') is None   # the demo's own test size
    assert wider_test.size_mismatch_warning((640, 'c'), 1024, None, 'm') is None   # the defaults
    assert wider_test.size_mismatch_warning((320, 'c'), 1500, 256, 'm').endswith('raise --max_size to 750')
    assert wider_test.training_input_size(random_model) is None   # weights alone say nothing


def test_the_size_warning_comes_before_the_run(wider, random_model, tmp_path, capsys):
    best = train_py_save_folder(tmp_path / 'weights', random_model, 640)
    run(str(best), wider, tmp_path / 'pred', '--num_images', '1')   # at MAX_SIZE: far below 640's size
    items, _ = wider_test.image_list(wider, 'val')
    official = wider_test.official_test_side(items[:1])   # the images run
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning')]
    assert warning == [f'warning: {best} was trained at --input_size 640 (training options in '
                       f'{best.parent / "sfd_face_checkpoint.pth"}); this test runs the images at a longer side '
                       f'of about {MAX_SIZE} px, {MAX_SIZE / official:.2g}x the {round(official)} px that matches '
                       f'that training (training at 640 matches the official {round(official)} px), and finds few '
                       f'faces of sizes it never saw: drop --max_size']
