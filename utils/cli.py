"""Command-line plumbing shared by the scripts and the tools: argparse number types, the base
class of the errors meant for the user, and the one place that prints such an error as one
line and turns it into an exit status.

It imports nothing heavy, so that a script's `--help` answers before PyTorch is loaded.
"""
import argparse
import sys


class UserError(Exception):
    """An error whose message is written for the user: bad input, a missing file or package, a
    failed check. `run_cli` prints it as one line instead of a traceback. Each module derives
    its own errors from it (CheckpointError, DeviceUnavailable, OutputDirError, ...)."""


class ToolError(UserError, RuntimeError):
    """A failure of a tool (a missing optional package, a failed verification)."""


def at_least(minimum, kind=int, maximum=None):
    """argparse type: a `kind` number >= minimum (and <= maximum), else argparse's one-line
    usage error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {"an integer" if kind is int else "a number"}, '
                                             f'got {text!r}') from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {text}')
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f'must be at most {maximum}, got {text}')
        return value
    parse.__name__ = kind.__name__
    return parse


def loss_scale(text):
    """argparse type of --loss_scale: 'dynamic', or a static scale (a number > 0)."""
    if text.strip().lower() == 'dynamic':
        return 'dynamic'
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'dynamic', got {text!r}") from None
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'a static loss scale must be a positive number, got {text}')
    return value


def input_side(text):
    """argparse type of an image side given to the network (--input_size, --max_size): an
    integer of at least s3fd.MIN_INPUT_SIDE."""
    from s3fd import MIN_INPUT_SIDE  # only when the option is given: --help stays quick
    return at_least(MIN_INPUT_SIDE)(text)


def one_line(error):
    """The message of `error` as one line: its first line, except for an error raised in a
    DataLoader worker, which reaches the main process with the worker's traceback in its
    message, ending with the original message."""
    text = str(error).strip()
    if 'Traceback (most recent call last)' not in text:
        return text.splitlines()[0] if text else type(error).__name__
    last = text.splitlines()[-1]
    name, _, message = last.partition(': ')  # 'data.widerface.DatasetError: message'
    return message if message and name.rsplit('.', 1)[-1] == type(error).__name__ else last


def run_cli(main, parse_args, argv=None, prog=None, status=1):
    """Run `main(parse_args(argv))` and return the exit status: 0, or `status` when it raised a
    UserError, printed as one line on stderr (`<prog>: error: ...`, or `error: ...`) instead of
    a traceback."""
    args = parse_args(argv)
    try:
        main(args)
    except UserError as error:
        print(f'{prog + ": " if prog else ""}error: {one_line(error)}', file=sys.stderr, flush=True)
        return status
    return 0
