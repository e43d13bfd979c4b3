"""Shared test fixtures: repository root on sys.path, the real WIDER FACE files in ../shared."""
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

SHARED_WIDER = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'widerface')
REAL_IMAGE = os.path.join(SHARED_WIDER, 'WIDER_val', 'images', '0--Parade',
                          '0_Parade_marchingband_1_465.jpg')
REAL_VAL_ANNOTATIONS = os.path.join(SHARED_WIDER, 'wider_face_split', 'wider_face_val_bbx_gt.txt')
REAL_GT_DIR = os.path.join(SHARED_WIDER, 'eval_tools', 'ground_truth')

if os.environ.get('PYTEST_XDIST_WORKER'):
    # pytest -n N: N test processes share the cores. One OpenMP thread each (and in the
    # processes they start, and in train.py's share_cpu): threads that outnumber the cores
    # spin-wait for each other and run many times slower.
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def synthetic_lists(root, train=10, val=4, seed=3):
    """A synthetic WIDER FACE under root/WIDER and its list files (prepare_wider_data.py's):
    returns (train list, val list) paths."""
    import prepare_wider_data
    from data.synthetic import generate

    generate(str(root / 'WIDER'), train, val, seed=seed)
    prepare_wider_data.main(prepare_wider_data.parse_args(['--dataset_dir', str(root / 'WIDER'),
                                                           '--out_dir', str(root)]))
    return str(root / 'face_train.txt'), str(root / 'face_val.txt')


# torch_npu's pure-Python files that the tests run on the fake torch_npu (tests/fake_ascend/torch_npu/_upstream.py)
TORCH_NPU_FILES = ['torch_npu/utils/combine_tensors.py', 'torch_npu/optim/npu_fused_optim_base.py',
                   'torch_npu/optim/npu_fused_sgd.py', 'torch_npu/npu/amp/common.py',
                   'torch_npu/npu/amp/grad_scaler.py', 'torch_npu/version.py']
TORCH_NPU_WHEEL_DIR = os.environ.get('TORCH_NPU_WHEEL_DIR') or os.path.join(REPO_ROOT, '.cache', 'torch-npu')


def extract_torch_npu_files(dest):
    """TORCH_NPU_FILES from the downloaded torch-npu wheel (.ci/run downloads it) into `dest`;
    returns str(dest), or None without the wheel."""
    import glob
    import zipfile
    wheels = sorted(glob.glob(os.path.join(TORCH_NPU_WHEEL_DIR, 'torch_npu-*.whl')))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in TORCH_NPU_FILES:
            wheel.extract(name, dest)
    return str(dest)


def computed_once(tmp_path_factory, name, compute):
    """compute(folder) once per test session, its JSON result shared by the pytest-xdist workers:
    the first worker to ask runs it (the runs that train are the suite's most expensive part),
    the others wait for it and read the result. A failure is not kept: the next asks again."""
    import json
    import shutil

    from filelock import FileLock  # a dependency of torch
    base = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        base = base.parent  # the session's folder, above each worker's own
    folder, result = base / f'shared_{name}', base / f'shared_{name}.json'
    with FileLock(str(base / f'shared_{name}.lock')):
        if result.exists():
            return json.loads(result.read_text())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        value = compute(folder)
        result.write_text(json.dumps(value))
        return value


def require_shared(path):
    """Skip the calling test when the real WIDER FACE file is not beside the checkout."""
    if not os.path.exists(path):
        pytest.skip(f'real WIDER FACE data not found at {path} (../shared/widerface is absent)')
    return path


@pytest.fixture
def real_image_path():
    return require_shared(REAL_IMAGE)


@pytest.fixture
def real_val_annotations():
    return require_shared(REAL_VAL_ANNOTATIONS)


@pytest.fixture
def real_gt_dir():
    return require_shared(REAL_GT_DIR)


def pytest_xdist_auto_num_workers(config):
    """-n auto: one test process per core this process may use (a CI runner's affinity, not the
    host's core count), at most 4: the slowest test files, not the cores, bound the time beyond."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(4, cores))
