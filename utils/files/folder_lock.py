"""One process at a time in an output folder: `FolderLock`.

An exclusive `flock` on `<folder>/.sfd_run.lock`, which the kernel releases when its holder dies,
however it dies (kill -9 included): a crashed run never blocks the next one. The file holds the
owner's pid, host, start time and command for the refusal message of a second run. Used by
train.py's save folder (only the process that saves takes it: under torchrun, global rank 0) and
by wider_test.py's prediction folder.

File systems: flock is enforced on local file systems. On NFS, Linux (since 2.6.12) emulates
flock with a POSIX lock that the server arbitrates, so it holds across clients, unless the
share is mounted with `nolock` or `local_lock=flock|all` (then only processes of one client
see each other's locks). Some network and FUSE file systems refuse locks (ENOLCK, ENOSYS,
EOPNOTSUPP; Lustre without `-o flock`): there the run goes on with a warning that the folder
is not protected (`FolderLock.warning`).
"""
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys

from utils.files.fileio import OutputDirError

LOCK_NAME = '.sfd_run.lock'


class FolderInUseError(OutputDirError):
    """Another live process holds the folder's lock; the message names the folder and it."""


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


class FolderLock:
    """Exclusive use of an output folder by one process, for as long as it holds the lock.

        with FolderLock('weights', '--save_folder'):
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
                                           f'files: {self.advice}') from None
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
