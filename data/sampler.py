"""Resumable, distributed batch sampling for training.

The order of an epoch is a pure function of (seed, epoch), each process takes its own
shard, and the batches yield `(epoch, index)` pairs so that WIDERDetection draws the
augmentation of that epoch even inside persistent DataLoader workers.
"""
import torch


class EpochBatchSampler(torch.utils.data.Sampler):
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
        per_process = self.num_samples // self.world_size if self.drop_last else \
            -(-self.num_samples // self.world_size)
        if self.drop_last:
            return per_process // self.batch_size
        return -(-per_process // self.batch_size)

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
            batch = shard[b * self.batch_size:(b + 1) * self.batch_size]
            if batch:
                yield [(self.epoch, i) for i in batch]

    def __len__(self):
        return max(0, self.batches_per_epoch - self.start_batch)
