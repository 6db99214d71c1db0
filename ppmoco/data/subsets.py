"""Label subsets of a training set: SimCLR's split files, or a seeded class-balanced fraction.

A split file (SimCLR's `imagenet_subsets/1percent.txt` and `10percent.txt`) names one image per
line by its file name, `n01440764_10026.JPEG`; the image keeps the label its folder or list line
gives it. A line holding a `/` is a path relative to the dataset's `root` (or `image_root`), for
trees whose file names repeat across classes. Blank lines and lines starting with `#` are skipped.

`label_fraction: f` draws round(f x N) of the N images, spread over the classes in proportion to their
sizes (largest remainders, at least one image per class), each class's images drawn by a generator
seeded with (label_seed, class) alone: not Global.seed, so runs of several seeds train on one subset.
The drawn subset is written to the run's output folder as a split file (write_drawn_split), to be
reused with `split_file` and cited.
"""
import collections
import logging
import os
import posixpath

import numpy as np

from ppmoco.errors import ConfigError
from ppmoco.fileio import write_text_atomic

logger = logging.getLogger("ppmoco.data")
SHOWN = 3  # names quoted in an error about missing or repeated names

# The split file a label_fraction draw writes (write_drawn_split): its name in the output folder, its
# text, what was drawn (for the log) and the dataset's config key (to say how to train on it again).
DrawnSplit = collections.namedtuple("DrawnSplit", "file_name text summary key_path")


def check_subset_keys(split_file, label_fraction, label_seed, key_path):
    """Raise ConfigError unless the subset keys of the dataset at `key_path` make sense together."""
    if split_file is not None and label_fraction is not None:
        raise ConfigError(f"{key_path}.split_file: set either split_file (a list of images) or label_fraction "
                          "(a seeded draw), not both")
    if split_file is not None:
        if not isinstance(split_file, str) or not split_file:
            raise ConfigError(f"{key_path}.split_file: expected the path of a split file, got {split_file!r}")
        if not os.path.isfile(split_file):
            raise ConfigError(f"{key_path}.split_file: {split_file} does not exist; give the path of a split file "
                              "(SimCLR's 1percent.txt, or the label_fraction_*.txt a run wrote)")
    if label_fraction is not None:
        number = isinstance(label_fraction, (int, float)) and not isinstance(label_fraction, bool)
        if not (number and 0 < label_fraction <= 1):
            raise ConfigError(f"{key_path}.label_fraction: expected a number in (0, 1], e.g. 0.01 for 1% of the "
                              f"labels, got {label_fraction!r}")
    if label_seed is not None:
        if label_fraction is None:
            raise ConfigError(f"{key_path}.label_seed: seeds the label_fraction draw, which is not set; "
                              "set label_fraction or remove label_seed")
        if not (isinstance(label_seed, int) and not isinstance(label_seed, bool) and 0 <= label_seed < 2 ** 32):
            raise ConfigError(f"{key_path}.label_seed: expected an int in [0, 2**32), got {label_seed!r}")


