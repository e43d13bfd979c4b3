"""Small helpers shared by the scripts: the command-line error handling of wider_test.py,
demo.py and the tools, and the layout checks of the weight tools (make_basenet,
convert_official, export_onnx)."""
import argparse
import sys

from utils.checkpoint import CheckpointError, describe_keys
from utils.device import DeviceUnavailable
from utils.fileio import OutputDirError


class ToolError(RuntimeError):
    """A user-facing failure of a tool (missing optional package, failed verification)."""


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


# Per GPU: dense tensor-core peaks in TFLOP/s (no sparsity) for bf16/fp16 and fp32 (TF32 where
# used), and HBM bandwidth in TB/s. Looked up by substring of the device name, in this order
# ('H100 PCIe' before 'H100').
DEVICE_SPECS = {
    'H100 PCIe': {'bf16': 756.0, 'fp16': 756.0, 'fp32': 378.0, 'hbm_tbs': 2.0},
    'H100': {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.5, 'hbm_tbs': 3.35},
    'H200': {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.5, 'hbm_tbs': 4.8},
    'A100': {'bf16': 312.0, 'fp16': 312.0, 'fp32': 156.0, 'hbm_tbs': 2.0},
    'L40S': {'bf16': 362.0, 'fp16': 362.0, 'fp32': 183.0, 'hbm_tbs': 0.86},
    'V100': {'bf16': None, 'fp16': 125.0, 'fp32': 15.7, 'hbm_tbs': 0.9},
}


def device_spec(device_name):
    """DEVICE_SPECS' entry for a device name (e.g. 'NVIDIA H100 80GB HBM3'), None if unknown."""
    return next((spec for key, spec in DEVICE_SPECS.items() if key in device_name), None)


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
    CheckpointError, DeviceUnavailable, OutputDirError, ToolError or one of `errors` (the
    script's own bad-input exceptions), printed as one line `error: ...` on stderr instead of a
    traceback."""
    args = parse_args(argv)
    try:
        main(args)
    except (CheckpointError, DeviceUnavailable, OutputDirError, ToolError, *errors) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0
