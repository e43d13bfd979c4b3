"""Dataset construction and batching for training.

    train_set, val_set = dataset_factory('face')
    loader = DataLoader(train_set, batch_size=16, sampler=EpochSampler(len(train_set), seed=0),
                        collate_fn=detection_collate, num_workers=4, persistent_workers=True)

`EpochSampler` yields `(epoch, index)` pairs so that persistent workers see the epoch and a
training sample stays a pure function of (seed, epoch, index).

With worker processes, limit OpenCV's own threads in the main process before the loader
starts them (`cv2.setNumThreads(0)` or 1): the workers already run in parallel. Do not call
`cv2.setNumThreads` inside a forked worker: after the parent has used OpenCV's thread pool
that call can deadlock.
"""
import os
import sys

import numpy as np
import torch
from torch.utils.data import Sampler

from data.config import cfg
from data.widerface import WIDERDetection

__all__ = ['dataset_factory', 'detection_collate', 'EpochSampler']


def dataset_factory(dataset='face', input_size=None, seed=0, train_file=None, val_file=None):
    """Build (train_dataset, val_dataset).

    Args:
        dataset: only 'face' (WIDER FACE) is known.
        input_size: output side S (default cfg.INPUT_SIZE).
        seed: base seed of the training augmentation.
        train_file, val_file: list files (default cfg.FACE.TRAIN_FILE / cfg.FACE.VAL_FILE).
    Returns:
        (WIDERDetection in 'train' mode, WIDERDetection in 'val' mode or None when the
        val list file does not exist; a message says so).
    Raises:
        ValueError for an unknown dataset; FileNotFoundError when the train list is absent.
    """
    if dataset != 'face':
        raise ValueError(f"unknown dataset {dataset!r}: only 'face' (WIDER FACE) is supported")
    train_file = train_file or cfg.FACE.TRAIN_FILE
    val_file = val_file or cfg.FACE.VAL_FILE
    if not os.path.isfile(train_file):
        raise FileNotFoundError(f'training list {train_file} not found: run '
                                f'`python prepare_wider_data.py --dataset_dir <WIDER dir>` first '
                                f'or set cfg.FACE.TRAIN_FILE')
    train_set = WIDERDetection(train_file, mode='train', input_size=input_size, seed=seed)
    if os.path.isfile(val_file):
        val_set = WIDERDetection(val_file, mode='val', input_size=input_size, seed=seed)
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


class EpochSampler(Sampler):
    """Yields `(epoch, index)` for every sample once per epoch.

    The order is a permutation drawn from (seed, epoch) when `shuffle`, else 0..n-1.
    Call `set_epoch(e)` before each epoch; `start` skips the first samples of the epoch
    (resuming mid-epoch with the same order).
    """

    def __init__(self, num_samples, seed=0, shuffle=True, epoch=0):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = int(epoch)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.epoch = int(epoch)
        self.start = int(start)

    def order(self):
        """The index order of the current epoch, int64 [num_samples]."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, self.epoch, 0x5A3]).permutation(self.num_samples)

    def __iter__(self):
        for index in self.order()[self.start:]:
            yield self.epoch, int(index)

    def __len__(self):
        return max(0, self.num_samples - self.start)
