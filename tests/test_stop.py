"""utils/training/stop.py: the run's stop signals and train.py's exit statuses."""
import os
import signal
import time

import pytest

from utils.training.stop import EXIT_STOPPED, StopSignals, stopped_message


def test_stopped_status_and_message():
    assert EXIT_STOPPED == 75 and EXIT_STOPPED not in (0, 1, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM)
    assert stopped_message(4, 'weights/sfd_face_checkpoint.pth', 'SIGTERM') == \
        'Stopped at iteration 4 (SIGTERM); resume with --resume weights/sfd_face_checkpoint.pth'
    assert stopped_message(4, 'my weights/c.pth') == "Stopped at iteration 4; resume with --resume 'my weights/c.pth'"


def test_a_second_signal_stops_at_once_without_a_traceback(capsys):
    stop = StopSignals().install()
    stop.training()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.received == 'SIGINT'
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert exc.value.code == 128 + signal.SIGINT
    finally:
        stop.close()
    stop = StopSignals().install()
    stop.training()
    try:  # a repeated SIGTERM (a scheduler and torchrun both forward it) does not cancel the save
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.received == 'SIGTERM'
    finally:
        stop.close()
    assert 'SIGINT received again: stopping now without saving' in capsys.readouterr().err


def test_a_stop_signal_reaching_a_forked_worker_is_left_to_the_main_process(monkeypatch):
    import utils.training.stop as stop_module
    stop = StopSignals().install()
    stop.training()
    try:
        monkeypatch.setattr(stop_module.os, 'getpid', lambda: -1)  # as in a DataLoader worker
        stop._handle(signal.SIGINT, None)
        assert stop.received is None
        monkeypatch.undo()
        stop._handle(signal.SIGINT, None)
        assert stop.received == 'SIGINT'
    finally:
        stop.close()
