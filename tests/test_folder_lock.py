"""utils/files/folder_lock.py and the save folder's claim (utils/training/save_folder.py) with real
processes: one run per save folder, a kill -9'd owner never blocks the next run, and the
temporary files of an interrupted save are removed by the next run only."""
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import utils.files.fileio as fileio
from conftest import REPO_ROOT
from utils.files.fileio import DiskFullError, OutputDirError
from utils.files.folder_lock import LOCK_NAME, FolderInUseError, FolderLock
from utils.training.save_folder import SaveFolder

# A stand-in for train.py's start: claim the folder, report, then do what `mode` says.
RUN = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from utils.files.fileio import atomic_path
    from utils.files.folder_lock import FolderInUseError
    from utils.training.save_folder import SaveFolder
    folder, mode = sys.argv[1], sys.argv[2]
    save_folder = SaveFolder(folder)
    try:
        removed, freed = save_folder.claim()
    except FolderInUseError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    print('claimed', removed, freed, flush=True)
    if mode == 'fork':  # a child that outlives its parent, as a DataLoader worker does for seconds
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print('child', child, flush=True)
    if mode == 'save':  # killed in the middle of writing a checkpoint
        with atomic_path(os.path.join(folder, 'sfd_face_checkpoint.pth')) as tmp:
            with open(tmp, 'wb') as handle:
                handle.write(b'x' * (4 << 20))
                handle.flush()
            print('writing', flush=True)
            time.sleep(60)
    if mode != 'exit':
        time.sleep(60)
    save_folder.release()  # as train.py does at its end (a killed run cannot)
