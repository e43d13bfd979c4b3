"""Dataset construction and batching for training.

    train_set, val_set = dataset_factory('face')
    sampler = EpochBatchSampler(len(train_set), batch_size=16, seed=0, rank=0, world_size=1)
    loader = make_loader(train_set, sampler, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, targets in loader: ...

`EpochBatchSampler` yields batches of `(epoch, index)` pairs so that persistent workers see
the epoch and a training sample stays a pure function of (seed, epoch, index). `make_loader`
switches OpenCV's own threads off in the main process before the workers start (never call
`cv2.setNumThreads` inside a forked worker: after the parent has used OpenCV's thread pool
that call can deadlock).
"""
import os
import sys

import cv2
import torch
from torch.utils.data import DataLoader, Sampler

from data.config import cfg
from data.widerface import WIDERDetection

__all__ = ['dataset_factory', 'detection_collate', 'EpochBatchSampler', 'make_loader', 'usable_workers']

_capped = set()  # (asked, cores) already reported by usable_workers in this process


def dataset_factory(dataset='face', input_size=None, seed=0, train_file=None, val_file=None, normalize=True):
    """Build (train_dataset, val_dataset).

    Args:
        dataset: only 'face' (WIDER FACE) is known.
        input_size: output side S (default cfg.INPUT_SIZE).
        seed: base seed of the training augmentation.
        train_file, val_file: list files (default cfg.FACE.TRAIN_FILE / cfg.FACE.VAL_FILE).
        normalize: False gives uint8 images to finish with `utils.transforms.subtract_mean`
            on the device (see WIDERDetection).
    Returns:
        (WIDERDetection in 'train' mode, WIDERDetection in 'val' mode or None when the
        val list file does not exist; a message says so).
    Raises:
        ValueError for an unknown dataset; FileNotFoundError when the train list is absent;
        IsADirectoryError when either list is a directory (a validation list that is a
        directory is not taken for an absent one).
    """
    if dataset != 'face':
        raise ValueError(f"unknown dataset {dataset!r}: only 'face' (WIDER FACE) is supported")
    train_file = train_file or cfg.FACE.TRAIN_FILE
    val_file = val_file or cfg.FACE.VAL_FILE
    for kind, path in (('training', train_file), ('validation', val_file)):
        if os.path.isdir(path):
            raise IsADirectoryError(f'{kind} list {path} is a directory: give the list file in it that '
                                    f'prepare_wider_data.py wrote (face_train.txt, face_val.txt)')
    if not os.path.isfile(train_file):
        raise FileNotFoundError(f'training list {train_file} not found: run '
                                f'`python prepare_wider_data.py --dataset_dir <WIDER dir>` first '
                                f'or set cfg.FACE.TRAIN_FILE')
    train_set = WIDERDetection(train_file, mode='train', input_size=input_size, seed=seed, normalize=normalize)
    if os.path.isfile(val_file):
        val_set = WIDERDetection(val_file, mode='val', input_size=input_size, seed=seed, normalize=normalize)
    else:
        print(f'dataset_factory: validation list {val_file} not found; training without validation',
              file=sys.stderr, flush=True)
        val_set = None
    return train_set, val_set


def detection_collate(batch):
    """[(image [3, S, S], target [n_i, 5]), ...] -> (images [B, 3, S, S], [target_i, ...]).

    The targets stay a list because every image has its own number of faces.
    """
    images = torch.stack([sample[0] for sample in batch], dim=0)
    targets = [sample[1] for sample in batch]
    return images, targets


class EpochBatchSampler(Sampler):
    """Batches of (epoch, dataset index) for one process of a (possibly distributed) run.

    Args:
        num_samples: dataset length.
        batch_size: images per batch and process.
        seed: run seed; the permutation of epoch e is seeded by (seed, e).
        rank, world_size: this process's shard of every epoch.
        shuffle: False keeps dataset order (validation).
        drop_last: drop the incomplete last batch (training); else keep it.

    `set_epoch(epoch, start_batch)` selects the epoch and skips the batches already done,
    which is how a run resumed mid-epoch continues with exactly the remaining samples.
    """

    def __init__(self, num_samples, batch_size, seed=0, rank=0, world_size=1, shuffle=True,
                 drop_last=True):
        if num_samples <= 0:
            raise ValueError('cannot sample batches from an empty dataset')
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self):
        """Batches of this process per epoch: the same on every process with `drop_last`,
        else enough to cover this process's shard (the last one may be smaller)."""
        if self.drop_last:
            return self.num_samples // self.world_size // self.batch_size
        shard = len(range(self.rank, self.num_samples, self.world_size))
        return -(-shard // self.batch_size)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = epoch
        self.start_batch = start_batch

    def _indices(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.rank::self.world_size]

    def __iter__(self):
        shard = self._indices()
        for b in range(self.start_batch, self.batches_per_epoch):
            yield [(self.epoch, i) for i in shard[b * self.batch_size:(b + 1) * self.batch_size]]

    def __len__(self):
        return max(0, self.batches_per_epoch - self.start_batch)


def usable_workers(asked, option='--num_workers'):
    """The number of data loading processes to start: `asked`, at most the CPU cores this
    process may use (its affinity: a job's share of the machine, as PyTorch counts them).
    More workers than cores only compete for them (PyTorch warns, in two lines, that they may
    run slowly or freeze); a capped number is said once per process, in one line naming
    `option`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if asked <= cores:
        return asked
    if (asked, cores) not in _capped:
        _capped.add((asked, cores))
        print(f'{option} {asked}: this process may use {cores} CPU cores, so {cores} data loading processes '
              f'start (more would only compete for the cores)', file=sys.stderr, flush=True)
    return cores


def make_loader(dataset, batch_sampler, num_workers, pin_memory=False, option='--num_workers'):
    """DataLoader over `batch_sampler` with persistent, prefetching workers: `num_workers`, at
    most the CPU cores this process may use (usable_workers; `option` names the setting in
    the line that says so).

    OpenCV's own thread pool is switched off first when workers are used: the workers already
    run in parallel, and a pool created before the fork can deadlock inside them.
    """
    num_workers = usable_workers(num_workers, option)
    extra = {}
    if num_workers > 0:
        cv2.setNumThreads(0)
        extra = dict(persistent_workers=True, prefetch_factor=4)
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=detection_collate,
                      num_workers=num_workers, pin_memory=pin_memory, **extra)
