"""What a training run needs to share a machine, a disk and a scheduler with others.

* `SaveFolderLock`: one run per save folder. An exclusive `flock` on `<folder>/.sfd_run.lock`,
  which the kernel releases when its holder dies, however it dies (kill -9 included): a crashed
  run never blocks the next one. The file holds the owner's pid, host, start time and command
  for the refusal message of a second run. Only the process that saves takes it (under torchrun,
  global rank 0).
* `claim_save_folder`: the lock, then the removal of the temporary files that interrupted saves
  of this folder's training outputs left behind (no live process can be writing them any more).
* `check_space_for_epoch`: before an epoch, whether the folder has room for the saves the epoch
  ends with, so that a full disk stops the run before the epoch's work rather than after it.
* `EXIT_STOPPED` and `stopped_message`: the exit status and the last line of a run stopped by a
  signal, with its checkpoint saved and resumable.

File systems: flock is enforced on local file systems. On NFS, Linux (since 2.6.12) emulates
flock with a POSIX lock that the server arbitrates, so it holds across clients, unless the
share is mounted with `nolock` or `local_lock=flock|all` (then only processes of one client
see each other's locks). Some network and FUSE file systems refuse locks (ENOLCK, ENOSYS,
EOPNOTSUPP; Lustre without `-o flock`): there the run goes on with a warning that the folder
is not protected (`SaveFolderLock.warning`).
"""
import datetime
import errno
import fcntl
import json
import os
import re
import shlex
import socket
import sys

from utils.fileio import (OutputDirError, check_free_space, format_bytes, remove_stale_temporaries)

LOCK_NAME = '.sfd_run.lock'

# sysexits.h EX_TEMPFAIL: "temporary failure; the user is invited to retry". The exit status of
# a run stopped by SIGTERM/SIGINT after saving a resumable checkpoint (see stopped_message).
EXIT_STOPPED = getattr(os, 'EX_TEMPFAIL', 75)


class FolderInUseError(OutputDirError):
    """Another live process holds the save folder's lock; the message names the folder and it."""


def stopped_message(iteration, checkpoint_path, signal_name=None):
    """The last line of a run stopped before its end, its checkpoint saved:
    'Stopped at iteration 4 (SIGTERM); resume with --resume weights/sfd_face_checkpoint.pth'."""
    why = f' ({signal_name})' if signal_name else ''
    return f'Stopped at iteration {iteration}{why}; resume with --resume {shlex.quote(str(checkpoint_path))}'


def training_output_pattern(dataset='face'):
    """The names of the files train.py writes into its save folder: sfd_<dataset>.pth (best),
    sfd_<dataset>_checkpoint.pth and sfd_<dataset>_<iteration>.pth. Other files of the folder
    (the basenet, another dataset's run) are not its business."""
    return re.compile(rf'sfd_{re.escape(dataset)}(_checkpoint|_\d+)?\.pth')


# -- the lock -----------------------------------------------------------------------------------

_held = set()  # the locks this process holds (strong references: a held lock is never collected)


def _close_in_child():
    """After a fork (DataLoader workers, multiprocessing), the child closes its copy of every held
    lock's descriptor: a flock belongs to the open file, shared with the child, and a worker that
    outlives a killed parent for a few seconds must not keep the folder locked."""
    for lock in list(_held):
        lock._forget()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_close_in_child)


def _owner_details():
    return {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'command': shlex.join([os.path.basename(sys.executable)] + sys.argv)[:500]}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's process
        return True
    return True


def describe_owner(details):
    """'pid 1234 on host gpu7, started 2025-01-02T03:04:05+00:00: python train.py ...'."""
    if not isinstance(details, dict) or not details.get('pid'):
        return 'a process that has not written its details yet'
    text = f'pid {details["pid"]} on host {details.get("host", "?")}'
    if details.get('host') == socket.gethostname() and isinstance(details['pid'], int):
        if details['pid'] == os.getpid():
            text += ' (this process: a lock taken earlier and not released)'
        elif not _alive(details['pid']):
            text += ' (ended; a process it started still holds the lock)'
    if details.get('started'):
        text += f', started {details["started"]}'
    if details.get('command'):
        text += f': {details["command"]}'
    return text


