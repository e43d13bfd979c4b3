"""The demo: the whole pipeline on a synthetic WIDER FACE, on the CPU, in a few minutes.

    python quickstart.py [train.py options]      # the same as: python train.py --demo [options]

Generates the synthetic dataset under data/demo/WIDER (once), writes its list files, then runs
train.py with a demo-only recipe (DEMO_RECIPE: from scratch, a reduced input size, the WIDER AP of
every epoch with the official protocol, the epoch of the best AP kept in
data/demo/weights/sfd_face.pth), draws that detector's detections on one validation image and
prints the commands that reproduce its numbers. Everything it and those commands write stays
under data/demo/. A new demo replaces the last one (the files it removes are named); options
given on the command line (e.g. --max_iter, --resume) override the recipe's; train.py's own
defaults are not changed.
"""
import argparse
import os
import shlex
import sys

DEMO_ROOT = os.path.join('data', 'demo')
DEMO_WIDER = os.path.join(DEMO_ROOT, 'WIDER')
DEMO_TRAIN_IMAGES = 240
DEMO_VAL_IMAGES = 40
# Demo-only settings (train.py's defaults are the original repository's): a small input, AP as
# the selection rule, and the AP test at a size that keeps the synthetic faces above the
# smallest anchor. See docs/training.md#the-demo for how they were chosen.
DEMO_RECIPE = dict(device='cpu', basenet='none', input_size=160, batch_size=8, epochs=5,
                   lr=1e-3, num_workers=0, amp='off', log_speed=True,
                   val_ap=True, best_by='ap', val_ap_max_size=240)
DEMO_DRAW_THRESH = 0.3  # demo.py --thresh for the drawing: what a model this small scores its faces
DEMO_DRAW_MIN_FACE = 40  # px: the faces the drawing image is chosen by (Easy faces are 50 px and up)


def recipe_argv():
    """train.py's options of the demo (DEMO_RECIPE, its lists and save folder), as a command line."""
    argv = []
    for key, value in DEMO_RECIPE.items():
        if value is True:
            argv.append(f'--{key}')
        else:
            argv += [f'--{key}', str(value)]
    return argv + ['--train_file', os.path.join(DEMO_ROOT, 'face_train.txt'),
                   '--val_file', os.path.join(DEMO_ROOT, 'face_val.txt'),
                   '--save_folder', os.path.join(DEMO_ROOT, 'weights')]


def prepare_data():
    """The synthetic WIDER FACE (generated once) and its list files."""
    from data.synthetic import generate
    import prepare_wider_data

    summary = generate(DEMO_WIDER, DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES, seed=0)
    state = 'reused' if summary.get('reused') else 'generated'
    print(f'Demo: synthetic WIDER FACE {state} in {DEMO_WIDER} '
          f'({summary["train"]["images"]} train / {summary["val"]["images"]} val images)', flush=True)
    prepare_wider_data.main(prepare_wider_data.parse_args(['--dataset_dir', DEMO_WIDER, '--out_dir', DEMO_ROOT]))


def main(argv=None, signals=None):
    """Prepare the data, train with the demo recipe (the options in `argv` override it), report and
    draw. Returns (train.py's TrainState, the signal that stopped it or None, the kept epoch's APs
    or None)."""
    import train

    prepare_data()
    argv = [a for a in (argv or []) if a != '--demo']
    fresh = not any(a == '--resume' or a.startswith('--resume=') for a in argv)
    # A new demo replaces the last one in its own folder (train.py names the files it removes).
    args = train.parse_args(recipe_argv() + (['--overwrite'] if fresh else []) + argv)
    print(f'Demo: training from scratch on the CPU at {args.input_size}x{args.input_size}, '
          f'batch {args.batch_size}, {args.epochs} epochs; the epoch of the best WIDER AP is kept', flush=True)
    state, stop = train.main(args, signals)
    return state, stop, finish_demo(args, state)


