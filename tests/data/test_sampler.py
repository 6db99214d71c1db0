import numpy as np
import pytest

from ppmoco.data import DistributedBatchSampler
from ppmoco.errors import ConfigError


def all_ranks(n, batch_size, replicas, **kwargs):
    return [DistributedBatchSampler(n, batch_size, replicas, rank, **kwargs) for rank in range(replicas)]


def test_drop_last_ranks_partition_the_epoch_order():
    samplers = all_ranks(103, 4, 3, seed=5)
    order = np.random.default_rng([5, 2]).permutation(103)
    for s in samplers:
        s.set_epoch(2)
    batches = [list(s) for s in samplers]
    assert [len(b) for b in batches] == [8, 8, 8] and all(len(s) == 8 for s in samplers)
    assert all(len(batch) == 4 for rank in batches for batch in rank)
    flat = [i for rank in batches for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) == 96 and set(flat) == set(order[:96])
    for k in range(8):  # global batch k is the k-th slice of the epoch order
        assert {i for rank in batches for i in rank[k]} == set(order[k * 12:(k + 1) * 12])
    assert all(not pad.any() for _, pad in (s.epoch_indices(2) for s in samplers))


def test_padding_is_flagged_for_uneven_sizes():
    for n, replicas, batch_size in [(10, 3, 2), (2, 3, 4), (7, 2, 3)]:
        samplers = all_ranks(n, batch_size, replicas, drop_last=False, seed=1)
        order = np.random.default_rng([1, 0]).permutation(n)
        per_rank = -(-n // replicas)
        real, padded = [], []
        for s in samplers:
            indices, is_pad = s.epoch_indices(0)
            assert len(indices) == per_rank and len(s) == -(-per_rank // batch_size)
            assert [i for b in s for i in b] == indices.tolist()
            real += indices[~is_pad].tolist()
            padded += indices[is_pad].tolist()
        assert sorted(real) == list(range(n))
        assert len(padded) == samplers[0].num_padded == per_rank * replicas - n
        assert padded == [int(order[j % n]) for j in range(len(padded))]  # repeats from the start


def test_epochs_reshuffle_and_instances_agree():
    def epoch(e, seed=0, shuffle=True):
        s = DistributedBatchSampler(50, 5, 1, 0, shuffle=shuffle, seed=seed)
        s.set_epoch(e)
        return [i for b in s for i in b]

    assert epoch(0) == np.random.default_rng([0, 0]).permutation(50).tolist()
    assert epoch(0) == epoch(0) and epoch(0) != epoch(1) and epoch(0) != epoch(0, seed=1)
    assert epoch(3, shuffle=False) == list(range(50))


def test_start_batch_resumes_mid_epoch():
    s = DistributedBatchSampler(64, 4, 2, 1, seed=3)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start_batch=3)
    assert list(s) == full[3:] and len(s) == len(full) == 8
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(4, start_batch=9)


def test_dataset_smaller_than_a_global_batch():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        DistributedBatchSampler(10, 4, 3, 0, drop_last=True)
    assert len(DistributedBatchSampler(10, 4, 3, 0, drop_last=False)) == 1
