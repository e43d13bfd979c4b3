"""Small helpers shared by the scripts: the command-line error handling of wider_test.py,
demo.py and the tools, and the layout checks of the weight tools (make_basenet,
convert_official, export_onnx)."""
import sys

from utils.checkpoint import CheckpointError, describe_keys
from utils.device import DeviceUnavailable


class ToolError(RuntimeError):
    """A user-facing failure of a tool (missing optional package, failed verification)."""


def add_step_arguments(parser, batch_size=16, amp_choices=('native', 'off'), amp_default='native'):
    """The options every training-step tool shares: --device, --device_id, --batch_size,
    --input_size, --amp (when amp_choices is not empty) and --amp_dtype."""
    parser.add_argument('--device', default='gpu', choices=['gpu', 'npu', 'cpu'])
    parser.add_argument('--device_id', default=0, type=int)
    parser.add_argument('--batch_size', default=batch_size, type=int)
    parser.add_argument('--input_size', default=640, type=int)
    if amp_choices:
        parser.add_argument('--amp', default=amp_default, choices=list(amp_choices))
    parser.add_argument('--amp_dtype', default='bf16', choices=['bf16', 'fp16'])


def check_layout(state, expected, path, layout_name, hint=None):
    """Raise CheckpointError unless `state` holds every key of `expected` with its shape.

    state: {key: tensor}; expected: {key: torch.Size}. The message names the file, lists
    the missing keys and the shape mismatches, and ends with `hint` when given.
    """
    missing = [k for k in expected if k not in state]
    wrong = [f'{k} {tuple(state[k].shape)} (expected {tuple(shape)})'
             for k, shape in expected.items() if k in state and state[k].shape != shape]
    if not missing and not wrong:
        return
    problems = []
    if missing:
        problems.append(f'missing {len(missing)} of {len(expected)} keys: {describe_keys(missing, 10)}')
    if wrong:
        problems.append(f'wrong shapes: {describe_keys(wrong, 4)}')
    message = f'{path}: not the {layout_name} layout: ' + '; '.join(problems)
    if hint:
        message += f' ({hint})'
    raise CheckpointError(message)


def run_cli(main, parse_args, argv=None, errors=()):
    """Run `main(parse_args(argv))` and return the exit status: 0, or 1 when it raised a
    CheckpointError, DeviceUnavailable, ToolError or one of `errors` (the script's own bad-input
    exceptions), printed as one line `error: ...` on stderr instead of a traceback."""
    args = parse_args(argv)
    try:
        main(args)
    except (CheckpointError, DeviceUnavailable, ToolError, *errors) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0
