"""Atomic file writing: a crash or kill mid-write never leaves a half-written file.

Everything is first written to a temporary file in the destination's folder, which is then
renamed over the destination (os.replace is atomic on POSIX and Windows). The temporary file
is named `.<destination name>.<8 random characters>.tmp`; a process killed with SIGKILL
during a write leaves it behind, and `remove_stale_temporaries` removes such files.

A full disk (or quota) is reported as `DiskFullError`, one line naming the file, the space
free and the space needed, whether the write failed with ENOSPC/EDQUOT or inside a C++
writer that only says "iostream error" (torch.save).
"""
import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import traceback

from utils.cli import UserError


class OutputDirError(UserError, OSError):
    """An output directory or file that cannot be written; the message names the path (and the
    option it came from)."""


class DiskFullError(OutputDirError):
    """A write that failed, or would fail, for want of space. `path` is the file or folder,
    `needed` the bytes needed (None when unknown), `free` the bytes free."""

    def __init__(self, message, path=None, needed=None, free=None):
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free

    def __reduce__(self):
        return type(self), (str(self), self.path, self.needed, self.free)


# errno values of a write that found no room: the device is full, or the user's quota is.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A write that failed without an errno (torch's zip writer) is put down to a full disk when
# less than this is left free once it failed (and the rest of the file would not fit).
LOW_SPACE_BYTES = 1 << 20


def format_bytes(n):
    """'512 bytes', '3.2 KiB', '180.3 MiB', '1.50 GiB': the units of `df -h`."""
    if n is None:
        return 'an unknown amount'
    if n < 1024:
        return f'{int(n)} bytes'
    for unit, scale in (('KiB', 1 << 10), ('MiB', 1 << 20), ('GiB', 1 << 30), ('TiB', 1 << 40)):
        if n < scale * 1024 or unit == 'TiB':
            value = n / scale
            return f'{value:.2f} {unit}' if unit in ('GiB', 'TiB') else f'{value:.1f} {unit}'