class SaveFolderLock:
    """Exclusive use of a save folder by one process, for as long as it holds the lock.

        with SaveFolderLock('weights', '--save_folder'):
            ...   # train and save

    `acquire()` raises FolderInUseError (one line: the folder, the owner's pid, host, start time
    and command, and `advice`) when a live process holds it, OutputDirError when the lock file
    cannot be created. Where the file system refuses locks, it returns with `enforced` False and
    `warning` set (a line to print). `release()` (or leaving the `with` block) removes the lock
    file and lets it go; a process that dies lets it go too, its file then stays until the next
    run takes it.
    """

    def __init__(self, folder, option='--save_folder', advice=None):
        self.folder = str(folder)
        self.option = option
        self.advice = advice or f'wait for it to end, or give another {option}'
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.enforced = None
        self.warning = None
        self._fd = None
        self._pid = None

    @property
    def held(self):
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self):
        if self.held:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_CLOEXEC', 0), 0o644)
            except OSError as exc:
                raise OutputDirError(f'{self.option} {self.folder}: cannot create the lock file {LOCK_NAME} '
                                     f'({exc.strerror or exc})') from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    details = self._read(fd)
                    os.close(fd)
                    raise FolderInUseError(f'{self.option} {self.folder}: in use by another run '
                                           f'({describe_owner(details)}); a second run would overwrite its '
                                           f'checkpoints: {self.advice}') from None
                self.enforced = False
                self.warning = (f'warning: {self.option} {self.folder}: its file system refuses file locks '
                                f'({exc.strerror or exc}), so a second run on this folder would not be '
                                f'stopped: make sure there is none')
                break
            # The previous owner removes the file before it lets go: a lock taken on a file that
            # is no longer at `path` protects nothing; start again with the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.enforced = True
                break
            os.close(fd)
        self._fd, self._pid = fd, os.getpid()
        _held.add(self)
        self._write(fd, _owner_details())
        return self

    def release(self):
        if not self.held:
            return
        try:
            os.unlink(self.path)  # while still locked: see acquire
        except FileNotFoundError:
            pass
        except OSError:
            os.ftruncate(self._fd, 0)  # cannot remove it: at least no stale details
        os.close(self._fd)
        self._fd = self._pid = None
        _held.discard(self)

    def _forget(self):
        """In a forked child: close the inherited descriptor; the parent keeps the lock."""
        if self._fd is not None and self._pid != os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = self._pid = None

    @staticmethod
    def _read(fd):
        try:
            return json.loads(os.pread(fd, 8192, 0).decode('utf-8'))
        except (OSError, ValueError):
            return None

    @staticmethod
    def _write(fd, details):
        data = (json.dumps(details) + '\n').encode('utf-8')
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            pass  # the details are for the message of a refused run only; the lock itself holds

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def claim_save_folder(folder, dataset='face', option='--save_folder', advice=None):
    """Take `folder`'s lock (SaveFolderLock) and remove the temporary files that interrupted
    saves of this dataset's training outputs left there (training_output_pattern).

    Returns `(lock, removed, freed_bytes)`; the caller releases the lock at its end (or lets the
    process end). Raises FolderInUseError / OutputDirError as SaveFolderLock.acquire does.
    Temporary files are removed only when the lock is enforced: without it, another run might
    be writing them.
    """
    lock = SaveFolderLock(folder, option, advice).acquire()
    if not lock.enforced:
        return lock, 0, 0
    try:
        removed, freed = remove_stale_temporaries(folder, training_output_pattern(dataset))
    except OutputDirError:
        lock.release()
        raise
    return lock, removed, freed


# -- space for the next epoch ---------------------------------------------------------------------

def periodic_saves(first_iteration, last_iteration, interval):
    """How many of the iterations first..last-1 save a numbered weights file (train.py saves after
    iteration i when i != 0 and i % interval == 0)."""
    if interval <= 0 or last_iteration <= first_iteration:
        return 0
    first = max(first_iteration, 1)
    return max(0, (last_iteration - 1) // interval - (first - 1) // interval)


def check_space_for_epoch(folder, checkpoint_path, weights_bytes, first_iteration, last_iteration,
                          save_interval, epoch=None, best_path=None, option='--save_folder'):
    """Raise DiskFullError (utils.fileio) unless `folder` has room for the saves of the coming
    epoch: the checkpoint at its end (the size of `checkpoint_path` when it exists, else twice
    `weights_bytes`: weights and SGD momentum), one `weights_bytes` file per periodic save among
    iterations first..last-1 (`save_interval`), and the best-model file `best_path` (given when
    the epoch ends with a validation) when it does not exist yet. An existing best-model file is
    replaced before the checkpoint is, and is smaller: the checkpoint's room covers it. Returns
    the bytes needed.

    The message is one line: the folder, the space free, the space needed and what for, and how
    to go on (free space, then resume from the checkpoint already saved).
    """
    try:
        checkpoint_bytes = os.path.getsize(checkpoint_path)
    except OSError:
        checkpoint_bytes = 2 * weights_bytes
    saves = periodic_saves(first_iteration, last_iteration, save_interval)
    if best_path is not None and not os.path.exists(best_path):
        saves += 1  # the first best model: a new file
    needed = checkpoint_bytes + saves * weights_bytes
    what = f'the checkpoint ({format_bytes(checkpoint_bytes)})'
    if saves:
        what += (f' and a weights file ({format_bytes(weights_bytes)})' if saves == 1
                 else f' and {saves} weights files of {format_bytes(weights_bytes)} each')
    when = f'epoch {epoch}' if epoch is not None else 'the next epoch'
    resume = (f'then resume with --resume {shlex.quote(str(checkpoint_path))}' if os.path.isfile(checkpoint_path)
              else 'then start again')
    check_free_space(folder, needed, f'{what} saved by {when}',
                     f'stopped before {when} rather than after it: free some space or give another '
                     f'{option}, {resume}', label=f'{option} {folder}')
    return needed
