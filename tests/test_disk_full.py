"""A full disk: one line naming the file and the space, the previous file intact, no temporary left.

Each case runs twice where it can: on a real tmpfs of 1 MiB (only where the test may mount one:
root with CAP_SYS_ADMIN; skipped elsewhere) and on a simulated disk whose writes fail with
ENOSPC (everywhere)."""
import errno
import os
import tempfile

import pytest
import torch

import utils.files.fileio as fileio
from small_disk import SimulatedFullDisk, fill, require_tmpfs, tmpfs
from utils.files.weights import atomic_save, load_file, save_size_estimate, tensor_bytes
from utils.files.fileio import (DiskFullError, OutputDirError, atomic_write_bytes, atomic_write_text,
                          check_free_space, format_bytes)

BIG = {'weight': torch.zeros(1 << 20)}  # 4 MiB: more than the whole small disk


@pytest.fixture(params=['tmpfs', 'simulated'])
def full_disk(request, tmp_path, monkeypatch):
    """A folder for a checkpoint of 40 bytes, on a disk with no room for BIG."""
    if request.param == 'tmpfs':
        with tmpfs(tmp_path / 'disk', '1m') as mounted:
            yield require_tmpfs(mounted)
    else:
        folder = tmp_path / 'disk'
        folder.mkdir()
        yield str(folder)


def _simulate_if_needed(request, monkeypatch, budget):
    if request.node.callspec.params['full_disk'] == 'simulated':
        SimulatedFullDisk(monkeypatch, budget)


def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_previous_one_is_kept(full_disk, request, monkeypatch):
    path = os.path.join(full_disk, 'sfd_face_checkpoint.pth')
    atomic_save({'weight': torch.arange(4.0)}, path)
    _simulate_if_needed(request, monkeypatch, budget=300_000)
    with pytest.raises(DiskFullError) as info:
        atomic_save(BIG, path)
    message = str(info.value)
    # Not torch's 'basic_ios::clear: iostream error' / 'unexpected pos': the file, the disk, the space.
    assert message.startswith(f'{path}: no space left on the device (') and '\n' not in message
    assert f'about {format_bytes(save_size_estimate(BIG))} needed' in message and ' free in ' in message
    assert message.endswith('the previous file is kept')
    assert info.value.needed >= tensor_bytes(BIG) and isinstance(info.value, OSError)
    assert torch.equal(load_file(path)['weight'], torch.arange(4.0))
    assert sorted(os.listdir(full_disk)) == ['sfd_face_checkpoint.pth']  # no temporary left


def test_a_text_file_on_a_full_disk_is_one_line(full_disk, request, monkeypatch):
    if request.node.callspec.params['full_disk'] == 'tmpfs':
        fill(full_disk, leave=4096)
    _simulate_if_needed(request, monkeypatch, budget=4096)
    target = os.path.join(full_disk, 'event', 'image.txt')
    with pytest.raises(DiskFullError, match=r'image\.txt: no space left on the device \(.* free in .*, about '
                                             r'19\.5 KiB needed\); nothing was written$'):
        atomic_write_text(target, 'y' * 20000)
    assert not os.path.exists(target) and os.listdir(os.path.dirname(target)) == []


def test_a_writer_without_errno_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    """torch's C++ writer (and ONNX's) fail on a full disk with a RuntimeError and no errno:
    the space left decides, and any other RuntimeError stays what it is."""
    def failing_save(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04' + b'\0' * 1000)
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')

    monkeypatch.setattr(torch, 'save', failing_save)
    path = str(tmp_path / 'w.pth')
    monkeypatch.setattr(fileio, 'free_bytes', lambda folder: 10 << 30)
    with pytest.raises(RuntimeError, match='unexpected pos') as info:
        atomic_save(BIG, path)
    assert not isinstance(info.value, DiskFullError)
    monkeypatch.setattr(fileio, 'free_bytes', lambda folder: 2048)
    with pytest.raises(DiskFullError, match=r'w\.pth: no space left on the device \(2\.0 KiB free in .*, about '
                                            r'4\.1 MiB needed\); nothing was written$'):
        atomic_save(BIG, path)
    assert os.listdir(tmp_path) == []


def test_no_room_for_even_an_empty_file(tmp_path, monkeypatch):
    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(tempfile, 'mkstemp', no_inode)
    monkeypatch.setattr(fileio, 'free_bytes', lambda folder: 0)
    with pytest.raises(DiskFullError, match=r'out\.jpg: no space left on the device \(0 bytes free in .*, about '
                                            r'3 bytes needed\); nothing was written$'):
        atomic_write_bytes(str(tmp_path / 'out.jpg'), b'abc')


def test_a_quota_is_named_as_such(tmp_path, monkeypatch):
    def over_quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, 'Disk quota exceeded')

    monkeypatch.setattr(tempfile, 'mkstemp', over_quota)
    with pytest.raises(DiskFullError, match=r'out\.txt: disk quota exceeded \('):
        atomic_write_text(str(tmp_path / 'out.txt'), 'x')


def test_check_free_space_says_what_needs_how_much(tmp_path, monkeypatch):
    assert check_free_space(str(tmp_path), 1, 'a byte') > 0
    monkeypatch.setattr(fileio, 'free_bytes', lambda folder: 100 << 20)
    with pytest.raises(DiskFullError) as info:
        check_free_space(str(tmp_path), 180 << 20, 'the next checkpoint', 'free some space',
                         label=f'--save_folder {tmp_path}')
    assert str(info.value) == (f'--save_folder {tmp_path}: 100.0 MiB free, about 180.0 MiB needed for the '
                               f'next checkpoint; free some space')
    assert isinstance(info.value, OutputDirError) and info.value.needed == 180 << 20


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1024, 5 << 20, 3 << 30)] == \
        ['0 bytes', '1023 bytes', '1.0 KiB', '5.0 MiB', '3.00 GiB']
