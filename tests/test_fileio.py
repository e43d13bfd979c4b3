import os
import stat

import pytest

from utils.files.fileio import (OutputDirError, atomic_path, atomic_write_bytes, atomic_write_text, check_output_file,
                          make_output_dir)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / 'sub' / 'out.txt'
    atomic_write_text(str(target), 'one\n')
    atomic_write_bytes(str(target), b'two\n', sync=True)
    assert target.read_bytes() == b'two\n'
    assert os.listdir(target.parent) == ['out.txt']
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('previous')
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            with open(tmp, 'w') as f:
                f.write('half')
            raise RuntimeError('killed mid-write')
    assert target.read_text() == 'previous'
    assert os.listdir(tmp_path) == ['out.txt']


def test_make_output_dir_creates_nested_folders_or_names_the_option(tmp_path):
    target = tmp_path / 'a' / 'b'
    assert make_output_dir(str(target), '--out') == str(target) and target.is_dir()
    make_output_dir(str(target), '--out')  # already there: fine
    (tmp_path / 'f').write_text('')
    for path in (tmp_path / 'f', tmp_path / 'f' / 'sub'):
        with pytest.raises(OutputDirError) as info:
            make_output_dir(str(path), '--save_folder')
        message = str(info.value)
        assert message.startswith(f'--save_folder {path}: ') and 'a file is in the way' in message
        assert '\n' not in message and isinstance(info.value, OSError)


def test_an_unwritable_folder_is_found_before_any_work(tmp_path, monkeypatch):
    import tempfile

    target = tmp_path / 'read_only'
    target.mkdir()

    def refuse(*args, **kwargs):  # what a read-only mount or a folder of another user does
        raise PermissionError(13, 'Permission denied')

    monkeypatch.setattr(tempfile, 'mkstemp', refuse)
    with pytest.raises(OutputDirError, match=r'^--out .*read_only: cannot write into the directory '
                                             r'\(Permission denied\)$'):
        make_output_dir(str(target), '--out')
    with pytest.raises(OutputDirError, match=r'out\.txt: cannot write \(Permission denied\)$'):
        atomic_write_text(str(target / 'out.txt'), 'x')


def test_a_directory_is_not_an_output_file(tmp_path):
    (tmp_path / 'weights').mkdir()
    with pytest.raises(OutputDirError, match='--dst .*weights: is a directory; give a file name'):
        check_output_file(str(tmp_path / 'weights'), '--dst')
    with pytest.raises(OutputDirError, match='weights: is a directory'):
        atomic_write_bytes(str(tmp_path / 'weights'), b'')
    assert check_output_file(str(tmp_path / 'new' / 'w.pth'), '--dst').endswith('w.pth')
    assert (tmp_path / 'new').is_dir()
