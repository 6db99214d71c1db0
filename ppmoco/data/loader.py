"""DataLoader construction around the resumable DistributedBatchSampler."""
import paddle

from ppmoco.data.sampler import DistributedBatchSampler


def build_dataloader(dataset, batch_size, num_replicas, rank, shuffle, drop_last, seed, num_workers=0,
                     use_shared_memory=True):
    """(paddle.io.DataLoader, sampler) yielding lists of tensors stacked by the default collate.

    Before each epoch call `dataset.set_epoch(e)` and `sampler.set_epoch(e, start_batch)`, then
    `iter(loader)`: workers are not persistent, so each new iterator forks them with the dataset's
    current epoch, and batches are identical for any num_workers.
    """
    sampler = DistributedBatchSampler(len(dataset), batch_size, num_replicas, rank, shuffle=shuffle,
                                      drop_last=drop_last, seed=seed)
    loader = paddle.io.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                  use_shared_memory=use_shared_memory, persistent_workers=False,
                                  return_list=True)
    return loader, sampler
