"""Stopping a training run on SIGINT/SIGTERM, and train.py's exit statuses.

    0    the run reached its end (its epochs, or --max_iter)
    75   EXIT_STOPPED (sysexits' EX_TEMPFAIL, "try again"): a signal stopped the run, its checkpoint
         saved and resumable; or it came during start-up, before the first step, with nothing new
         to save. A scheduler requeues the job; --resume auto continues it.
    2    a one-line error: bad input, a damaged checkpoint, a diverged run (the last good state kept)
    130  a second Ctrl-C: stopped at once, without saving (the last saved checkpoint is kept)

During start-up a signal ends the process at once with one line and status 75: nothing has
been trained, nothing is being written, and the lock goes with the process. It exits from the
handler rather than raising there: the signal may arrive while PyTorch is loading, inside Python
code that C++ called (pybind11), where an exception cannot unwind and aborts the process instead.
Once training starts it only sets a flag: the loop stops after the current step, or
at once during validation, and saves the checkpoint. Under torchrun every process must stop at
the same step: the flag travels with the all-reduce of the step's finite-loss check
(utils/training/engine.py, FiniteCheck), which every step already makes and reads, so a signal to
any process stops all of them after the step in progress, at no cost to the others.
"""
import os
import shlex
import signal
import sys

EXIT_STOPPED = getattr(os, 'EX_TEMPFAIL', 75)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stopped_message(iteration, checkpoint_path, signal_name=None):
    """The last line of a run stopped before its end, its checkpoint saved:
    'Stopped at iteration 4 (SIGTERM); resume with --resume weights/sfd_face_checkpoint.pth'."""
    why = f' ({signal_name})' if signal_name else ''
    return f'Stopped at iteration {iteration}{why}; resume with --resume {shlex.quote(str(checkpoint_path))}'


class StopSignals:
    """The run's SIGINT/SIGTERM handlers, from `install()` to `close()`.

        signals = StopSignals('train.py').install()   # start-up: a signal ends the process, exit 75
        signals.training()                  # the loop: a signal sets `received`
        signals.close()
    """

    def __init__(self, prog='train.py'):
        self.prog = prog
        self.received = None  # the name of the first signal, once training has started
        self._pid = os.getpid()
        self._previous = {}
        self._training = False

    def install(self):
        if not self._previous:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def training(self):
        """From here a signal asks for a stop after the current step."""
        self._training = True

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked with this handler: the main process decides
        name = signal.Signals(signum).name
        if not self._training:
            sys.stdout.flush()
            if os.environ.get('RANK', '0') == '0':  # under torchrun every process gets it: one line
                print(f'{self.prog}: {name} during start-up, before the first step: nothing new to save; run the '
                      'same command again to start (with --resume auto, to continue from the checkpoint)',
                      file=sys.stderr, flush=True)
            os._exit(EXIT_STOPPED)
        if self.received is not None:
            if signum != signal.SIGINT:
                # Schedulers deliver SIGTERM twice (to every process and again through torchrun's
                # agent) and send SIGKILL after their grace period: keep on towards the save.
                return
            # A second Ctrl-C: the user wants out now, without a traceback.
            print(f'\n{name} received again: stopping now without saving (the last saved checkpoint '
                  f'is kept)', file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.received = name
        print(f'\n{name} received: saving a checkpoint after this iteration (during validation: at once)',
              file=sys.stderr, flush=True)

    def requested_now(self, device):
        """Whether any process has received a signal (a collective under torchrun: call it on every
        process at the same point)."""
        from utils.device import all_reduce_sum

        return bool(all_reduce_sum([float(self.received is not None)], device)[0])
