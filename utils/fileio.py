"""Atomic file writing: a crash or kill mid-write never leaves a half-written file.

Everything is first written to a temporary file in the destination's folder, which is then
renamed over the destination (os.replace is atomic on POSIX and Windows).
"""
import contextlib
import os
import tempfile


class OutputDirError(OSError):
    """An output directory that cannot be created; the message names the option and the path."""


def make_output_dir(path, option):
    """`os.makedirs(path, exist_ok=True)`, or `OutputDirError` in one line naming `option`
    (e.g. '--out') and the path: a file in the way, no permission, a read-only file system."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        reason = 'a file is in the way' if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else (exc.strerror or str(exc))
        raise OutputDirError(f'{option} {path}: cannot create the directory ({reason})') from None
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
    file is removed and `path` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
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