def read_split_file(path, key_path, extensions):
    """The image names in split file `path`, in file order; `extensions` are the image file endings."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key_path}.split_file: cannot read {path}: {err}") from None
    names, first_line = [], {}
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        where = f"{key_path}.split_file: {path} line {number}"
        if not name.lower().endswith(extensions):
            fields = name.split()
            hint = ("; 'path label' lines belong in a list file (image_root + cls_label_path)"
                    if len(fields) > 1 and fields[-1].lstrip("-").isdigit() else "")
            raise ConfigError(f"{where}: {name!r} is not an image file name (SimCLR's format: one name per line, "
                              f"like n01440764_10026.JPEG){hint}; fix the line")
        key = posixpath.normpath(name) if "/" in name else name
        if key in first_line:
            raise ConfigError(f"{where}: {name!r} is already on line {first_line[key]}; remove the repeat")
        first_line[key] = number
        names.append(key)
    if not names:
        raise ConfigError(f"{key_path}.split_file: {path} names no images; give a split file with one image "
                          "file name per line")
    return names


def _file_name(path):
    """os.path.basename, without its overhead (called for each of a dataset's images)."""
    return path[path.rfind(os.sep) + 1:]


def relative_paths(paths, base):
    """`paths` relative to the folder `base`, with '/' separators (string slicing where a path starts
    with base: os.path.relpath takes seconds over ImageNet's 1.28 million)."""
    prefix = os.path.join(base, "")
    relatives = []
    for path in paths:
        if path.startswith(prefix):
            relative = path[len(prefix):].replace(os.sep, "/")
            relatives.append(posixpath.normpath(relative) if "./" in relative or "//" in relative else relative)
        else:
            relatives.append(os.path.relpath(path, base).replace(os.sep, "/"))
    return relatives


def _where(paths, base, wanted):
    """{name: [indices]} of the samples (image files `paths` under `base`) whose file name, or for a
    name holding a '/' whose path relative to base, is one of the `wanted` names."""
    found = collections.defaultdict(list)
    names = {name for name in wanted if "/" not in name}
    for index, path in enumerate(paths):
        name = _file_name(path)
        if name in names:
            found[name].append(index)
    relative = set(wanted) - names
    if relative:
        for index, path in enumerate(relative_paths(paths, base)):
            if path in relative:
                found[path].append(index)
    return found


def select_named(names, paths, base, split_file, key_path, source):
    """Sorted indices of the samples (image files `paths` under the folder `base`) that the
    split-file `names` (read from `split_file`) name."""
    found = _where(paths, base, names)
    chosen, missing = [], []
    for name in names:
        indices = found.get(name, [])
        if len(indices) > 1:
            same = relative_paths([paths[i] for i in indices[:SHOWN]], base)
            raise ConfigError(f"{key_path}.split_file: {split_file} names {name}, which is the file name of "
                              f"{len(indices)} images of {source} ({', '.join(same)}); write the line as the image's "
                              f"path relative to the dataset folder, e.g. {same[0]}")
        if indices:
            chosen.append(indices[0])
        else:
            missing.append(name)
    if missing:
        raise ConfigError(f"{key_path}.split_file: {len(missing)} of the {len(names)} images {split_file} names are "
                          f"not in {source} (first: {', '.join(missing[:SHOWN])}); point split_file at a split of "
                          "these images, or root/image_root at the images it lists")
    return sorted(chosen)


def per_class_counts(counts, fraction, seed):
    """How many images of each class a `fraction` draw takes: round(fraction x total) in all, split in
    proportion to the class sizes `counts` by largest remainders (ties in a seeded order), and at
    least one per class."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = fraction * counts
    take = np.floor(exact).astype(np.int64)
    total = int(np.floor(fraction * counts.sum() + 0.5))
    order = np.random.default_rng(seed).permutation(len(counts))
    order = order[np.argsort(-(exact - take)[order], kind="stable")]
    take[order[:max(total - int(take.sum()), 0)]] += 1
    return np.maximum(take, 1)


def draw_fraction(labels, fraction, seed, key_path, example):
    """Sorted indices of a class-balanced `fraction` of the samples with `labels`; `example(i)`
    names sample i in an error."""
    labels = np.asarray(labels)
    unlabelled = np.flatnonzero(labels < 0)
    if unlabelled.size:
        raise ConfigError(f"{key_path}.label_fraction: draws per class, but {unlabelled.size} of {labels.size} "
                          f"images have no label (e.g. {example(unlabelled[0])}); point root at a folder of class "
                          "folders, give every list-file line a label, or use split_file")
    by_class = np.argsort(labels, kind="stable")  # each class's samples together, in dataset order
    classes, starts, counts = np.unique(labels[by_class], return_index=True, return_counts=True)
    chosen = []
    for label, start, count, take in zip(classes, starts, counts, per_class_counts(counts, fraction, seed)):
        members = by_class[start:start + count]
        chosen.append(members[np.random.default_rng([seed, int(label)]).permutation(count)[:take]])
    return np.sort(np.concatenate(chosen))


def split_file_text(paths, base, chosen):
    """The split file naming the samples `chosen` (indices into the image files `paths` under `base`):
    each by its file name, or by its path relative to base where another sample has the same name."""
    names = [_file_name(paths[index]) for index in chosen]
    found = _where(paths, base, names)
    lines = [name if len(found[name]) == 1 else relative_paths([paths[index]], base)[0]
             for name, index in zip(names, chosen)]
    return "".join(f"{line}\n" for line in lines)


def label_subset(paths, base, labels, split_file, label_fraction, label_seed, key_path, source, extensions):
    """(sorted indices of the samples to keep or None for all, DrawnSplit or None) for a dataset whose
    samples are the image files `paths` under the folder `base`, with `labels`."""
    if split_file is not None:
        names = read_split_file(split_file, key_path, extensions)
        chosen = select_named(names, paths, base, split_file, key_path, source)
        logger.info(f"{key_path}: {len(chosen)} of {len(paths)} images, those {split_file} lists")
        return chosen, None
    if label_fraction is None:
        return None, None
    seed = 0 if label_seed is None else label_seed
    chosen = draw_fraction(labels, label_fraction, seed, key_path, lambda i: relative_paths([paths[i]], base)[0])
    taken = np.bincount(np.asarray(labels)[chosen])
    taken = taken[taken > 0]
    summary = (f"label_fraction {label_fraction:g}, label_seed {seed}: {len(chosen)} of {len(paths)} images of "
               f"{source}, {taken.min()} to {taken.max()} per class")
    logger.info(f"{key_path}: {summary}")
    file_name = f"label_fraction_{label_fraction:g}_seed{seed}.txt"
    return chosen, DrawnSplit(file_name, split_file_text(paths, base, chosen), summary, key_path)


def write_drawn_split(dataset, output_dir):
    """Write the split file of the subset `dataset` drew (label_fraction) into `output_dir`; its path,
    or None when the dataset drew none."""
    drawn = dataset.drawn_split
    if drawn is None:
        return None
    path = os.path.join(output_dir, drawn.file_name)
    write_text_atomic(path, drawn.text)
    key = drawn.key_path
    logger.info(f"wrote the label subset ({drawn.summary}) to {path}; train on the same images with "
                f"-o {key}.split_file={path} -o {key}.label_fraction=null -o {key}.label_seed=null")
    return path
