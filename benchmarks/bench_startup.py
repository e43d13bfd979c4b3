"""How long each script takes to answer `--help` (the start-up a user waits for before any
work), as one JSON object: seconds per script (the best of --repeats runs), and the slowest.

    python benchmarks/bench_startup.py [--repeats 3] [--scripts train.py wider_test.py ...]

A script that imports PyTorch before parsing its arguments pays that import here (several
seconds on a slow disk); the scripts of this repository parse first.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from utils.cli import HelpFormatter  # noqa: E402
SCRIPTS = ('train.py', 'wider_test.py', 'wider_eval.py', 'demo.py', 'prepare_wider_data.py', 'data/synthetic.py',
           'tools/make_basenet.py', 'tools/convert_official.py', 'tools/export_onnx.py', 'tools/plot_training.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--repeats', type=int, default=3, help='runs per script; the best is reported')
    parser.add_argument('--scripts', nargs='+', default=list(SCRIPTS), help='scripts, relative to the repository')
    return parser.parse_args(argv)


def help_seconds(script, repeats):
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, script, '--help'], cwd=REPO, capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if proc.returncode != 0 or not proc.stdout.startswith('usage:'):
            raise SystemExit(f'bench_startup.py: error: {script} --help failed: {proc.stderr.strip()[-300:]}')
    return best


def main(args):
    start = time.perf_counter()
    subprocess.run([sys.executable, '-c', 'pass'], check=True)  # the interpreter alone, for reference
    interpreter = time.perf_counter() - start
    seconds = {script: round(help_seconds(script, args.repeats), 3) for script in args.scripts}
    slowest = max(seconds, key=seconds.get)
    print(json.dumps({'help_seconds': seconds, 'slowest': slowest, 'slowest_seconds': seconds[slowest],
                      'python_alone_seconds': round(interpreter, 3), 'repeats': args.repeats}))
    return seconds


if __name__ == '__main__':
    main(parse_args())
