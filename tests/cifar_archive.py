"""A small stand-in for the official cifar-10-python.tar.gz, with its exact layout, written by tests."""
import io
import pickle
import tarfile

import numpy as np


def cifar_rows(labels, colours=None, seed=0):
    """uint8 [N, 3072] rows (planes R, G, B of 32x32): solid `colours[label]`, or random bytes."""
    if colours is None:
        return np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return np.stack([np.repeat(np.array(colours[label], dtype=np.uint8), 1024) for label in labels])


def write_batches(path, batches):
    """A .tar.gz of cifar-10-batches-py/<name> files, each a pickled dict like the official ones,
    from {name: (rows, labels)}."""
    with tarfile.open(path, "w:gz") as archive:
        for name, (rows, labels) in batches.items():
            batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": rows,
                     b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}
            payload = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def write_cifar10(path, train_labels, test_labels, colours=None, seed=0):
    """data_batch_1..5 (the train labels dealt out in order) and test_batch; returns
    {"train": rows, "test": rows} in reading order."""
    parts = {f"data_batch_{i + 1}": labels for i, labels in enumerate(np.array_split(np.asarray(train_labels), 5))}
    parts["test_batch"] = np.asarray(test_labels)
    batches = {name: (cifar_rows(labels, colours, seed + n), labels) for n, (name, labels) in enumerate(parts.items())}
    write_batches(path, batches)
    return {"train": np.concatenate([batches[name][0] for name in parts if name != "test_batch"]),
            "test": batches["test_batch"][0]}
