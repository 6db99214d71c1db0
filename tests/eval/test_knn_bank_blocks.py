"""kNN's memory bank stays off the device: blocks of at most `bank_block_bytes` reach it one at a time.

A 2048-d bank of ImageNet's 1.28M training images is 10.5 GB (twice that once normalised), more than a
16 GB GPU spares beside training; knn_classify used to copy it to the device whole. These tests force
the blocked path with a small `bank_block_bytes` on CPU and check that it classifies exactly as the one
block of the bank the function always computed. What only a GPU exercises: the device's memory peak
and the host-to-device copies themselves (on CPU the "device" is host memory).
"""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from test_knn import random_split, reference_knn

from ppmoco.eval import knn
from ppmoco.eval.knn import bank_blocks, knn_classify, nearest_neighbours


def rows_bytes(rows, dim):
    return 4 * dim * rows


def one_block_neighbours(train_x, test_x, k, chunk_size):
    """What knn_classify computed before blocks: the whole normalised bank against each chunk."""
    bank = F.normalize(paddle.to_tensor(train_x), axis=1)
    query = F.normalize(paddle.to_tensor(test_x), axis=1)
    out = []
    for start in range(0, len(test_x), chunk_size):
        similarity = paddle.matmul(query[start:start + chunk_size], bank, transpose_y=True)
        out.append(paddle.topk(similarity, min(k, len(train_x)), axis=1))
    return out


def as_numpy(neighbours):
    return [(s.numpy(), i.numpy()) for s, i in neighbours]


@pytest.mark.parametrize("rows", [1, 7, 64, 130])
def test_bank_blocks_cover_every_row_once_within_the_byte_budget(rows):
    blocks = bank_blocks(130, 12, rows_bytes(rows, 12) + 3)  # a budget between two row counts rounds down
    assert blocks[0][0] == 0 and blocks[-1][1] == 130
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(blocks, blocks[1:]))
    assert all(0 < stop - start <= rows for start, stop in blocks)


# Catches the bank copied to the device whole (mutation: the old `_as_tensor(train_features, "float32")`
# before the loop; reproduced before the fix: one copy of all 97 rows): no copy of training features may
# exceed one block, and a host array is never copied whole.
def test_the_bank_reaches_the_device_one_block_at_a_time(monkeypatch):
    rng = np.random.default_rng(0)
    train_x, train_y = random_split(rng, 97, 16, 5)
    test_x, test_y = random_split(rng, 30, 16, 5)
    copied = []
    original = knn._as_tensor

    def spy(x, dtype):
        if dtype == "float32" and len(np.shape(x)) == 2 and np.shape(x)[0] != len(test_x):
            copied.append(np.shape(x)[0])
        return original(x, dtype)

    monkeypatch.setattr(knn, "_as_tensor", spy)
    monkeypatch.setattr(paddle, "to_tensor", _refuse_whole(paddle.to_tensor, len(train_x)))
    knn_classify(train_x, train_y, test_x, test_y, 5, ks=(1, 10, 50), chunk_size=8,
                 bank_block_bytes=rows_bytes(20, 16))
    assert copied == [20, 20, 20, 20, 17]


def _refuse_whole(to_tensor, bank_rows):
    def guarded(data, *args, **kwargs):
        if np.ndim(data) == 2 and np.shape(data)[0] == bank_rows:
            raise AssertionError("the whole bank was copied to the device")
        return to_tensor(data, *args, **kwargs)
    return guarded


# Catches a blocked path that loses or misplaces neighbours: bank indices not offset by the block's
# start (mutation: drop `top_idx + start`), a merge keeping each block's own top k instead of the best k
# overall, or a block's last rows dropped; k beyond a block's rows and beyond the bank (200) included.
@pytest.mark.parametrize("num_train, num_test, dim, num_classes, ks, chunk_size, block_rows", [
    (60, 37, 16, 10, (1, 3, 20, 200), 8, 7),      # k > block rows, k > N; 37 = 4 chunks of 8 + 5
    (200, 64, 32, 7, (10, 20, 100, 200), 64, 64),  # blocks of 64 rows, last one 8
    (50, 9, 8, 4, (1, 5, 10), 256, 1),             # one row per block
])
def test_a_blocked_bank_classifies_exactly_as_the_bank_in_one_block(num_train, num_test, dim, num_classes, ks,
                                                                    chunk_size, block_rows):
    rng = np.random.default_rng(num_train * 1000 + num_test)
    train_x, train_y = random_split(rng, num_train, dim, num_classes)
    test_x, test_y = random_split(rng, num_test, dim, num_classes)
    budget = rows_bytes(block_rows, dim)
    assert len(bank_blocks(num_train, dim, budget)) > 1 and len(bank_blocks(num_train, dim)) == 1
    # The bank on the device in one block, as before, against the bank left on the host in blocks.
    on_device = knn_classify(paddle.to_tensor(train_x), paddle.to_tensor(train_y), test_x, test_y, num_classes,
                             ks=ks, chunk_size=chunk_size)
    on_host = knn_classify(train_x, train_y, test_x, test_y, num_classes, ks=ks, chunk_size=chunk_size,
                           bank_block_bytes=budget)
    assert on_host == on_device
    want = reference_knn(train_x, train_y, test_x, test_y, num_classes, ks, 0.07)
    assert all(on_host[k] == pytest.approx(want[k]) for k in ks)
    # The same neighbours in the same order: blocks change a similarity by float32 rounding at most.
    k = min(max(ks), num_train)
    blocked = as_numpy(nearest_neighbours(train_x, F.normalize(paddle.to_tensor(test_x), axis=1), k, chunk_size,
                                          budget))
    whole = as_numpy(one_block_neighbours(train_x, test_x, k, chunk_size))
    for (sim, idx), (want_sim, want_idx) in zip(blocked, whole, strict=True):
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_allclose(sim, want_sim, rtol=0, atol=1e-6)


# Catches a path whose computation depends on where the bank lives (e.g. a device bank normalised
# whole while a host bank is normalised per block): bit for bit the same neighbours from a host array
# and a device tensor under the same blocks; and one block (the default for a bank this size) is bit
# for bit what knn_classify computed before blocks existed.
def test_where_the_bank_lives_changes_no_bit():
    rng = np.random.default_rng(5)
    train_x, _ = random_split(rng, 150, 24, 3)
    test_x, _ = random_split(rng, 40, 24, 3)
    query = F.normalize(paddle.to_tensor(test_x), axis=1)
    # 3-row blocks: normalising 3 rows at a time rounds some values differently from normalising 150 at once
    for budget in (rows_bytes(3, 24), knn.BANK_BLOCK_BYTES):
        host = as_numpy(nearest_neighbours(train_x, query, 50, 16, budget))
        device = as_numpy(nearest_neighbours(paddle.to_tensor(train_x), query, 50, 16, budget))
        for (sim, idx), (device_sim, device_idx) in zip(host, device, strict=True):
            assert np.array_equal(sim, device_sim) and np.array_equal(idx, device_idx)
    for (sim, idx), (want_sim, want_idx) in zip(host, as_numpy(one_block_neighbours(train_x, test_x, 50, 16)),
                                                strict=True):
        assert np.array_equal(sim, want_sim) and np.array_equal(idx, want_idx)


def test_rejects_a_bank_block_budget_of_zero():
    with pytest.raises(ValueError, match="bank_block_bytes must be > 0"):
        knn_classify(np.ones((4, 2)), [0, 1, 0, 1], np.ones((2, 2)), [0, 1], 2, bank_block_bytes=0)
