"""CIFAR-10 from the official `cifar-10-python.tar.gz` (https://www.cs.toronto.edu/~kriz/cifar.html),
parsed by paddle.vision's own Cifar10 reader from the local file (never downloaded).

The archive holds `cifar-10-batches-py/data_batch_1` .. `_5` (train, 50,000 images) and `test_batch`
(test, 10,000): pickled dicts with b"data" (uint8 [N, 3072], the 32x32 planes R, G, B) and b"labels".
The reader unpickles them, so the file must be the official one or another you trust.
"""
import os

import numpy as np
import paddle.vision

from ppmoco.data.datasets import DATASETS, SeededDataset
from ppmoco.errors import ConfigError, DataError

NUM_CLASSES = 10
IMAGE_BYTES = 3 * 32 * 32
MODES = ("train", "test")


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
        try:
            self.reader = paddle.vision.datasets.Cifar10(data_file, mode, download=False, backend="pil")
        except Exception as err:  # tarfile, gzip, pickle and key errors alike: not the archive
            raise DataError(f"{not_archive} ({type(err).__name__}: {err})") from None
        if not self.reader.data:
            raise DataError(f"{not_archive} (no {self.reader.flag} member)")
        bad = next((i for i, (image, label) in enumerate(self.reader.data)
                    if np.shape(image) != (IMAGE_BYTES,) or label not in range(NUM_CLASSES)), None)
        if bad is not None:
            raise DataError(f"{not_archive} (its {mode} image {bad} is not {IMAGE_BYTES} bytes with a label "
                            f"in [0, {NUM_CLASSES}))")
        self.labels = np.array([label for _, label in self.reader.data], dtype=np.int64)
        self.samples = [(f"{data_file}:{mode}:{i}", int(label)) for i, label in enumerate(self.labels)]
        self.num_classes = NUM_CLASSES
        self.source = data_file

    def load(self, index):
        image, label = self.reader[index]
        return image, int(label)


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
