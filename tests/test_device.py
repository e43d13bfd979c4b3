"""utils/device.py on the CPU: the precision each --amp gives, and the threads left to the loader."""
import os

import pytest
import torch

from utils.device import DeviceUnavailable, pins_host_memory, setup_device


def test_cpu_precision_and_refusals():
    assert setup_device('cpu').amp == 'off' and setup_device('cpu', amp='native').amp_dtype == torch.bfloat16
    with pytest.raises(DeviceUnavailable, match='--amp apex needs --device npu'):
        setup_device('cpu', amp='apex')
    assert pins_host_memory('cuda') and pins_host_memory('npu') and not pins_host_memory('cpu')


def test_share_cpu_leaves_a_core_per_worker_and_keeps_under_omp_num_threads(monkeypatch):
    runtime = setup_device('cpu')
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)))
    try:
        monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
        assert runtime.share_cpu(num_workers=2) == 6 == torch.get_num_threads()
        assert runtime.share_cpu(num_workers=0, processes=2) == 4
        assert runtime.share_cpu(num_workers=9) == 1
        monkeypatch.setenv('OMP_NUM_THREADS', '3')  # a ceiling set by the user or a scheduler
        assert runtime.share_cpu(num_workers=2) == 3
        monkeypatch.setenv('OMP_NUM_THREADS', 'lots')  # not a number: ignored
        assert runtime.share_cpu(num_workers=2) == 6
    finally:
        torch.set_num_threads(threads)


def test_loss_scale_option_and_the_cpu_context():
    """--loss_scale: a positive number (static) or 'dynamic'; None leaves the recipe's 32 (or, on a
    resume, the checkpoint's). It only concerns the NPU's fp16 recipes: the CPU has no scaler."""
    import argparse
    from utils.cli import loss_scale
    assert loss_scale('64') == 64.0 and loss_scale('Dynamic') == 'dynamic'
    for bad in ('0', '-1', 'inf', 'nan', 'auto'):
        with pytest.raises(argparse.ArgumentTypeError):
            loss_scale(bad)
    runtime = setup_device('cpu', loss_scale='dynamic')
    assert runtime.current_loss_scale() is None and runtime.loss_scale_change() is None and runtime.state_dict() == {}
    net = torch.nn.Linear(2, 2)
    assert runtime.wrap_distributed(net, 1) is net  # one process: no DDP wrapper


def test_train_options_keep_the_recipe_defaults():
    from train import parse_args
    args = parse_args([])
    assert args.loss_scale is None and args.combine_ddp is False and args.amp == 'auto'
    assert parse_args(['--loss_scale', 'dynamic', '--combine_ddp']).loss_scale == 'dynamic'