def free_bytes(folder):
    """Bytes that an unprivileged process can still write under `folder` (df's 'Avail'), or
    None when it cannot be asked."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(folder, needed, what, advice=None, label=None):
    """Raise `DiskFullError` when `folder` has less than `needed` bytes free: one line naming
    the folder (or `label`, e.g. '--save_folder weights'), both amounts, what needs the space
    (`what`: '... about 180.0 MiB needed for the next checkpoint') and `advice` when given.
    Returns the bytes free (None where the file system cannot say). Call it before work whose
    result could not be saved: an error now costs nothing, one at the save costs the work."""
    free = free_bytes(folder)
    if free is None or free >= needed:
        return free
    message = f'{label or folder}: {format_bytes(free)} free, about {format_bytes(needed)} needed for {what}'
    raise DiskFullError(message + (f'; {advice}' if advice else ''), folder, needed, free)


def _errnos(exc):
    """The errno values of `exc` and of the exceptions it was raised from."""
    seen = []
    while exc is not None and len(seen) < 10:
        if isinstance(exc, OSError) and exc.errno is not None:
            seen.append(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return seen


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _is_disk_full(exc, folder, written, needed):
    """Whether a write that raised `exc` failed for want of space. An errno says so directly;
    torch's C++ writer raises a RuntimeError without one ('basic_ios::clear: iostream error',
    'unexpected pos ...'), so then the disk decides: it is full if less than LOW_SPACE_BYTES is
    left while the failed file is still there, or if the rest of the file could not fit."""
    if NO_SPACE_ERRNOS.intersection(_errnos(exc)):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    free = free_bytes(folder)
    if free is None:
        return False
    return free < LOW_SPACE_BYTES or (needed is not None and free < needed - written)


def _disk_full_error(path, folder, written, needed, exc):
    code = next((e for e in _errnos(exc) if e in NO_SPACE_ERRNOS), errno.ENOSPC) if exc else errno.ENOSPC
    reason = 'disk quota exceeded' if code == errno.EDQUOT else 'no space left on the device'
    free = free_bytes(folder)  # after the partial file was removed: what `df` shows now
    if needed:
        need = f'about {format_bytes(needed)} needed'
    elif written:
        need = f'more than the {format_bytes(written)} written when it filled needed'
    else:
        need = 'not even an empty file could be created'
    kept = '; the previous file is kept' if os.path.isfile(path) else '; nothing was written'
    return DiskFullError(f'{path}: {reason} ({format_bytes(free)} free in {folder}, {need}){kept}',
                         path, needed, free)


def make_output_dir(path, option):
    """`os.makedirs(path, exist_ok=True)` and a check that files can be created in it, or
    `OutputDirError` in one line naming `option` (e.g. '--out') and the path: a file in the way,
    no permission, a read-only file system. Checked before any work, so that a run does not
    find out at its first save."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        reason = 'a file is in the way' if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else (exc.strerror or str(exc))
        raise OutputDirError(f'{option} {path}: cannot create the directory ({reason})') from None
    try:
        fd, probe = tempfile.mkstemp(prefix='.write_check.', dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OutputDirError(f'{option} {path}: cannot write into the directory '
                             f'({exc.strerror or exc})') from None
    return path


def check_output_file(path, option):
    """Fail early, in one line, when `path` cannot become an output file: it is a directory, or
    its folder cannot be created or written to. Creates the folder."""
    if os.path.isdir(path):
        raise OutputDirError(f'{option} {path}: is a directory; give a file name')
    make_output_dir(os.path.dirname(os.path.abspath(path)), option)
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, sync=False, needed=None):
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds.

    The file gets the usual permissions (0666 minus the umask; mkstemp would leave 0600).
    With `sync`, the data is flushed to disk before the rename. On any error the temporary
    file is removed and `path` is left as it was. A destination that is a directory, or a
    folder that cannot be written, raises `OutputDirError` naming `path`; a full disk raises
    `DiskFullError` naming `path`, the space free and `needed` (the file's expected size in
    bytes, when the caller knows it: it also tells a full disk from other failures of
    writers that give no errno).
    """
    if os.path.isdir(path):
        raise OutputDirError(f'{path}: is a directory, cannot write a file there')
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise _disk_full_error(path, folder, 0, needed, exc) from None
        raise OutputDirError(f'{path}: cannot write ({exc.strerror or exc})') from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            yield tmp
            if sync:
                with open(tmp, 'rb') as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            written = _size(tmp)
            if isinstance(exc, DiskFullError) or not _is_disk_full(exc, folder, written, needed):
                raise
            # The failed writer may still hold the file open (torch's, through the traceback's
            # frames): let it go, then remove the file, so that the message gives the space free
            # once it is gone.
            traceback.clear_frames(exc.__traceback__)
            os.remove(tmp)
            raise _disk_full_error(path, folder, written, needed, exc) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# What atomic_path's temporary files look like: '.' + destination + '.' + mkstemp's 8
# characters (a-z, 0-9, _) + '.tmp'.
_TEMPORARY = re.compile(r'\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp')


def temporary_target(name):
    """The destination name of an atomic_path temporary file name, else None."""
    match = _TEMPORARY.fullmatch(name)
    return match.group('target') if match else None


def remove_stale_temporaries(folder, targets):
    """Remove the temporary files that atomic_path left in `folder` for destinations whose name
    fully matches `targets` (a regular expression): files of a process killed during a write.

    Only call it when no live process can be writing those destinations (train.py: while it
    holds the save folder's lock, before its first save). Returns (files removed, bytes freed).
    A file that cannot be removed raises OutputDirError naming it.
    """
    pattern = re.compile(targets) if isinstance(targets, str) else targets
    removed = freed = 0
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return 0, 0
    except OSError as exc:
        raise OutputDirError(f'{folder}: cannot list the folder ({exc.strerror or exc})') from None
    for name in names:
        target = temporary_target(name)
        if target is None or not pattern.fullmatch(target):
            continue
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                continue
            os.remove(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputDirError(f'{path}: cannot remove this temporary file left by an interrupted '
                                 f'save ({exc.strerror or exc})') from None
        removed += 1
        freed += info.st_size
    return removed, freed


def atomic_write_bytes(path, data, sync=False):
    with atomic_path(path, sync, needed=len(data)) as tmp, open(tmp, 'wb') as f:
        f.write(data)


def atomic_write_text(path, text, sync=False):
    with atomic_path(path, sync, needed=len(text.encode('utf-8'))) as tmp, \
            open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
