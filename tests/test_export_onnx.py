"""tools/export_onnx.py: ONNX export of S3FD checked against PyTorch with onnxruntime.

onnx and onnxruntime (and onnxscript for the default exporter) are optional: pip install -r
requirements-onnx.txt. Without them these tests are skipped with that reason.
"""
import importlib.util
import logging
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s3fd import build_s3fd, init_weights_from_scratch
from tools import export_onnx
from utils.cli import UserError
from utils.files.weights import CheckpointError, load_model

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ('onnx', 'onnxruntime'))
HAVE_ONNXSCRIPT = importlib.util.find_spec('onnxscript') is not None
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason='onnx/onnxruntime not installed '
                                '(optional: pip install -r requirements-onnx.txt)')
needs_dynamo = pytest.mark.skipif(not (HAVE_ONNX and HAVE_ONNXSCRIPT), reason='onnx/onnxruntime/onnxscript not '
                                  'installed (optional: pip install -r requirements-onnx.txt)')
MEAN = torch.tensor((123.0, 117.0, 104.0))[:, None, None]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A trained-looking checkpoint: scratch init (non-degenerate activations), random biases."""
    torch.manual_seed(0)
    net = build_s3fd('train')
    init_weights_from_scratch(net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp('onnx') / 'sfd_face.pth'
    torch.save({'weight': net.state_dict(), 'variant': 'reference'}, path)
    return str(path)


def pytorch_outputs(checkpoint, image):
    net = load_model(checkpoint, phase='train').eval()
    with torch.no_grad():
        loc, conf, priors = net(image)
    return loc, F.softmax(conf, dim=-1), priors


def run_onnx(path, image):
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return [torch.from_numpy(o) for o in session.run(['loc', 'conf', 'priors'], {'image': image.numpy()})]


def depends_on(graph, output, graph_input):
    """Whether `output` of the ONNX graph is computed from `graph_input`."""
    producer = {o: n for n in graph.node for o in n.output}
    todo, seen = [output], set()
    while todo:
        name = todo.pop()
        if name == graph_input:
            return True
        if name in seen or name not in producer:
            continue
        seen.add(name)
        todo.extend(i for i in producer[name].input if i)
    return False


def random_image(batch, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 255 - MEAN


@needs_dynamo
def test_dynamic_export_agrees_with_pytorch_on_two_sizes(checkpoint, tmp_path, capsys):
    out = tmp_path / 's3fd.onnx'
    results = export_onnx.main(export_onnx.parse_args(
        ['--model', checkpoint, '--out', str(out), '--input_size', '96', '128', '--dynamic',
         '--check_size', '64', '96']))
    assert set(results) == {(2, 96, 128), (1, 64, 96)}
    assert all(v <= 1e-4 for diffs in results.values() for v in diffs.values())
    printed = capsys.readouterr().out
    assert 'max abs difference loc' in printed and '64x96' in printed
    # Independently of the tool's own check: two further sizes, with last maps of 2x2
    # (160x224), and 1x1 with odd pooled sizes (100x76).
    for batch, h, w, seed in [(1, 160, 224, 5), (2, 100, 76, 6)]:
        image = random_image(batch, h, w, seed)
        got = run_onnx(str(out), image)
        ref = pytorch_outputs(checkpoint, image)
        for name, a, b in zip(('loc', 'conf', 'priors'), got, ref):
            assert a.shape == b.shape, name
            assert (a - b).abs().max().item() <= 1e-4, name
        assert ref[1].std() > 0.01  # scores are not all equal


@needs_dynamo
def test_fixed_size_export_has_constant_priors(checkpoint, tmp_path, capsys, caplog):
    """The default export (dynamo, a fixed size): the priors are a constant of the graph, and
    the exporter's notice that it does not deduplicate that constant output is not printed
    (tools/export_onnx.py's _ConstantPriorsNotice says why it is harmless); the
    TorchScript exporter is exercised by test_failed_check_writes_nothing."""
    import onnx
    out = tmp_path / 'fixed.onnx'
    export_onnx.main(export_onnx.parse_args(['--model', checkpoint, '--out', str(out), '--input_size', '96', '128']))
    printed = capsys.readouterr()
    assert 'deduplication' not in printed.err and 'fixed_priors' not in printed.err + printed.out, printed.err
    # Outside pytest, Python's last-resort handler prints a WARNING record on stderr; here pytest takes it.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    model = onnx.load(str(out))
    assert not depends_on(model.graph, 'priors', 'image')  # a constant of the graph
    assert depends_on(model.graph, 'loc', 'image')
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta['mean_rgb'] == '123.0 117.0 104.0' and meta['variant'] == 'reference'
    image = random_image(3, 96, 128, 7)  # batch stays free
    got = run_onnx(str(out), image)
    ref = pytorch_outputs(checkpoint, image)
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() <= 1e-4
    with pytest.raises(Exception, match='(?i)dimension'):
        run_onnx(str(out), random_image(1, 64, 96, 8))  # fixed height and width


@needs_onnx
def test_failed_check_writes_nothing(checkpoint, tmp_path):
    out = tmp_path / 'never.onnx'
    with pytest.raises(UserError, match='disagrees with PyTorch'):
        export_onnx.main(export_onnx.parse_args(
            ['--model', checkpoint, '--out', str(out), '--input_size', '64', '64', '--exporter', 'torchscript',
             '--atol', '-1', '--rtol', '0']))
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary


@needs_onnx
def test_bad_model_file(tmp_path):
    model = tmp_path / 'model.pth'
    model.write_text('this is not a checkpoint\n')
    with pytest.raises(CheckpointError) as e:
        export_onnx.main(export_onnx.parse_args(['--model', str(model), '--out', str(tmp_path / 'o.onnx')]))
    assert str(e.value).startswith(f'{model}: ')
    assert not (tmp_path / 'o.onnx').exists()


def test_missing_packages_are_named(monkeypatch, tmp_path):
    for name in ('onnx', 'onnxruntime', 'onnxscript'):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(UserError, match='onnx, onnxruntime, onnxscript.*requirements-onnx.txt'):
        export_onnx.main(export_onnx.parse_args(['--model', 'x.pth', '--out', str(tmp_path / 'o.onnx')]))


def test_graph_priors_equal_prior_box():
    """The in-graph priors of --dynamic are PriorBox's, for an odd size too."""
    net = build_s3fd('train').eval()
    image = torch.zeros(1, 3, 100, 76)
    with torch.no_grad():
        feats = net.sources(image)
        ref = net.priors_for(image.shape[-2:], feats, image.device)
    got = export_onnx.graph_priors(image, feats)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
