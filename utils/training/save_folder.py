"""A training run's save folder (--save_folder, `weights/` by default): the one place that knows
its file names and its rules.

    sfd_face.pth               the best model by --best_by (weights only)
    sfd_face_checkpoint.pth    the full, resumable checkpoint (utils/training/checkpoint.py)
    sfd_face_<iteration>.pth   the weights after iteration i, when i != 0 and i % cfg.SAVE_INTERVAL == 0
    metrics.jsonl              one row per validated epoch (tools/plot_training.py draws it)
    .sfd_run.lock              held by the run that uses the folder (utils/files/folder_lock.py)

One process writes (under torchrun, global rank 0): on the others the writing methods do nothing.
A folder holds one run: a new run is refused where another left its checkpoint or best weights,
unless it continues that run (--resume) or replaces it (--overwrite, which removes its files).
"""
import json
import math
import os
import re
import shlex
import time

from data.config import cfg
from utils.cli import UserError
from utils.files.fileio import OutputDirError, check_free_space, format_bytes, make_output_dir, remove_stale_temporaries
from utils.files.folder_lock import FolderLock

METRICS_NAME = 'metrics.jsonl'


def _date(path):
    return time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(path)))


def _json_safe(value):
    """NaN and inf as null: strict JSON readers refuse them (a diverged epoch's loss is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def metrics_rows(lines, path):
    """The rows of metrics.jsonl's `lines`, one per epoch (its last row, when a resumed run wrote
    an epoch again), in epoch order. A last line cut short by a crash is left out; any other bad
    line is a UserError naming the file and the line."""
    rows = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a write cut short by a crash
            raise UserError(f'{path}:{number}: not a JSON object') from None
        if not isinstance(row, dict) or not isinstance(row.get('epoch'), int):
            raise UserError(f'{path}:{number}: a row without an integer "epoch"')
        rows[row['epoch']] = row
    return [rows[epoch] for epoch in sorted(rows)]


def read_metrics(path):
    """metrics_rows of the file at `path`; UserError in one line when it cannot be read."""
    try:
        with open(path, encoding='utf-8-sig') as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise UserError(f'{path}: no such file (train.py writes {METRICS_NAME} in its --save_folder)') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f'{path}: cannot read the file ({exc})') from None
    return metrics_rows(lines, path)


class SaveFolder:
    """The files of one training run. `writer`: whether this process writes them;
    `checkpoint_interval`: the full checkpoint every N iterations inside an epoch (0: never)."""

    def __init__(self, path, dataset='face', writer=True, checkpoint_interval=0, option='--save_folder'):
        self.path, self.dataset, self.writer, self.option = path, dataset, writer, option
        self.checkpoint_interval = checkpoint_interval
        self.created = False  # by this run's claim: removed again if the run leaves nothing in it
        self.best = os.path.join(path, f'sfd_{dataset}.pth')
        self.checkpoint = os.path.join(path, f'sfd_{dataset}_checkpoint.pth')
        self.metrics = os.path.join(path, METRICS_NAME)
        self.lock = None

    def numbered(self, iteration):
        return os.path.join(self.path, f'sfd_{self.dataset}_{iteration}.pth')

    @staticmethod
    def checkpoint_beside(weights_path):
        """The checkpoint of the run that wrote `weights_path` (its best or a numbered weights
        file), in the same folder; None for a file of another name."""
        folder, name = os.path.split(weights_path)
        match = re.fullmatch(r'sfd_(?P<dataset>[A-Za-z]+)(_\d+)?\.pth', name)
        return SaveFolder(folder, match['dataset'], writer=False).checkpoint if match else None

    def output_pattern(self):
        """The names of the files a run writes here (another dataset's or tool's files, the basenet, are
        not its business)."""
        return re.compile(rf'sfd_{re.escape(self.dataset)}(_checkpoint|_\d+)?\.pth')

    # -- when files are written ------------------------------------------------------------------

    @staticmethod
    def weights_due(iteration):
        """Whether the step of (0-based) `iteration` is followed by sfd_face_<iteration>.pth, the
        original repository's rule."""
        return iteration != 0 and iteration % cfg.SAVE_INTERVAL == 0

    def saves_due(self, iteration, iterations_done, epoch_done):
        """(a numbered weights file, the full checkpoint) due after the step of `iteration`, with
        `iterations_done` steps done in all; none of the latter at the end of an epoch, whose own
        checkpoint follows its validation."""
        checkpoint = (self.checkpoint_interval > 0 and iterations_done % self.checkpoint_interval == 0
                      and not epoch_done)
        return self.weights_due(iteration), checkpoint

    @staticmethod
    def numbered_saves(first, last):
        """How many of the iterations first..last-1 are followed by a numbered weights file."""
        if last <= first:
            return 0
        return max(0, (last - 1) // cfg.SAVE_INTERVAL - (max(first, 1) - 1) // cfg.SAVE_INTERVAL)

    # -- the run that is here ---------------------------------------------------------------------

    def run_files(self):
        """The names of the files a run wrote here: checkpoint, best weights, numbered weights,
        metrics.jsonl (sorted)."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        pattern = self.output_pattern()
        return sorted(n for n in names if pattern.fullmatch(n) or n == METRICS_NAME)

    def previous_run(self):
        """What a run left here, as words for a message ('a checkpoint at iteration 4, saved
        2026-12-04 21:03 and best weights saved 2026-12-04 21:02'), or None when there is no
        checkpoint and no best weights."""
        parts = []
        if os.path.isfile(self.checkpoint):
            try:
                import torch  # here: a folder check before anything heavy otherwise

                saved = torch.load(self.checkpoint, map_location='cpu', weights_only=True, mmap=True)
                what = f"a checkpoint at iteration {saved['state']['iteration']}"
            except Exception:  # any damage: it is still another run's file
                what = 'a checkpoint (unreadable)'
            parts.append(f'{what}, saved {_date(self.checkpoint)}')
        if os.path.isfile(self.best):
            parts.append(f'best weights saved {_date(self.best)}')
        return ' and '.join(parts) or None

    def remove_run(self):
        """Remove the files a run wrote here (run_files); returns their names."""
        names = self.run_files()
        for name in names:
            try:
                os.remove(os.path.join(self.path, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise OutputDirError(f'{self.option} {self.path}: cannot remove {name} of the earlier run '
                                     f'({exc.strerror or exc})') from None
        return names

    # -- the run's claim on the folder -----------------------------------------------------------

    def claim(self, advice=None):
        """Make the folder, take its lock and remove the temporary files of this run's outputs
        that killed saves left (no live process can be writing them any more). Returns
        (temporaries removed, bytes freed). FolderInUseError / OutputDirError in one line."""
        if not self.writer:
            return 0, 0
        self.created = not os.path.isdir(self.path)
        make_output_dir(self.path, self.option)
        self.lock = FolderLock(self.path, self.option, advice).acquire()
        if not self.lock.enforced:  # another run might be writing them
            return 0, 0
        try:
            return remove_stale_temporaries(self.path, self.output_pattern())
        except OutputDirError:
            self.release()
            raise

    def release(self):
        """Let the folder go; a folder this run made and left empty (it stopped before any save:
        e.g. a refused model) goes too."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created:
            try:
                os.rmdir(self.path)  # only when empty
            except OSError:
                pass

    def check_space(self, weights_bytes, first_iteration, last_iteration, epoch, with_best):
        """Raise DiskFullError unless the folder has room for what the coming epoch saves: the
        checkpoint at its end (the size of the current one, else twice `weights_bytes`: weights and
        SGD momentum), one `weights_bytes` per numbered file among iterations first..last-1, and the
        best model when `with_best` (the epoch ends with a validation) and there is none yet (an
        existing one is replaced before the checkpoint is, and is smaller). So a full disk stops
        the run before the epoch's work rather than after it. Returns the bytes needed."""
        if not self.writer:
            return 0
        try:
            checkpoint_bytes = os.path.getsize(self.checkpoint)
        except OSError:
            checkpoint_bytes = 2 * weights_bytes
        saves = self.numbered_saves(first_iteration, last_iteration)
        if with_best and not os.path.exists(self.best):
            saves += 1
        needed = checkpoint_bytes + saves * weights_bytes
        what = f'the checkpoint ({format_bytes(checkpoint_bytes)})'
        if saves:
            what += (f' and a weights file ({format_bytes(weights_bytes)})' if saves == 1
                     else f' and {saves} weights files of {format_bytes(weights_bytes)} each')
        resume = (f'then resume with --resume {shlex.quote(self.checkpoint)}' if os.path.isfile(self.checkpoint)
                  else 'then start again')
        check_free_space(self.path, needed, f'{what} saved by epoch {epoch}',
                         f'stopped before epoch {epoch} rather than after it: free some space or give another '
                         f'{self.option}, {resume}', label=f'{self.option} {self.path}')
        return needed

    # -- writing ------------------------------------------------------------------------------------

    def save_weights(self, state_dict, path):
        """A weights file (the best model, a numbered one), written atomically."""
        if self.writer:
            from utils.files.weights import atomic_save  # here: the folder's rules need no PyTorch

            atomic_save(state_dict, path)

    def append_metrics(self, row):
        """Append one epoch's row to metrics.jsonl, synced (NaN and inf written as null). A resumed run
        may write an epoch again; readers take its last row."""
        if not self.writer:
            return
        try:
            with open(self.metrics, 'a', encoding='utf-8') as handle:
                handle.write(json.dumps(_json_safe(row), allow_nan=False) + '\n')
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise OutputDirError(f'{self.metrics}: cannot add the row of epoch {row.get("epoch")} '
                                 f'({exc.strerror or exc}); the last checkpoint is kept') from None
