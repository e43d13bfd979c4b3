"""The benchmark and check scripts under benchmarks/ run and print one JSON object (tiny sizes)."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(*args, env=None):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_train_synthetic_and_loader(tmp_path):
    out = run_json('benchmarks/bench_train.py', '--device', 'cpu', '--batch_size', '1', '--input_size', '64',
                   '--steps', '2', '--warmup', '1')
    assert out['images_per_s'] > 0 and out['peak_fraction'] is None and out['precision'] == 'fp32'
    # 0.77 TFLOP per image at 640 (the figure) scales with the pixel count.
    assert abs(out['train_tflop_per_image'] * (640 / 64) ** 2 - 0.77) < 0.03
    out = run_json('benchmarks/bench_train.py', '--device', 'cpu', '--batch_size', '2', '--input_size', '64',
                   '--steps', '2', '--warmup', '1', '--data', 'loader', '--num_workers', '1',
                   '--images', '6', '--data_dir', str(tmp_path))
    assert out['data'] == 'loader' and out['images_per_s'] > 0


def test_check_precision_agrees_on_cpu():
    # 96 px, the smallest square input where conv7_2 (stride 2) does not see a 1x1 map: there
    # oneDNN's bf16 weight gradient of a stride-2 convolution on a 1x1 input has garbage
    # (sometimes NaN) in the taps that see only padding (torch 2.14 on CPU; float32 is right),
    # and first_nonfinite reports those weights. bf16 on a CPU without native bf16 is emulated
    # and slow: one image, two steps.
    out = run_json('benchmarks/check_precision.py', '--device', 'cpu', '--input_size', '96', '--batch_size', '1',
                   '--steps', '2')
    assert out['ok'] and len(out['fp32_losses']) == 2
    # bf16 gradients at the same weights: within a few percent of float32's
    assert 0 < out['first_update_rel_diff'] < 0.1
    assert out['first_nonfinite'] == {'fp32': None, 'amp': None}


def test_check_compile_float32_compiled_step_equals_eager(tmp_path):
    size, batch = 64, 2
    # A cache of its own, as on a fresh machine: Inductor's on-disk cache does not key on
    # ATEN_CPU_CAPABILITY, and kernels cached by a run under another value of it corrupt the
    # heap when reused (torch 2.14, seen as "corrupted size vs. prev_size").
    # Scalar C++ kernels (cpp.vec_isa_ok=False): Inductor compiles about 50 of them for this step,
    # each a g++ run, and the vectorised ones take half as long again to build on 2 cores; the
    # check (the same graph, reordered float32 sums) is the same.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / 'inductor'))
    out = run_json('benchmarks/check_compile.py', '--device', 'cpu', '--input_size', str(size), '--batch_size',
                   str(batch), '--steps', '2', '--amp', 'off', '--inductor', 'comprehensive_padding=False',
                   '--inductor', 'cpp.vec_isa_ok=False', env=env)
    assert out['ok'] and out['inductor'] == {'comprehensive_padding': False, 'cpp.vec_isa_ok': False}
    # Both runs are float32; the generated kernels add in other orders than eager's (and than
    # each other on CPUs with and without AVX-512). Reordering a float32 sum of n terms moves it
    # by up to about n * 2**-24 of the summed magnitudes. The longest sums of a step are the
    # weight gradients of the first convolutions, over batch * H * W terms: 8192 here, 4.9e-4.
    # Twice that covers the layers a gradient goes through (seen: below 1e-4 with AVX-512
    # kernels, 4.65e-4 with AVX2 ones). The loss's sums are shorter.
    bound = 2 * batch * size * size * 2 ** -24
    assert out['grad_rel_diff'] < bound and out['loss_rel_diff'] < bound
    assert out['nonfinite_grads'] == {'eager': [], 'compiled': []}
    assert out['first_nonfinite_step'] == {'eager': None, 'compiled': None}
    assert abs(out['compiled_losses'][-1] - out['eager_losses'][-1]) < 1e-3


def test_check_compile_rejects_an_unknown_inductor_option():
    proc = subprocess.run([sys.executable, 'benchmarks/check_compile.py', '--device', 'cpu', '--inductor', 'no_such=1'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("check_compile.py: error: --inductor 'no_such=1'")


def test_bench_layers_prints_timings():
    out = run_json('benchmarks/bench_layers.py', '--repeat', '1', '--batch_size', '1', '--l2norm_batch', '1',
                   '--detect_batches', '2')
    assert out['priors'] == 34125 and out['loss_s'] > 0 and out['detect_kept'] == 750
    assert all(set(times) == {'batch2_s'} for times in out['detect_modes'].values()) and out['l2norm']['layer']['fwd_bwd_s'] > 0


def test_profile_train_splits_the_step_by_phase_and_kind(tmp_path):
    trace = tmp_path / 'trace.json'
    out = run_json('benchmarks/profile_train.py', '--device', 'cpu', '--batch_size', '1', '--input_size', '96',
                   '--steps', '1', '--warmup', '0', '--trace', str(trace))
    assert all(out['phases_ms'][phase] > 0 for phase in ('forward', 'loss', 'backward', 'optimizer'))
    kinds = out['kinds']
    for kind in ('convolution', 'relu', 'pooling', 'l2norm', 'heads', 'loss', 'optimizer'):
        assert kinds[kind]['ms'] > 0 and kinds[kind]['gb_moved'] > 0, kind
    assert abs(sum(k['ms'] for k in kinds.values()) - out['device_ms_per_step']) < 0.01 * out['device_ms_per_step']
    assert abs(sum(k['gb_moved'] for k in kinds.values()) - out['gb_moved_per_step']) < 0.01
    # the optimizer reads and writes every parameter, its gradient and momentum (22.5 M float32
    # parameters: at least 5 passes of 90 MB)
    assert kinds['optimizer']['gb_moved'] > 0.45
    # at least the ReLU outputs of conv1_1 and conv1_2 in bf16 (64 x 96 x 96 x 2 bytes each)
    assert 2 * 64 * 96 * 96 * 2 / 1e9 < out['saved_for_backward_gb'] < 1
    assert out['top_ops'][0]['kind'] == 'convolution'
    assert {op['phase'] for op in out['top_ops']} >= {'forward', 'backward'}
    assert trace.stat().st_size > 0


def test_profile_device_times_count_each_kernel_once():
    """On a GPU the profiler lists a kernel as its launching operator's device time and again
    as a device event of its own: only the first is attributed, the second is the check sum."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.profile_train import device_times
    label = SimpleNamespace(name='S3FD|backward|vgg.0|Conv2d', cpu_parent=None, device_type=DeviceType.CPU,
                            self_device_time_total=0.0, self_cpu_time_total=5.0)
    conv = SimpleNamespace(name='aten::convolution_backward', cpu_parent=label, device_type=DeviceType.CPU,
                           self_device_time_total=3000.0, self_cpu_time_total=40.0)
    kernel = SimpleNamespace(name='sm90_xmma_dgrad', cpu_parent=None, device_type=DeviceType.CUDA,
                             self_device_time_total=3000.0, self_cpu_time_total=0.0)
    prof = SimpleNamespace(events=lambda: [label, conv, kernel])
    times, kernels_ms = device_times(prof, on_device=True)
    assert sum(times.values()) == pytest.approx(3.0) and kernels_ms == pytest.approx(3.0)
    assert list(times) == [('backward', 'convolution', 'aten::convolution_backward')]
    times, kernels_ms = device_times(prof, on_device=False)
    assert kernels_ms is None and sum(times.values()) == pytest.approx(0.04)


