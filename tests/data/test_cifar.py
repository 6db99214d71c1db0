"""CIFAR-10 from a local cifar-10-python.tar.gz (a small stand-in with the official layout)."""
import io
import pickle
import tarfile

import numpy as np
import pytest

from ppmoco.data import build_dataset
from ppmoco.errors import ConfigError, DataError

from cifar_archive import write_batches, write_cifar10
from pickle_payloads import System

KEY = "Data.Train.dataset"
TRAIN_LABELS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
TEST_LABELS = [7, 0, 2]
CHW = [{"NormalizeImage": {"mean": [0, 0, 0], "std": [1, 1, 1]}}, {"ToCHWImage": None}]
VIEWS = [{"RandCropImage": {"size": 16, "scale": [0.2, 1.0]}}, {"RandFlipImage": {"flip_code": 1}}, *CHW]


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    return str(path), write_cifar10(path, TRAIN_LABELS, TEST_LABELS)


def cifar(name, data_file, **kwargs):
    return build_dataset({"name": name, "data_file": data_file, **kwargs}, KEY, seed=0)


# Catches: batches read out of order or a split mixed into the other, labels out of step with their
# images, the channel planes or the pixel order of a row misread.
def test_both_splits_in_archive_order_with_their_labels_and_pixels(archive):
    path, rows = archive
    for mode, labels in (("train", TRAIN_LABELS), ("test", TEST_LABELS)):
        ds = cifar("Cifar10ClsDataset", path, mode=mode, transform_ops=CHW)
        assert len(ds) == len(labels) and ds.labels.tolist() == labels and ds.num_classes == 10
        for i in (0, len(labels) - 1):
            image, label = ds[i]
            want = rows[mode][i].reshape(3, 32, 32).astype(np.float32) / 255.0
            np.testing.assert_allclose(image, want, atol=1e-6)
            assert label == labels[i]


def test_contrastive_views_are_seeded_by_seed_epoch_and_index(archive):
    path, _ = archive
    ds = cifar("Cifar10ContrastiveDataset", path, transform_ops=VIEWS, views=3)
    first = ds[4]
    assert len(first) == 4 and first[-1] == TRAIN_LABELS[4]
    assert all(v.shape == (3, 16, 16) and v.dtype == np.float32 for v in first[:-1])
    assert not np.array_equal(first[0], first[1])  # independent views of one image
    np.testing.assert_array_equal(ds[4][0], first[0])  # the same (seed, epoch, index): the same views
    ds.set_epoch(1)
    assert not np.array_equal(ds[4][0], first[0])


def test_a_missing_file_or_another_file_is_one_line(tmp_path, archive):
    with pytest.raises(DataError, match=rf"^{KEY}\.data_file: .*nope.tar.gz does not exist; put the official "
                                        r"cifar-10-python.tar.gz there"):
        cifar("Cifar10ClsDataset", str(tmp_path / "nope.tar.gz"))
    not_archive = rf"^{KEY}\.data_file: .* is not the CIFAR-10 archive cifar-10-python.tar.gz \("
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x00" * 1000)
    other = tmp_path / "other.tar.gz"  # a real archive without CIFAR's members
    with tarfile.open(other, "w:gz") as f:
        info = tarfile.TarInfo("readme.txt")
        f.addfile(info, io.BytesIO(b""))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(open(archive[0], "rb").read()[:2000])
    for path, detail in ((junk, ""), (other, r"no data_batch member"), (truncated, "")):
        with pytest.raises(DataError, match=not_archive + detail):
            cifar("Cifar10ContrastiveDataset", str(path))
    with pytest.raises(ConfigError, match=rf"^{KEY}\.mode: 'val' is not one of train, test"):
        cifar("Cifar10ClsDataset", archive[0], mode="val")


def test_images_of_another_size_or_labels_beyond_ten_classes_are_refused(tmp_path):
    for rows, labels, detail in ((np.zeros((2, 3000), np.uint8), [0, 1], r"image 0 is not 3072 bytes"),
                                 (np.zeros((2, 3072), np.uint8), [0, 10], r"image 1 .* with a label in \[0, 10\)")):
        path = tmp_path / "odd.tar.gz"
        write_batches(path, {"test_batch": (rows, labels)})
        with pytest.raises(DataError, match=f"is not the CIFAR-10 archive .*its test {detail}"):
            cifar("Cifar10ClsDataset", str(path), mode="test")


def test_an_archive_whose_batch_runs_code_is_refused_and_nothing_runs(tmp_path):
    # Catches the batches read with pickle.load (paddle.vision's reader does): the payload would run.
    payload = pickle.dumps({b"data": System(tmp_path / "ran"), b"labels": [0]}, protocol=2)
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match=r"is not the CIFAR-10 archive .*refusing to load: it asks to run "
                                        r"(posix|os)\.system"):
        build_dataset({"name": "Cifar10ClsDataset", "data_file": str(tmp_path / "evil.tar.gz"), "mode": "test"},
                      "Data.Eval.dataset", 0)
    assert not (tmp_path / "ran").exists()