''').format(repo=REPO_ROOT)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'run.py'
    path.write_text(RUN)
    return str(path)


def start(script, folder, mode):
    """A run that has claimed `folder` (or failed to); returns (process, its first line)."""
    proc = subprocess.Popen([sys.executable, script, str(folder), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def finish(script, folder, mode='exit'):
    done = subprocess.run([sys.executable, script, str(folder), mode], capture_output=True, text=True,
                          timeout=60)
    return done.returncode, done.stdout.strip(), done.stderr.strip()


def kill9(proc):
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill9(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_a_second_run_on_the_folder_is_refused_naming_the_first(script, tmp_path, procs):
    folder = tmp_path / 'weights'
    folder.mkdir()
    first, line = start(script, folder, 'hold')
    procs.append(first)
    assert line == 'claimed 0 0'
    rc, out, err = finish(script, folder)
    assert rc == 1 and out == '' and '\n' not in err and 'Traceback' not in err
    assert err.startswith(f'--save_folder {folder}: in use by another run (pid {first.pid} on host '
                          f'{socket.gethostname()}, started ')
    assert f'{os.path.basename(script)} {folder} hold' in err and 'overwrite' in err
    first.terminate()
    first.wait(timeout=30)
    assert finish(script, folder)[:2] == (0, 'claimed 0 0')  # the first has ended: free again
    assert os.listdir(folder) == []  # a run that ends releases the lock and removes its file


def test_a_kill_9_owner_does_not_block_the_next_run(script, tmp_path, procs):
    first, line = start(script, tmp_path, 'hold')
    procs.append(first)
    assert line == 'claimed 0 0'
    kill9(first)
    assert os.path.exists(tmp_path / LOCK_NAME)  # left behind, and harmless
    assert finish(script, tmp_path)[:2] == (0, 'claimed 0 0')


def test_a_forked_child_that_outlives_its_killed_parent_does_not_hold_the_folder(script, tmp_path, procs):
    """A flock belongs to the open file, which fork shares: without care, a DataLoader worker
    still alive after kill -9 of its parent would keep the folder locked."""
    first, line = start(script, tmp_path, 'fork')
    procs.append(first)
    assert line == 'claimed 0 0'
    child = int(first.stdout.readline().split()[1])
    try:
        kill9(first)
        os.kill(child, 0)  # still alive
        assert finish(script, tmp_path)[:2] == (0, 'claimed 0 0')
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_kill_9_during_a_save_leaves_a_temporary_that_only_the_next_owner_removes(script, tmp_path, procs):
    folder = tmp_path / 'weights'
    folder.mkdir()
    (folder / 'sfd_face_checkpoint.pth').write_bytes(b'previous')
    others = ['.vgg16_reducedfc.pth.abcd1234.tmp', '.sfd_hand.pth.abcd1234.tmp', 'vgg16_reducedfc.pth']
    for name in others:  # another tool's or another dataset's files: not this run's business
        (folder / name).write_bytes(b'other')
    writer, line = start(script, folder, 'save')
    procs.append(writer)
    assert line == 'claimed 0 0' and writer.stdout.readline().strip() == 'writing'
    temporary = [n for n in os.listdir(folder) if n.startswith('.sfd_face_checkpoint.pth.')]
    assert len(temporary) == 1 and os.path.getsize(folder / temporary[0]) == 4 << 20
    # While its writer lives, a second run is refused and touches nothing.
    rc, _, err = finish(script, folder)
    assert rc == 1 and f'pid {writer.pid}' in err and (folder / temporary[0]).exists()
    kill9(writer)
    assert (folder / temporary[0]).exists()  # what the issue saw: nothing removes it ...
    assert finish(script, folder) == (0, f'claimed 1 {4 << 20}', '')  # ... but the next run does
    assert sorted(os.listdir(folder)) == sorted(others + ['sfd_face_checkpoint.pth'])
    assert (folder / 'sfd_face_checkpoint.pth').read_bytes() == b'previous'


def test_lock_in_one_process_release_and_context_manager(tmp_path):
    with FolderLock(str(tmp_path)) as lock:
        assert lock.enforced and lock.held
        assert '"pid": %d' % os.getpid() in (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(FolderInUseError, match=rf'pid {os.getpid()} on host .* \(this process: a lock taken '
                                                   r'earlier and not released\).*: resume later$'):
            FolderLock(str(tmp_path), advice='resume later').acquire()
        assert lock.acquire() is lock  # taking it again is a no-op
    assert not lock.held and os.listdir(tmp_path) == []
    lock.release()  # twice: harmless
    FolderLock(str(tmp_path)).acquire().release()


def test_a_folder_that_cannot_hold_the_lock_file_is_one_line(tmp_path):
    (tmp_path / 'file').write_text('')
    with pytest.raises(OutputDirError, match=f'^--save_folder {tmp_path / "file"}: cannot create the lock file'):
        FolderLock(str(tmp_path / 'file')).acquire()


def test_a_file_system_without_locks_warns_and_keeps_the_temporaries(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, 'No locks available')

    monkeypatch.setattr(fcntl, 'flock', no_locks)
    stale = tmp_path / '.sfd_face_checkpoint.pth.abcd1234.tmp'
    stale.write_bytes(b'x')
    folder = SaveFolder(str(tmp_path))
    removed, freed = folder.claim()
    lock = folder.lock
    try:
        assert not lock.enforced and (removed, freed) == (0, 0) and stale.exists()
        assert lock.warning.startswith(f'warning: --save_folder {tmp_path}: its file system refuses file locks '
                                       '(No locks available)')
    finally:
        lock.release()


def test_only_this_datasets_training_outputs_count_as_its_temporaries():
    pattern = SaveFolder('weights', 'face').output_pattern()
    assert all(pattern.fullmatch(n) for n in ('sfd_face.pth', 'sfd_face_checkpoint.pth', 'sfd_face_5000.pth'))
    assert not any(pattern.fullmatch(n) for n in ('vgg16_reducedfc.pth', 'sfd_face.pth.bak', 'sfd_hand.pth'))


def test_space_for_the_next_epoch_is_checked_before_it(tmp_path, monkeypatch):
    checkpoint = tmp_path / 'sfd_face_checkpoint.pth'
    checkpoint.write_bytes(b'\0' * 3000)
    monkeypatch.setattr(fileio, 'free_bytes', lambda folder: 4000)
    folder = SaveFolder(str(tmp_path))
    assert folder.check_space(1000, 10, 20, epoch=1, with_best=False) == 3000
    with pytest.raises(DiskFullError) as info:  # iteration 5000 of the next epoch saves sfd_face_5000.pth
        folder.check_space(1500, 4990, 5800, epoch=6, with_best=False)
    assert str(info.value) == (
        f'--save_folder {tmp_path}: 3.9 KiB free, about 4.4 KiB needed for the checkpoint (2.9 KiB) and a '
        f'weights file (1.5 KiB) saved by epoch 6; stopped before epoch 6 rather than after it: free some '
        f'space or give another --save_folder, then resume with --resume {checkpoint}')
    best = tmp_path / 'sfd_face.pth'
    best.write_bytes(b'\0' * 1000)  # replaced before the checkpoint is: covered by the checkpoint's room
    assert folder.check_space(1000, 10, 20, 1, with_best=True) == 3000
    best.unlink()  # the first validation writes a new file
    with pytest.raises(DiskFullError, match=r'4\.9 KiB needed for the checkpoint \(2\.9 KiB\) and a weights file '):
        folder.check_space(2000, 10, 20, 1, with_best=True)
    checkpoint.unlink()  # before the first save: weights and momentum
    with pytest.raises(DiskFullError, match=r'about 11\.7 KiB needed for the checkpoint \(5\.9 KiB\) and 2 weights '
                                            r'files of 2\.9 KiB each saved by epoch 0; .*, then start again$'):
        folder.check_space(3000, 0, 5001, epoch=0, with_best=True)


def test_numbered_saves_follow_the_rule_of_each_step(monkeypatch):
    # train.py saves after iteration i when i != 0 and i % cfg.SAVE_INTERVAL == 0.
    from data.config import cfg

    for first, last, k in [(0, 10, 5), (0, 5, 5), (5, 6, 5), (6, 10, 5), (0, 0, 5), (4990, 5800, 5000),
                           (1, 20001, 5000)]:
        monkeypatch.setattr(cfg, 'SAVE_INTERVAL', k)
        assert SaveFolder.numbered_saves(first, last) == sum(SaveFolder.weights_due(i) for i in range(first, last))
