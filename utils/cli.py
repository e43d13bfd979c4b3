"""Command-line plumbing shared by the scripts and the tools: argparse number types, the base
class of the errors meant for the user, and the one place that prints such an error as one
line and turns it into an exit status.

It imports nothing heavy, so that a script's `--help` answers before PyTorch is loaded.
"""
import argparse
import os
import re
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The --help of every script: the description as written (a module docstring keeps its
    layout), and each option's default shown once. `(default: X)` is added to an option's help
    unless the help already says what the default is (it mentions 'default'), or there is no
    value to show (None, a flag's False, a required option, a positional argument)."""

    def _get_help_string(self, action):
        text = action.help or ''
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if 'default' in text.lower() or nothing or action.required or not action.option_strings:
            return text
        return f'{text} (default: %(default)s)' if text else '(default: %(default)s)'


class UserError(Exception):
    """An error whose message is written for the user: bad input, a missing file or package, a
    failed check. `run_cli` prints it as one line instead of a traceback. Scripts raise it as it
    is; a subclass exists only where a caller treats that kind of failure differently
    (CheckpointError, DeviceUnavailable, OutputDirError and DiskFullError, ImageReadError,
    AnnotationError, WiderEvalError, Diverged)."""


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
    integer of at least data.config.MIN_INPUT_SIDE."""
    from data.config import MIN_INPUT_SIDE  # only when the option is given: --help stays quick
    return at_least(MIN_INPUT_SIDE)(text)


def one_line(error):
    """The message of `error` as one line: its first line, except for an error raised in a
    DataLoader worker, which reaches the main process with the worker's traceback in its
    message, ending with the original message."""
    text = str(error).strip()
    if 'Traceback (most recent call last)' not in text:
        return text.splitlines()[0] if text else type(error).__name__
    last = text.splitlines()[-1]
    name, _, message = last.partition(': ')  # 'data.widerface.UserError: message'
    return message if message and name.rsplit('.', 1)[-1] == type(error).__name__ else last


def torch_pair_advice(torch_version):
    """The pip command that installs the torchvision made for `torch_version` (e.g. '2.14.1+cpu'),
    from the index that torch build came from. torch 2.N.P pairs with torchvision 0.(N+15).P:
    so the table of https://github.com/pytorch/vision#installation from torch 2.1 to 2.13, and
    torch 2.14.1 with torchvision 0.29.1 as installed here. A '+cpu' or '+cu130' build comes
    from https://download.pytorch.org/whl/<tag>, a build without a tag from the default index."""
    match = re.fullmatch(r'2\.(\d+)\.(\d+)(?:\+(\w[\w.]*))?', torch_version or '')
    if not match or match.group(1) == '0':  # torch 2.0.1 went with torchvision 0.15.2
        return 'install the torchvision release made for this torch (https://github.com/pytorch/vision#installation)'
    minor, patch, tag = int(match.group(1)), int(match.group(2)), match.group(3)
    command = f'pip install --force-reinstall --no-deps torchvision==0.{minor + 15}.{patch}'
    if tag:
        command += f' --index-url https://download.pytorch.org/whl/{tag}'
    return command


def _installed_version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _package_dir(name):
    """The folder of package `name` as the import system finds it, without importing it."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.realpath(locations[0]) if locations else None


def torchvision_failure(error):
    """The one-line message for `error` when it was raised while torchvision was being imported
    (a module of the torchvision package running its top level), else None.

    A torchvision built for another torch (another version, or CUDA beside a CPU torch) cannot
    load its C++ operators, and its import then ends deep inside torch with `operator
    torchvision::nms does not exist` (or an undefined symbol, or different CUDA versions). The
    message names both installed versions, the original error and the command that installs the
    matching torchvision."""
    folder = _package_dir('torchvision')
    if folder is None or error.__traceback__ is None:
        return None
    import traceback
    during_import = any(frame.name == '<module>' and os.path.realpath(frame.filename).startswith(folder + os.sep)
                        for frame in traceback.extract_tb(error.__traceback__))
    if not during_import:
        return None
    import torch
    tv_version = _installed_version('torchvision') or '(version unknown)'
    reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    missing = getattr(error, 'name', None) if isinstance(error, ModuleNotFoundError) else None
    if missing and missing.split('.')[0] not in ('torch', 'torchvision'):
        return f'torchvision {tv_version} cannot be imported: {reason}'  # a dependency of its own is missing
    return (f'torchvision {tv_version} does not work with torch {torch.__version__} ({reason}): '
            f'they must be builds made for each other; {torch_pair_advice(torch.__version__)}')


def exit_if_torchvision_broken(prog):
    """For a script that imports torchvision at its top level (outside run_cli): import it now,
    and exit with status 1 and one line `<prog>: error: ...` when it cannot work with this torch
    (see torchvision_failure) instead of the import's traceback."""
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # torchvision's import raises RuntimeError, OSError or ImportError
        message = torchvision_failure(error)
        if message is None:
            raise
        print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def run_cli(main, parse_args, argv=None, prog=None, status=1):
    """Run `main(parse_args(argv))` and return the exit status: 0, or `status` when it raised a
    UserError, printed as one line on stderr, `<prog>: error: ...` as argparse prints its usage
    errors (prog: the script's file name; default the name it was run by), instead of a
    traceback. A torchvision that cannot work with the installed torch is reported the same
    way (see torchvision_failure)."""
    prog = prog or os.path.basename(sys.argv[0])
    args = parse_args(argv)
    try:
        main(args)
    except UserError as error:
        print(f'{prog}: error: {one_line(error)}', file=sys.stderr, flush=True)
        return status
    except Exception as error:
        message = torchvision_failure(error)
        if message is None:
            raise
        print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
        return status
    return 0
