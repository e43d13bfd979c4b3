"""The CUDA paths give what the CPU paths give, and the training step's loss does not wait for
the GPU. Skipped without a CUDA device (CI has none): run `python -m pytest tests/test_cuda.py`
on a GPU machine."""
import copy
import warnings

import pytest
import torch

from data.config import cfg
from layers.functions.detection import Detect
from layers.functions.prior_box import PriorBox
from layers.modules.l2norm import L2Norm
from layers.modules.multibox_loss import MultiBoxLoss
from s3fd import build_s3fd, init_weights_from_scratch
from benchmarks.bench_layers import MAPS_640, random_faces
from utils.training.engine import FiniteCheck, training_step
from utils import device as devices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (none is available)')


@pytest.fixture
def cuda():
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device('cuda')
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _loss_inputs(batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    priors = PriorBox((640, 640), MAPS_640, cfg).forward()
    loc = torch.randn(batch, len(priors), 4, generator=gen)
    conf = torch.randn(batch, len(priors), 2, generator=gen) * 2
    counts = [1, 7, 0, 40][:batch]
    targets = [random_faces(gen, n) for n in counts]
    return loc, conf, priors, targets


def test_loss_and_gradients_match_cpu(cuda):
    loc, conf, priors, targets = _loss_inputs()
    results = []
    for device in (torch.device('cpu'), cuda):
        loc_d = loc.to(device).detach().requires_grad_()
        conf_d = conf.to(device).detach().requires_grad_()
        loss_l, loss_c = MultiBoxLoss(cfg)((loc_d, conf_d, priors.to(device)), targets)
        (loss_l + loss_c).backward()
        results.append([t.detach().cpu() for t in (loss_l, loss_c, loc_d.grad, conf_d.grad)])
    for cpu_value, gpu_value in zip(*results):
        torch.testing.assert_close(gpu_value, cpu_value, rtol=1e-5, atol=1e-6)


def test_loss_does_not_synchronize_with_the_host(cuda):
    loc, conf, priors, targets = _loss_inputs()
    loc, conf, priors = loc.to(cuda).requires_grad_(), conf.to(cuda).requires_grad_(), priors.to(cuda)
    criterion = MultiBoxLoss(cfg)
    criterion((loc, conf, priors), targets)  # first call: caches, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            loss_l, loss_c = criterion((loc, conf, priors), targets)
            (loss_l + loss_c).backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    syncs = [str(w.message) for w in caught if 'synchroniz' in str(w.message)]
    assert not syncs, syncs


@pytest.mark.parametrize('nms_mode', Detect.NMS_MODES)
def test_detect_matches_cpu(cuda, nms_mode):
    gen = torch.Generator().manual_seed(1)
    priors = PriorBox((640, 640), MAPS_640, cfg).forward()
    loc = torch.randn(2, len(priors), 4, generator=gen) * 0.5
    conf = torch.softmax(torch.randn(2, len(priors), 2, generator=gen) * 2, dim=-1)
    on_cpu = Detect(cfg).forward(loc, conf, priors)
    on_gpu = Detect(cfg, nms_mode=nms_mode).forward(loc.to(cuda), conf.to(cuda), priors.to(cuda)).cpu()
    for b in range(2):
        rows_cpu, rows_gpu = on_cpu[b, 1], on_gpu[b, 1]
        rows_cpu, rows_gpu = rows_cpu[rows_cpu[:, 0] > 0], rows_gpu[rows_gpu[:, 0] > 0]
        assert len(rows_cpu) > 100
        # Decoding on another device may move an IoU across the threshold by one ulp and
        # change a rare decision; every other row must be the same.
        assert abs(len(rows_gpu) - len(rows_cpu)) <= 0.01 * len(rows_cpu)
        nearest = torch.cdist(rows_gpu, rows_cpu, p=float('inf')).min(dim=1).values
        same = int((nearest < 1e-5).sum())
        assert same >= 0.99 * len(rows_cpu), (same, len(rows_gpu), len(rows_cpu), float(nearest.max()))


@pytest.mark.parametrize('channels_last', [False, True])
def test_bf16_training_step_updates_the_weights(cuda, channels_last):
    runtime = devices.setup_device('gpu', amp='native', amp_dtype='bf16')
    torch.manual_seed(0)
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    net.to(runtime.device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = runtime.make_optimizer(net.parameters(), 1e-3, 0.9, 5e-4)
    first_conv = net.vgg[0].weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 160, 224, generator=gen).to(runtime.device) * 60
    targets = [random_faces(gen, 3, 160).clamp(max=1.0), random_faces(gen, 1, 160).clamp(max=1.0)]
    loss, loss_l, loss_c, stepped = training_step(net, MultiBoxLoss(cfg), optimizer, runtime,
                                                  FiniteCheck(runtime.device), images, targets, channels_last)
    assert stepped and torch.isfinite(loss) and loss.dtype == torch.float32
    assert loss_l > 0 and loss_c > 0
    # The trunk feeds every head; the deepest heads may see no positive at 160x224.
    weights = {name: p.grad for name, p in net.named_parameters() if name.startswith('vgg.')}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in weights.values())
    assert not torch.equal(first_conv, net.vgg[0].weight)


@pytest.mark.parametrize('channels_last', [False, True])
def test_l2norm_gradients_match_cpu(cuda, channels_last):
    """The hand-written L2Norm backward on the GPU (bf16 input, as under autocast) gives the
    CPU's gradients, all-zero pixels included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 12, 10, generator=gen).relu().bfloat16()
    x[0, :, 3, 4] = 0
    grad_out = torch.randn(x.shape, generator=gen)
    results = []
    for device in (torch.device('cpu'), cuda):
        layer = L2Norm(64, 10).to(device)
        xd = x.to(device, copy=True)
        if channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last)
        xd.requires_grad_(True)
        y = layer(xd)
        y.backward(grad_out.to(device))
        results.append([t.detach().float().cpu() for t in (y, xd.grad, layer.weight.grad)])
    for cpu_value, gpu_value in zip(*results):
        assert torch.isfinite(gpu_value).all()
        torch.testing.assert_close(gpu_value, cpu_value, rtol=1e-2, atol=1e-3)


def test_network_gradients_match_cpu(cuda):
    """The whole network (trunk, L2Norm, heads) in float32, TF32 off: the GPU's parameter
    gradients are the CPU's."""
    torch.manual_seed(0)
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 160, 224, generator=gen) * 60
    targets = [random_faces(gen, 3, 160).clamp(max=1.0), random_faces(gen, 1, 160).clamp(max=1.0)]
    grads = []
    for device in (torch.device('cpu'), cuda):
        model = copy.deepcopy(net).to(device)
        loss_l, loss_c = MultiBoxLoss(cfg)(model(images.to(device)), targets)
        (loss_l + loss_c).backward()
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    assert torch.isfinite(grads[1]).all()
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-3
