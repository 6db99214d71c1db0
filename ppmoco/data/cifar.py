"""CIFAR-10 from the official `cifar-10-python.tar.gz` (https://www.cs.toronto.edu/~kriz/cifar.html),
read from the local file (never downloaded).

The archive holds `cifar-10-batches-py/data_batch_1` .. `_5` (train, 50,000 images) and `test_batch`
(test, 10,000): pickled dicts with "data" (uint8 [N, 3072], the 32x32 planes R, G, B) and "labels".
They are unpickled by ppmoco.safe_pickle, which builds arrays, numbers, strings and containers only,
so an archive that asks for more is refused instead of running code (paddle.vision's reader, whose
layout this follows, calls pickle.load).
"""
import os
import tarfile

import numpy as np
from PIL import Image

from ppmoco import safe_pickle
from ppmoco.data.datasets import DATASETS, SeededDataset
from ppmoco.errors import CheckpointError, ConfigError, DataError

NUM_CLASSES = 10
IMAGE_BYTES = 3 * 32 * 32
MODES = ("train", "test")
PREFIX = {"train": "data_batch", "test": "test_batch"}  # paddle.vision's names of the splits' members
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _entry(batch, key):
    """batch[key] of a batch pickled by Python 2 (str keys, read as text) or 3 (bytes keys)."""
    return batch[key] if key in batch else batch[key.encode()]


def read_cifar10(data_file, mode, not_archive):
    """(rows uint8 [N, 3072], labels int64 [N]) of the `mode` split, batches in the archive's order;
    DataError starting with `not_archive` for anything but the archive."""
    rows, labels = [], []
    try:
        with tarfile.open(data_file, "r:gz") as archive:
            members = {os.path.basename(m.name): m for m in archive.getmembers()
                       if m.isfile() and "cifar-10-batches-py" in m.name}
            if not any(name in members for name in BATCHES[mode]):
                raise DataError(f"{not_archive} (no {PREFIX[mode]} member)")
            for name in BATCHES[mode]:
                if name not in members:
                    raise DataError(f"{not_archive} (no {name} member)")
                batch = safe_pickle.loads(archive.extractfile(members[name]).read(), f"{data_file}:{name}")
                rows.append(np.asarray(_entry(batch, "data"), dtype=np.uint8))
                labels.append(np.asarray(_entry(batch, "labels"), dtype=np.int64))
    except (DataError, CheckpointError) as err:
        raise DataError(str(err) if str(err).startswith(not_archive) else f"{not_archive} ({err})") from None
    except Exception as err:  # tarfile, gzip and key errors alike: not the archive
        raise DataError(f"{not_archive} ({type(err).__name__}: {err})") from None
    return rows, labels


class _Cifar10(SeededDataset):
    """The `mode` split of the archive `data_file`; sample i is its i-th image, in the archive's order."""

    labelled_form = "Cifar10ClsDataset"

    def __init__(self, data_file, mode, transform_ops, views, seed, config_key):
        super().__init__(transform_ops, views, seed, config_key)
        if mode not in MODES:
            raise ConfigError(f"{config_key}.mode: '{mode}' is not one of {', '.join(MODES)}")
        if not os.path.isfile(data_file):
            raise DataError(f"{config_key}.data_file: {data_file} does not exist; put the official "
                            "cifar-10-python.tar.gz there (https://www.cs.toronto.edu/~kriz/cifar.html)")
        not_archive = (f"{config_key}.data_file: {data_file} is not the CIFAR-10 archive "
                       "cifar-10-python.tar.gz")
        rows, labels = read_cifar10(data_file, mode, not_archive)
        first = 0  # index of a batch's first image in the split
        for batch_rows, batch_labels in zip(rows, labels):
            fits = batch_rows.ndim == 2 and batch_rows.shape[1] == IMAGE_BYTES and len(batch_rows) == len(batch_labels)
            bad = [0] if not fits else np.flatnonzero((batch_labels < 0) | (batch_labels >= NUM_CLASSES))
            if len(bad):
                raise DataError(f"{not_archive} (its {mode} image {first + bad[0]} is not {IMAGE_BYTES} bytes with a "
                                f"label in [0, {NUM_CLASSES}))")
            first += len(batch_rows)
        self.rows, self.labels = np.concatenate(rows), np.concatenate(labels)
        self.samples = [(f"{data_file}:{mode}:{i}", int(label)) for i, label in enumerate(self.labels)]
        self.num_classes = NUM_CLASSES
        self.source = data_file

    def load(self, index):
        return Image.fromarray(self.rows[index].reshape(3, 32, 32).transpose(1, 2, 0)), int(self.labels[index])


@DATASETS.register()
class Cifar10ContrastiveDataset(_Cifar10):
    """(view_1, ..., view_n, label) of CIFAR-10 images: for pretraining."""

    def __init__(self, data_file, mode="train", transform_ops=None, views=2, seed=0, config_key="dataset"):
        super().__init__(data_file, mode, transform_ops, views, seed, config_key)


@DATASETS.register()
class Cifar10ClsDataset(_Cifar10):
    """(image, label) of CIFAR-10 images: for linear evaluation and kNN."""

    def __init__(self, data_file, mode="train", transform_ops=None, seed=0, config_key="dataset"):
        super().__init__(data_file, mode, transform_ops, 1, seed, config_key)