def test_face_scale_shows_validation_faces_smaller_than_the_training_crops(tmp_path):
    """What docs/training.md explains the rising validation loss with: at a small input the
    whole validation images leave their faces smaller than the training crops do, and the same
    weights lose more on them than on the same images cropped as in training."""
    sys.path.insert(0, REPO)
    from benchmarks import face_scale
    from conftest import synthetic_lists
    from s3fd import build_s3fd, init_weights_from_scratch

    train_file, val_file = synthetic_lists(tmp_path, train=6, val=6)
    net = build_s3fd('train')
    torch.manual_seed(0)
    init_weights_from_scratch(net)
    torch.save(net.state_dict(), tmp_path / 'w.pth')
    out = face_scale.main(face_scale.parse_args(['--train_file', train_file, '--val_file', val_file,
                                                 '--input_size', '96', '--model', str(tmp_path / 'w.pth')]))
    train, val, cropped = out['train'], out['val'], out['val_cropped']
    assert val['images'] == 6 and 0 < cropped['images'] <= 6 and 0 < train['images'] <= 6
    assert val['faces'] > 0 and cropped['faces'] > 0  # a crop keeps some of an image's faces
    assert val['face_px']['p50'] < cropped['face_px']['p50']
    assert val['below_anchor'] > cropped['below_anchor']
    assert val['positives_per_image'] < cropped['positives_per_image']
    loss = val['loss'][str(tmp_path / 'w.pth')]
    assert loss['loss'] == pytest.approx(loss['loc'] + loss['conf'], abs=2e-4) and loss['loss'] > 0


def test_gpu_benchmarks_sh_help_prints_the_usage_and_runs_nothing(tmp_path):
    """`--help` used to become the output folder, and every step ran."""
    script = os.path.join(REPO, 'benchmarks', 'gpu_benchmarks.sh')
    proc = subprocess.run(['bash', script, '--help'], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == ''
    assert proc.stdout.startswith('usage: bash benchmarks/gpu_benchmarks.sh [-h] [OUT_DIR] [IMAGE]\n'
                                  "Every GPU measurement behind docs/performance.md's H200 table")
    assert 'BENCH_ONLY' in proc.stdout and not any(tmp_path.iterdir())
    proc = subprocess.run(['bash', script, '-n'], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith('gpu_benchmarks.sh: error: '
                                                                          'unrecognized option -n')
    assert not any(tmp_path.iterdir())
