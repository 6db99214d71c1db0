"""DataLoader construction around the resumable DistributedBatchSampler."""
import os
import signal
import threading

import paddle

from ppmoco.data.sampler import DistributedBatchSampler


def ignore_stop_signals(worker_id):
    """Loader workers leave the signals that stop training (ppmoco/engine/preemption.py) to their
    training process: Slurm signals every process of a job and a terminal's Ctrl-C the whole process
    group, and a worker dying of one makes Paddle raise in the training process at once, before it
    can reach its checkpoint. SIGINT and SIGUSR1 are ignored. SIGTERM is how the training process
    (multiprocessing, at exit) ends its workers: a thread waits for it with the sender's pid and ends
    the worker when its parent sent it, or when the parent is gone."""
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here inherit it

    def wait_for_sigterm():
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == parent or os.getppid() != parent:
                os._exit(0)  # asked to end: a clean end, which Paddle's SIGCHLD check does not report

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()


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
                                  return_list=True, worker_init_fn=ignore_stop_signals)
    return loader, sampler
