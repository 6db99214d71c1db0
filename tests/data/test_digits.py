import os
import threading

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from ppmoco.data import build_digits
from ppmoco.data.digits import main
from ppmoco.errors import DataError


def snapshot(folder):
    """{relative path: bytes} of every file below folder."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(str(tmp_path_factory.mktemp("a") / "digits"))


def read_list(path):
    with open(path, encoding="utf-8") as f:
        return [line.rsplit(" ", 1) for line in f.read().splitlines()]


def test_tree_and_lists_are_consistent(digits):
    reference = load_digits()
    total = 0
    for split, expected_size in [("train", 1437), ("val", 360)]:
        entries = read_list(os.path.join(digits, f"{split}_list.txt"))
        assert len(entries) == expected_size
        assert sorted(os.listdir(os.path.join(digits, split))) == [str(d) for d in range(10)]
        on_disk = {os.path.relpath(os.path.join(p, n), digits)
                   for p, _, names in os.walk(os.path.join(digits, split)) for n in names}
        assert {rel for rel, _ in entries} == on_disk
        for rel, label in entries:
            _, folder, name = rel.split("/")
            assert folder == label and reference.target[int(name[:-4])] == int(label)
        counts = np.bincount([int(label) for _, label in entries], minlength=10)
        assert np.all(np.abs(counts - np.bincount(reference.target) * expected_size / 1797) <= 1)  # stratified
        total += expected_size
    assert total == 1797


def test_images_are_upsampled_digits(digits):
    reference = load_digits()
    for rel, _ in read_list(os.path.join(digits, "val_list.txt"))[::50]:
        img = Image.open(os.path.join(digits, rel))
        assert img.mode == "L" and img.size == (32, 32)
        small = np.asarray(img.resize((8, 8), Image.BOX), dtype=np.float64)
        original = reference.images[int(rel[-8:-4])] * 255 / 16
        assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.95


def test_deterministic_and_idempotent(digits, tmp_path):
    again = build_digits(str(tmp_path / "digits"))
    assert snapshot(again) == snapshot(digits)
    before = os.stat(os.path.join(digits, "train_list.txt")).st_mtime_ns
    assert build_digits(digits) == digits
    assert os.stat(os.path.join(digits, "train_list.txt")).st_mtime_ns == before
    with pytest.raises(DataError, match="holds 32px digits, not 16px"):
        build_digits(digits, image_size=16)
    os.makedirs(tmp_path / "partial")
    with pytest.raises(DataError, match="partial exists but is not a complete digits dataset"):
        build_digits(str(tmp_path / "partial"))


def test_concurrent_builders_agree(digits, tmp_path):
    out = str(tmp_path / "digits")
    start = threading.Barrier(2)
    errors = []

    def build():
        start.wait()
        try:
            build_digits(out)
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert os.listdir(tmp_path) == ["digits"]  # the loser's temporary folder is gone
    assert snapshot(out) == snapshot(digits)


def test_main_writes_requested_size(tmp_path, capsys):
    out = str(tmp_path / "small" / "digits")
    main(["--out", out, "--size", "16"])
    assert capsys.readouterr().out.strip() == out
    rel = read_list(os.path.join(out, "train_list.txt"))[0][0]
    assert Image.open(os.path.join(out, rel)).size == (16, 16)
