"""Atomic file writing: a crash or kill mid-write never leaves a half-written file.

Everything is first written to a temporary file in the destination's folder, which is then
renamed over the destination (os.replace is atomic on POSIX and Windows).
"""
import contextlib
import os
import tempfile

from utils.cli import UserError


class OutputDirError(UserError, OSError):
    """An output directory or file that cannot be written; the message names the path (and the
    option it came from)."""


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
def atomic_path(path, sync=False):
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds.

    The file gets the usual permissions (0666 minus the umask; mkstemp would leave 0600).
    With `sync`, the data is flushed to disk before the rename. On any error the temporary
    file is removed and `path` is left as it was. A destination that is a directory, or a
    folder that cannot be written, raises `OutputDirError` naming `path`.
    """
    if os.path.isdir(path):
        raise OutputDirError(f'{path}: is a directory, cannot write a file there')
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    except OSError as exc:
        raise OutputDirError(f'{path}: cannot write ({exc.strerror or exc})') from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        if sync:
            with open(tmp, 'rb') as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data, sync=False):
    with atomic_path(path, sync) as tmp, open(tmp, 'wb') as f:
        f.write(data)


def atomic_write_text(path, text, sync=False):
    with atomic_path(path, sync) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
