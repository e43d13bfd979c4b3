"""Run train.py's main() under the fake torch_npu / Ascend Apex, several times in one process, and
print what the fake saw as one JSON line (the last line of stdout). Used by tests/test_npu.py.

    python tests/fake_ascend/drive_train.py '<json spec>'
    torchrun --nproc_per_node 2 tests/fake_ascend/drive_train.py '<json spec>'

spec: {"runs": [{"argv": [...], "loss_factor": 1.0, "factor_ranks": null, "soc": null}, ...],
"report": null}. Each run calls train.cli(argv), as `python train.py argv` does. loss_factor
multiplies the loss (a finite loss whose fp16 gradients overflow), on the ranks listed in
factor_ranks (default: every rank); soc switches the fake SoC for that run. Each run's report:
exit code (None when main() returned), its ledger events by phase ('step' for every training
step but the first of the run, whose one-time set-up is 'first_step'), the options set, and
'weights': sha256 digests of this process's weights at the run's end (under Apex O2 the fp16
model weights and the fp32 masters), so that ranks can be compared, not only rank 0's checkpoint. Each
run's output starts with a line '-- drive_train.py: run <i>'. Printed as the last line, or
written to <report>/report-<RANK>.json when "report" names a folder (one file per torchrun
process).
"""
import collections
import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch_npu  # noqa: E402,F401  (before train.py's imports, as a user's environment has it)
from torch_npu import _core  # noqa: E402

import train  # noqa: E402
from layers.modules import multibox_loss  # noqa: E402
from utils import device as devices  # noqa: E402
from utils.training import engine  # noqa: E402


def digest(tensors):
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def weights(optimizer):
    """Digests of the weights a run ends with (the optimizer's parameters; under Apex O2 the fp16
    model weights and the fp32 masters that replaced them in the optimizer), or None."""
    if optimizer is None:
        return None
    params = [p for group in optimizer.param_groups for p in group['params']]
    stash = getattr(optimizer, '_amp_stash', None)
    if stash is not None and hasattr(stash, 'all_fp16_params'):
        return {'model': digest(stash.all_fp16_params), 'masters': digest(params)}
    return {'model': digest(params)}


def main(spec):
    reports = []
    real_step, real_loss, real_setup = engine.training_step, multibox_loss.MultiBoxLoss, devices.setup_device
    contexts = []  # the optimizers of the run

    def setup_device(*args, **kwargs):
        runtime = real_setup(*args, **kwargs)
        make_optimizer = runtime.make_optimizer

        def record(*a, **k):
            contexts.append(make_optimizer(*a, **k))
            return contexts[-1]
        runtime.make_optimizer = record
        return runtime
    devices.setup_device = setup_device
    for index, run in enumerate(spec['runs']):
        contexts.clear()
        if os.environ.get('RANK', '0') == '0':
            print(f'-- drive_train.py: run {index}', flush=True)
        _core.LEDGER.clear()
        if run.get('soc'):
            _core.STATE.soc = _core.SOC_VERSIONS[run['soc']]
        steps = [0]

        def training_step(*args, **kwargs):
            _core.LEDGER.phase = 'step' if steps[0] else 'first_step'
            steps[0] += 1
            try:
                return real_step(*args, **kwargs)
            finally:
                _core.LEDGER.phase = None

        factor = run.get('loss_factor', 1.0)
        ranks = run.get('factor_ranks')
        if ranks is not None and int(os.environ.get('RANK', '0')) not in ranks:
            factor = 1.0

        class ScaledLoss(real_loss):
            def forward(self, predictions, targets):
                loss_l, loss_c = super().forward(predictions, targets)
                return loss_l * factor, loss_c * factor

        engine.training_step = training_step
        multibox_loss.MultiBoxLoss = ScaledLoss if factor != 1.0 else real_loss
        try:
            code = train.cli(run['argv']) or None
        except SystemExit as e:
            code = e.code
        finally:
            engine.training_step, multibox_loss.MultiBoxLoss = real_step, real_loss
        events = collections.Counter((e['phase'] or '', e['kind'], e['detail'], e['where'])
                                     for e in _core.LEDGER.events)
        reports.append({'exit': code, 'steps': steps[0], 'upstream': torch_npu._upstream.root(),
                        'events': [list(k) + [n] for k, n in sorted(events.items())],
                        'options': dict(_core.STATE.options),
                        'weights': weights(contexts[-1] if contexts else None)})
    sys.stdout.flush()
    if spec.get('report'):
        with open(os.path.join(spec['report'], f"report-{os.environ.get('RANK', '0')}.json"), 'w') as f:
            json.dump(reports, f)
    else:
        print(json.dumps(reports))


if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
