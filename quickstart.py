"""The quick start behind `python train.py --demo`: the whole pipeline on a synthetic WIDER
FACE, on the CPU.

Generates the synthetic dataset under data/demo/WIDER (once), writes its list files,
trains from scratch at a reduced input size for a few minutes, validates every epoch, then
scores the best checkpoint on the synthetic val split with the official protocol.
"""
import os

DEMO_ROOT = os.path.join('data', 'demo')
DEMO_WIDER = os.path.join(DEMO_ROOT, 'WIDER')
DEMO_TRAIN_IMAGES = 240
DEMO_VAL_IMAGES = 40
DEMO_RECIPE = dict(device='cpu', basenet='none', input_size=160, batch_size=8, epochs=5,
                   lr=1e-3, num_workers=0, amp='off', log_speed=True)


def prepare_demo(args):
    """Create the synthetic data and list files; set args to the demo recipe."""
    from data.synthetic import generate
    import prepare_wider_data

    summary = generate(DEMO_WIDER, DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES, seed=0)
    state = 'reused' if summary.get('reused') else 'generated'
    print(f'Demo: synthetic WIDER FACE {state} in {DEMO_WIDER} '
          f'({summary["train"]["images"]} train / {summary["val"]["images"]} val images)', flush=True)
    prepare_wider_data.main(prepare_wider_data.parse_args(['--dataset_dir', DEMO_WIDER, '--out_dir', DEMO_ROOT]))
    for key, value in DEMO_RECIPE.items():
        setattr(args, key, value)
    args.train_file = os.path.join(DEMO_ROOT, 'face_train.txt')
    args.val_file = os.path.join(DEMO_ROOT, 'face_val.txt')
    args.save_folder = os.path.join(DEMO_ROOT, 'weights')
    print(f'Demo: training from scratch on the CPU at {args.input_size}x{args.input_size}, '
          f'batch {args.batch_size}, {args.epochs} epochs', flush=True)


def finish_demo(args, state):
    """Score the best checkpoint on the synthetic val split and say where the weights are;
    only when training ran to its end (`state` is train.py's loop state)."""
    import wider_test

    if state['epoch'] < args.epochs or state['unvalidated_epoch'] is not None:
        checkpoint = os.path.join(args.save_folder, 'sfd_face_checkpoint.pth')
        print(f'Demo: training stopped at iteration {state["iteration"]}, in epoch {state["epoch"]} of '
              f'{args.epochs}; continue it with `python train.py --demo --resume {checkpoint}`', flush=True)
        return
    best = os.path.join(args.save_folder, 'sfd_face.pth')
    pred_dir = os.path.join(DEMO_ROOT, 'predictions')
    gt_dir = os.path.join(DEMO_WIDER, 'eval_tools', 'ground_truth')
    aps = wider_test.main(wider_test.parse_args([
        '--model', best, '--dataset_dir', DEMO_WIDER, '--split', 'val', '--out', pred_dir,
        '--device', 'cpu', '--max_size', str(args.input_size * 2), '--eval', gt_dir]))
    print(f'Demo: done. Best checkpoint: {best}; predictions in {pred_dir}')
    return aps
