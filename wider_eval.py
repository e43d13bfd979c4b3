"""Score WIDER FACE val predictions with the official protocol (easy / medium / hard AP).

    python wider_eval.py -p PRED_DIR -g GT_DIR [--plot pr.png] [--json] [--arithmetic matlab|double]

PRED_DIR holds ``<event>/<image name>.txt`` files (line 1 image name, line 2 box count, then
``x y w h score`` per box, pixels), as written by ``wider_test.py`` or any WIDER FACE detector.
GT_DIR is the official ``eval_tools/ground_truth`` directory (``wider_face_val.mat`` and
``wider_{easy,medium,hard}_val.mat``). The protocol is that of the official MATLAB tools,
including MATLAB's int32 arithmetic on the ground-truth boxes (``--arithmetic double`` gives
the float64 numbers of the WiderFace-Evaluation Python port instead); see
``utils/evaluation/widerface_eval.py`` for its exact rules.
"""
import argparse
import json
import sys

from utils.cli import HelpFormatter
from utils.evaluation.widerface_eval import (ARITHMETICS, SETTINGS, WiderEvalError, evaluate,
                                  load_ground_truth, plot_pr_curves)

RULE = '=' * 49
PROG = 'wider_eval.py'  # the start of its error lines, as argparse's: 'wider_eval.py: error: ...'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description='WIDER FACE val evaluation (official protocol, NumPy).')
    parser.add_argument('-p', '--pred', required=True, metavar='PRED_DIR',
                        help='prediction directory: <event>/<image name>.txt files')
    parser.add_argument('-g', '--gt', required=True, metavar='GT_DIR',
                        help='directory with wider_face_val.mat and wider_{easy,medium,hard}_val.mat')
    parser.add_argument('--plot', metavar='FILE', help='save the three precision-recall curves to FILE '
                        '(png, pdf, svg; needs matplotlib)')
    parser.add_argument('--json', action='store_true',
                        help='print {"easy": AP, "medium": AP, "hard": AP} instead of the table')
    parser.add_argument('--arithmetic', choices=ARITHMETICS, default='matlab',
                        help="'matlab' (default): the official tools' numbers, int32 ground truth and "
                             "single-precision scores as MATLAB runs them; 'double': the same steps in "
                             'float64, the numbers of the WiderFace-Evaluation Python port')
    return parser.parse_args(argv)


def format_results(aps):
    """The classic result table (four decimals)."""
    return '\n'.join(['==================== Results ====================',
                      f'Easy   Val AP: {aps["easy"]:.4f}',
                      f'Medium Val AP: {aps["medium"]:.4f}',
                      f'Hard   Val AP: {aps["hard"]:.4f}',
                      RULE])


def _print_warning(message):
    print(f'warning: {message}', file=sys.stderr)


def main(args):
    """Run the evaluation; returns the process exit status (0 ok, 1 bad input)."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the evaluation, used by plot_pr_curves)
        except ImportError:
            print(f'{PROG}: error: --plot needs matplotlib, which is not installed (pip install matplotlib)',
                  file=sys.stderr)
            return 1
    try:
        gt = load_ground_truth(args.gt)
        aps, curves = evaluate(args.pred, gt, warn=_print_warning, return_curves=True,
                               arithmetic=args.arithmetic)
    except WiderEvalError as exc:
        print(f'{PROG}: error: {exc}', file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({s: aps[s] for s in SETTINGS}))
    else:
        print(format_results(aps))
    if args.plot:
        try:
            plot_pr_curves(curves, aps, args.plot)
        except (OSError, ValueError) as exc:
            print(f'{PROG}: error: cannot save the plot to {args.plot}: {exc}', file=sys.stderr)
            return 1
        print(f'PR curves saved to {args.plot}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main(parse_args()))
