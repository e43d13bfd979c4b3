"""torchrun, with the exit statuses of train.py: for schedulers that requeue on 75.

    python tools/launch.py --nproc_per_node 8 --max_restarts 3 train.py --device gpu --resume auto

Takes torchrun's options and command line unchanged and runs torchrun's own launcher (the elastic
agent) in this process. torchrun itself exits 1 in two cases a scheduler must tell apart from a
failure: when it is stopped by SIGTERM or SIGINT (a preemption: it forwards the signal to its
workers, which save their checkpoint and exit 75, then it re-raises the signal as an error) and
when its workers stop themselves that way. This exits

    0    every worker ended well
    75   the launcher was stopped by SIGTERM/SIGINT, or every failed worker exited 75: the run stopped
         with its checkpoint saved; the same command with --resume auto continues it
    1    anything else (torchrun's own report of the failure is printed, as torchrun prints it)
"""
import sys

EXIT_STOPPED = 75
USAGE = 'usage: launch.py [torchrun options] train.py [train.py options]'


def main(argv):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as stopped:
        print(f'launch.py: {stopped.sigval.name} received: the workers were told to stop and save (exit '
              f'{EXIT_STOPPED}: run the same command with --resume auto to continue)', file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except ChildFailedError as failed:
        codes = sorted({failure.exitcode for failure in failed.failures.values()})
        if codes == [EXIT_STOPPED]:
            print(f'launch.py: the workers stopped with their checkpoint saved (exit {EXIT_STOPPED}: run the same '
                  'command with --resume auto to continue)', file=sys.stderr, flush=True)
            return EXIT_STOPPED
        print(failed.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        print(USAGE)
        print(__doc__.split('\n', 2)[2].rstrip() + '\n\ntorchrun\'s options: torchrun --help')
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    sys.exit(main(sys.argv[1:]))
