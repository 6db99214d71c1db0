"""A distributed batch sampler that is a pure function of (seed, epoch), so training can resume mid-epoch.

Epoch e uses the order `np.random.default_rng([seed, e]).permutation(n)` (0..n-1 unshuffled).
- drop_last: the order is cut to a multiple of num_replicas * batch_size; every batch is full.
- otherwise: it is padded to a multiple of num_replicas by repeating its first indices, so every
  rank gets the same number of samples (and batches); the padding positions are reported by
  `epoch_indices` so evaluation can drop the duplicates.
Rank r takes positions r, r + R, r + 2R, ... of that order (R = num_replicas), so batch k of all
ranks together is the contiguous slice [k*B*R, (k+1)*B*R) of the epoch order.
"""
import numpy as np
import paddle

from ppmoco.errors import ConfigError


class DistributedBatchSampler(paddle.io.BatchSampler):
    """Yields this rank's batches (lists of dataset indices) of the epoch set by `set_epoch`."""

    def __init__(self, dataset_len, batch_size, num_replicas, rank, shuffle=True, drop_last=True, seed=0):
        if not (dataset_len > 0 and batch_size > 0 and num_replicas > 0 and 0 <= rank < num_replicas):
            raise ValueError(f"need dataset_len, batch_size, num_replicas > 0 and 0 <= rank < num_replicas; got "
                             f"{dataset_len}, {batch_size}, {num_replicas}, {rank}")
        if drop_last and dataset_len < batch_size * num_replicas:
            raise ConfigError(f"the dataset has {dataset_len} samples, fewer than one global batch "
                              f"({num_replicas} ranks x batch_size {batch_size}); lower batch_size")
        # Deliberately no super().__init__: it wants a dataset or sampler; DataLoader only needs the type.
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        global_batch = batch_size * num_replicas
        if drop_last:
            self.total_size = dataset_len // global_batch * global_batch
        else:
            self.total_size = -(-dataset_len // num_replicas) * num_replicas
        self.num_samples = self.total_size // num_replicas  # per rank and epoch
        self.num_padded = max(0, self.total_size - dataset_len)  # over all ranks

    def set_epoch(self, epoch, start_batch=0):
        """Iterate epoch `epoch` next, skipping its first `start_batch` batches (to resume mid-epoch)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must lie in [0, {len(self)}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def epoch_indices(self, epoch):
        """(indices, is_padding) of this rank for the whole epoch, int64 and bool arrays.

        Batch k of this rank is indices[k * batch_size:(k + 1) * batch_size]; is_padding marks the
        entries that only repeat earlier samples to even out the ranks.
        """
        n = self.dataset_len
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        order = np.resize(order, self.total_size)  # truncates, or pads by cycling from the start
        is_padding = np.arange(self.total_size) >= n
        return order[self.rank::self.num_replicas].astype(np.int64), is_padding[self.rank::self.num_replicas]

    def __iter__(self):
        indices, _ = self.epoch_indices(self.epoch)
        for start in range(self.start_batch * self.batch_size, self.num_samples, self.batch_size):
            yield indices[start:start + self.batch_size].tolist()

    def __len__(self):
        return -(-self.num_samples // self.batch_size)