def parse_args(argv=None):
    """quickstart.py's own --help; every other option is train.py's. Returns the rest."""
    parser = argparse.ArgumentParser(
        prog='quickstart.py', description='The demo: generate a synthetic WIDER FACE under data/demo/, train S3FD '
        'on it on the CPU for a few minutes with a small recipe, keep the epoch of the best WIDER AP, draw its '
        'detections and print the commands that reproduce its numbers. The same as `python train.py --demo`.',
        epilog='Any train.py option (python train.py --help) overrides the recipe, e.g. --max_iter 20 for a '
               'shorter run, or --resume data/demo/weights/sfd_face_checkpoint.pth to continue one.')
    return parser.parse_known_args(argv)[1]


def cli(argv=None, signals=None):
    """The demo's command line (also `python train.py --demo`); returns the exit status, as train.py."""
    from utils.cli import run_cli
    from utils.training.stop import EXIT_STOPPED, StopSignals

    signals = (signals or StopSignals('train.py')).install()
    rest = parse_args(sys.argv[1:] if argv is None else argv)
    outcome = {}
    status = run_cli(lambda a: outcome.update(stop=main(a, signals)[1]), lambda a: a, rest, prog='train.py', status=2)
    return EXIT_STOPPED if status == 0 and outcome.get('stop') else status


def demo_image(val_file):
    """The validation image the demo draws on: the one with the most faces at least
    DEMO_DRAW_MIN_FACE px tall (the first such on a tie), which a detector this small finds;
    a crowd of tiny faces would show nothing. Returns (path, annotated faces, large faces)."""
    from data.widerface import read_face_list

    paths, boxes = read_face_list(val_file)
    large = [int((faces[:, 3] - faces[:, 1] >= DEMO_DRAW_MIN_FACE).sum()) if len(faces) else 0 for faces in boxes]
    best = max(range(len(paths)), key=lambda i: (large[i], -i))
    return paths[best], len(boxes[best]), large[best]


def finish_demo(args, state):
    """Report the kept checkpoint's AP, draw its detections on one val image and print the
    commands that reproduce both; only when training ran to its end (`state` is train.py's
    TrainState). Returns the kept epoch's APs, or None."""
    import demo
    from utils.training.save_folder import SaveFolder

    folder = SaveFolder(args.save_folder, args.dataset, writer=False)
    if state.epoch < args.epochs or state.unvalidated_epoch is not None:
        print(f'Demo: training stopped at iteration {state.iteration}, in epoch {state.epoch} of {args.epochs}; '
              f'continue it with `python train.py --demo --resume {folder.checkpoint}`', flush=True)
        return None
    best = folder.best
    aps, size = state.best_aps, args.val_ap_max_size
    print(f'Demo: done. {best} holds epoch {state.best_ap_epoch}, the best WIDER AP on the synthetic val '
          f'split (official protocol, single-scale, longer side {size} px): Easy {aps["easy"]:.4f}, '
          f'Medium {aps["medium"]:.4f}, Hard {aps["hard"]:.4f}', flush=True)
    image, annotated, large = demo_image(args.val_file)
    draw = ['--model', best, '--device', 'cpu', '--max_size', str(size), '--thresh', str(DEMO_DRAW_THRESH),
            '--annotations', args.val_file, '--out', os.path.join(DEMO_ROOT, 'detections')]
    (result,) = demo.main(demo.parse_args([image, *draw]))
    print(f'Demo: drew its {result.faces} detections at score >= {DEMO_DRAW_THRESH} on {result.out}: {result.matched} '
          f'on the image\'s {annotated} annotated faces ({large} of them at least {DEMO_DRAW_MIN_FACE} px tall), in '
          f'green, and {result.faces - result.matched} elsewhere, in red', flush=True)
    gt_dir = os.path.join(DEMO_WIDER, 'eval_tools', 'ground_truth')
    commands = [
        ['python', 'wider_test.py', '--model', best, '--dataset_dir', DEMO_WIDER, '--device', 'cpu',
         '--max_size', str(size), '--eval', gt_dir, '--out', os.path.join(DEMO_ROOT, 'predictions')],
        ['python', 'demo.py', image, *draw],
        ['python', 'tools/plot_training.py', folder.metrics],
    ]
    print('Demo: the same AP from prediction files, the drawing, and the training curves:')
    for command in commands:
        print('  ' + ' '.join(shlex.quote(part) for part in command))
    return aps


if __name__ == '__main__':
    sys.exit(cli())
