"""A full disk for the tests, two ways.

`tmpfs(path, size)`: a real tmpfs of `size` mounted at `path`, where the test may mount one (root
with CAP_SYS_ADMIN: a plain container or a CI runner usually cannot); it yields None elsewhere,
and the test skips. `fill(folder)` then takes all of its space.

`SimulatedFullDisk(monkeypatch, budget)`: what runs everywhere. Files that utils/files/fileio.py and
utils/files/weights.py open for writing raise ENOSPC once `budget` bytes in all are written, as
the kernel does, and utils.files.fileio.free_bytes reports what is left of the budget.
"""
import contextlib
import errno
import os
import shutil
import subprocess

import utils.files.weights
import utils.files.fileio


@contextlib.contextmanager
def tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which('mount') or not shutil.which('umount'):
        yield None
        return
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield str(path)
    finally:
        subprocess.run(['umount', '-l', str(path)], capture_output=True)


def require_tmpfs(mounted):
    if mounted is None:
        import pytest
        pytest.skip('cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the simulated '
                    'full disk variant runs instead')
    return mounted


def fill(folder, leave=0):
    """Write `folder`/filler until the disk is full (less `leave` bytes, rounded to 4 KiB)."""
    path = os.path.join(folder, 'filler')
    target = max(0, shutil.disk_usage(folder).free - leave)
    chunk = b'\0' * 65536
    with open(path, 'wb', buffering=0) as handle:
        written = 0
        try:
            while written < target:
                written += handle.write(chunk[:min(len(chunk), target - written)])
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return path


class _Writer:
    def __init__(self, handle, disk):
        self._handle, self._disk = handle, disk

    def write(self, data):
        size = len(data.encode('utf-8')) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._disk.left:
            part = self._disk.left
            if part:
                self._handle.write(data[:part])
                self._handle.flush()
            self._disk.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


class SimulatedFullDisk:
    """ENOSPC after `budget` bytes written through utils.files.fileio / utils.files.weights's `open`."""

    def __init__(self, monkeypatch, budget=0):
        self.left = budget

        def full_open(file, mode='r', *args, **kwargs):
            handle = open(file, mode, *args, **kwargs)
            return _Writer(handle, self) if any(m in mode for m in 'wax+') else handle

        for module in (utils.files.fileio, utils.files.weights):
            monkeypatch.setattr(module, 'open', full_open, raising=False)
        monkeypatch.setattr(utils.files.fileio, 'free_bytes', lambda folder: self.left)
