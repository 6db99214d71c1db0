"""The built-in default dataset: scikit-learn's 8x8 digits written as an ImageNet-style tree.

It ships inside scikit-learn, so a fresh clone can pretrain and evaluate end to end without any
download. Layout (paths in the list files are relative to out_dir):

    out_dir/train/<label>/<index>.png   out_dir/train_list.txt   ("train/3/0123.png 3")
    out_dir/val/<label>/<index>.png     out_dir/val_list.txt

`index` is the sample's position in `load_digits()`; the 80/20 split is stratified with a fixed
seed, so every build is byte-identical.
"""
import argparse
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from ppmoco.errors import ConfigError, DataError
from ppmoco.progress import Progress

SPLITS = ("train", "val")


def _is_complete(out_dir):
    return all(os.path.isfile(os.path.join(out_dir, f"{split}_list.txt")) for split in SPLITS)


def _image_size(out_dir):
    with open(os.path.join(out_dir, "train_list.txt"), encoding="utf-8") as f:
        first = f.readline().rsplit(None, 1)[0]
    with Image.open(os.path.join(out_dir, first)) as img:
        return img.width


def _write(out_dir, image_size):
    # Imported here: scikit-learn takes ~1.7 s to import, which every training process (each rank of a
    # launch) would pay for a dataset built once.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target
    indices = np.arange(len(labels))
    train, val = train_test_split(indices, test_size=0.2, stratify=labels, random_state=0)
    progress = Progress("building the digits dataset", len(labels), brief=True)
    for split, members in zip(SPLITS, (train, val)):
        lines = []
        for i in sorted(members, key=lambda i: (labels[i], i)):
            rel = f"{split}/{labels[i]}/{i:04d}.png"
            os.makedirs(os.path.join(out_dir, split, str(labels[i])), exist_ok=True)
            img = Image.fromarray(pixels[i], "L").resize((image_size, image_size), Image.BICUBIC)
            img.save(os.path.join(out_dir, rel))
            lines.append(f"{rel} {labels[i]}\n")
            progress.advance(1)
        with open(os.path.join(out_dir, f"{split}_list.txt"), "w", encoding="utf-8") as f:
            f.writelines(lines)


def build_digits(out_dir, image_size=32):
    """Write the digits tree to out_dir unless it is already there; returns out_dir.

    The tree is built in a temporary folder beside out_dir and renamed into place, so concurrent
    callers (several ranks) never see a half-written dataset: the loser of the race discards its copy.
    """
    if not (isinstance(image_size, int) and image_size >= 8):
        raise ConfigError(f"image_size: must be an int >= 8, got {image_size!r}")
    if os.path.exists(out_dir):
        if not _is_complete(out_dir):
            raise DataError(f"{out_dir} exists but is not a complete digits dataset "
                            "(no train_list.txt/val_list.txt); delete it to rebuild")
        if _image_size(out_dir) != image_size:
            raise DataError(f"{out_dir} holds {_image_size(out_dir)}px digits, not {image_size}px; "
                            "delete it to rebuild or choose another folder")
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write(tmp, image_size)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset should be readable like any folder
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(out_dir):
            raise
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write scikit-learn's digits as an image folder tree.")
    parser.add_argument("--out", default="dataset/digits", help="output folder (default: dataset/digits)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    args = parser.parse_args(argv)
    print(build_digits(args.out, args.size))


if __name__ == "__main__":
    main()
