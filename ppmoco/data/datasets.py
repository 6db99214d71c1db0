"""Image datasets read from an ImageNet-style folder tree, any folder of images (pretraining needs
no labels) or FleetX list files, on the seeded multi-view base every dataset shares (CIFAR-10: cifar.py).

Every problem with the data is found as early and named as precisely as possible: listing
problems (missing folders, bad list lines, missing files) at construction, undecodable images when
the sample is loaded. Sample i of epoch e is augmented with `np.random.default_rng([seed, e, i])`,
so its views depend on nothing else (not on workers, not on what ran before a resume).
"""
import logging
import os

import numpy as np
import paddle
from PIL import Image, ImageFile

from ppmoco.data.digits import build_digits
from ppmoco.data.subsets import check_subset_keys, label_subset
from ppmoco.data.transforms import build_transforms
from ppmoco.errors import ConfigError, DataError
from ppmoco.progress import Progress
from ppmoco.registry import Registry

DATASETS = Registry("dataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
BUILTINS = ("digits",)
UNLABELLED = -1  # the label of a sample that has none (unlabelled pretraining data)
logger = logging.getLogger("ppmoco.data")


def _to_rgb(img):
    """8-bit RGB from any PIL mode. Alpha is dropped (as torchvision's loader does), not composited.

    High bit depths are scaled, not clipped: I;16 and I (how Pillow reads 16-bit PNGs) map
    0..65535 to 0..255, and F (float) maps 0..1 to 0..255.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        full_scale = 1.0 if img.mode == "F" else 65535.0
        pixels = np.asarray(img, dtype=np.float64) * (255.0 / full_scale)
        img = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolves palette transparency before the alpha is dropped
    return img.convert("RGB")


def _read_rgb(path, decode_reduction=None):
    """Fully decode `path` into RGB, raising whatever PIL raises for a bad file.

    Truncated files always fail: PIL's global LOAD_TRUNCATED_IMAGES is switched off while decoding.
    `decode_reduction(width, height)` (Compose.decode_reduction) lets a JPEG decode at a half,
    quarter or eighth of its size (libjpeg's DCT scaling, Pillow's draft) where no view loses
    resolution by it; the image's `info["source_size"]` is then the file's (width, height).
    """
    allow_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise OSError("the file is empty (0 bytes)")
        with Image.open(path) as img:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that, and a corrupt header of a
            # few hundred bytes can claim such a canvas: seconds of decoding, hundreds of MB per sample.
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise OSError(f"{img.width}x{img.height} pixels exceed PIL.Image.MAX_IMAGE_PIXELS "
                              f"({limit}); a corrupt header or a decompression bomb")
            source_size = img.size
            if decode_reduction is not None and img.format == "JPEG":
                factor = decode_reduction(*source_size)
                if factor >= 2:
                    img.draft("RGB", (-(-source_size[0] // factor), -(-source_size[1] // factor)))
            img.load()
            rgb = _to_rgb(img)
            if rgb.size != source_size:
                rgb.info["source_size"] = source_size
            return rgb
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated


def _reason(err):
    return str(err) or type(err).__name__


def _decode_error(path, err, key_path):
    return DataError(f"cannot decode image {path}: {_reason(err)}; fix or remove the file, "
                     f"or set {key_path}.skip_bad_images: true")


def decode_image(path, key_path="Data.<split>.dataset"):
    """`path` as an RGB PIL image, or DataError naming the file and the fix.

    Any exception while decoding counts as a bad file: PIL decoders raise many types on broken data.
    """
    try:
        return _read_rgb(path)
    except Exception as err:
        raise _decode_error(path, err, key_path) from None


def _is_image(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subfolders(root):
    """The non-hidden folders directly in `root`, sorted by name."""
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root} does not exist")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder):
    """Image paths at any depth under `folder`, sorted; hidden folders and files are skipped."""
    files = []
    for here, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        files += [os.path.join(here, n) for n in names if _is_image(n)]
    return sorted(files)


def list_folder(root):
    """[(path, label)] and class names from root/<class>/**/<image>, sorted by class then path.

    Hidden folders and files (starting with '.') are ignored, as are files without an image extension.
    """
    classes = _subfolders(root)
    if not classes:
        raise DataError(f"dataset folder {root} has no class subfolders; expected {root}/<class>/<image>")
    samples = []
    progress = Progress(f"listing {root}", len(classes), unit="folders", brief=True)
    for label, name in enumerate(classes):
        files = _images_under(os.path.join(root, name))
        if not files:
            raise DataError(f"class folder {os.path.join(root, name)} has no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        samples += [(path, label) for path in files]
        progress.advance(1)
    return samples, classes


def list_images(root):
    """([(path, label)], class names): every image under `root` at any depth, for pretraining.

    Folders need no meaning: a flat folder and a deep tree work, with no labels (label None). A
    class-folder tree (no image directly in root, images in every subfolder) keeps list_folder's
    labels and order, so a method that can use labels gets them and sample indices, the seeded
    augmentation and exact resume stay as they were. Otherwise images directly in root come first,
    then each subfolder in name order, sorted by path inside it. Hidden-file and extension rules
    are list_folder's.
    """
    subfolders = _subfolders(root)
    loose = sorted(os.path.join(root, e.name) for e in os.scandir(root) if e.is_file() and _is_image(e.name))
    progress = Progress(f"listing {root}", len(subfolders), unit="folders", brief=True)
    per_folder = []
    for name in subfolders:
        per_folder.append(_images_under(os.path.join(root, name)))
        progress.advance(1)
    if subfolders and not loose and all(per_folder):
        return [(path, label) for label, files in enumerate(per_folder) for path in files], subfolders
    files = loose + [path for files in per_folder for path in files]
    if not files:
        raise DataError(f"dataset folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth; "
                        "add images or point root to the folder that holds them")
    return [(path, None) for path in files], []


def list_file(image_root, cls_label_path, labelled=True):
    """[(path, label)] from lines 'relative/path label' (split at the last whitespace).

    With labelled=False a line may also be a bare 'relative/path' (label None): a line that names an
    existing file as a whole is a path, so names with spaces need no label either.
    """
    for path, what in ((image_root, "image_root folder"), (cls_label_path, "list file")):
        if not os.path.exists(path):
            raise DataError(f"{what} {path} does not exist")
    try:
        with open(cls_label_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read list file {cls_label_path}: {err}") from None
    samples = []
    progress = Progress(f"reading {cls_label_path}", len(lines), unit="lines", brief=True)
    for number, line in enumerate(lines, start=1):
        if number % 1024 == 0 or number == len(lines):
            progress.advance(number - progress.done)
        where = f"{cls_label_path} line {number}"
        parts = line.strip().rsplit(None, 1)
        if not parts:
            continue
        if not labelled and (len(parts) == 1 or os.path.isfile(os.path.join(image_root, line.strip()))):
            relative, label = line.strip(), None
        elif len(parts) != 2:
            raise DataError(f"{where}: expected '<relative/path> <label>', got {line!r}")
        else:
            relative = parts[0]
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{where}: label {parts[1]!r} is not an integer") from None
        path = os.path.join(image_root, relative)
        if not os.path.exists(path):
            raise DataError(f"{where}: {path} does not exist; fix the line or the image_root")
        samples.append((path, label))
    return samples


def _digits_folder(path, key_path):
    """The ancestor-or-self of `path` named 'digits', where the built-in dataset belongs."""
    folder = os.path.abspath(path)
    while os.path.basename(folder) != "digits":
        if os.path.dirname(folder) == folder:
            raise ConfigError(f"{key_path}.builtin: 'digits' needs paths inside a folder named digits, "
                              "e.g. root: dataset/digits/train")
        folder = os.path.dirname(folder)
    return folder


def build_view_transforms(transform_ops, views, view_trans, config_key):
    """The pipeline of each of the `views` views: `transform_ops` for all, or, with `view_trans`
    (view_trans1, view_trans2; PaddleClas's MoCoImageNetDataset and PASSL's names), view k runs
    transform_ops (optional: the ops both views begin with) then its own view_transk."""
    if view_trans is None or all(ops is None for ops in view_trans):
        return [build_transforms(transform_ops, f"{config_key}.transform_ops")] * views
    keys = [f"view_trans{k}" for k in range(1, len(view_trans) + 1)]
    given = [key for key, ops in zip(keys, view_trans) if ops is not None]
    if len(given) != len(keys):
        missing = next(key for key in keys if key not in given)
        raise ConfigError(f"{config_key}.{missing}: missing; {' and '.join(keys)} come together (each view's own "
                          f"ops, after the shared transform_ops); add {missing} or remove {', '.join(given)}")
    if views != len(keys):
        raise ConfigError(f"{config_key}.views: {views}, but {' and '.join(keys)} make {len(keys)} views; set "
                          f"views: {len(keys)} or remove {' and '.join(keys)} (then transform_ops makes every view)")
    pipelines = [build_transforms(ops, f"{config_key}.{key}", transform_ops, f"{config_key}.transform_ops")
                 for key, ops in zip(keys, view_trans)]
    first = pipelines[0].ops[-2]
    for key, pipeline in zip(keys[1:], pipelines[1:]):
        if not np.array_equal(pipeline.ops[-2].table, first.table):
            raise ConfigError(f"{config_key}.{key}: its NormalizeImage differs from {keys[0]}'s; the views are "
                              "normalised alike (one input statistics, one inverse for the picture of the "
                              "views); give both the same scale, mean and std")
    return pipelines


class SeededDataset(paddle.io.Dataset):
    """Sample i of epoch e as (view_1, ..., view_n, label): `views` augmentations of `load(i)`'s image,
    float32 CHW, drawn from `np.random.default_rng([seed, e, i])`; views=1 is the (image, label) form.
    The views draw one after the other from that one generator, view k through `transforms[k - 1]`
    (build_view_transforms); `transform` is view 1's pipeline.

    A subclass defines `load(index)` -> (RGB PIL image, label) and sets `samples` ([(where, label)],
    where = the image's file or another name for it), `labels` (int64: [N] class indices, UNLABELLED
    where a sample has none, or [N, C] targets of multi-label data), `num_classes`, `source` (what the
    data came from) and `labelled_form` (the registered views=1 dataset of the same images: the
    memory bank of the feature protocols); `class_names` where the listing knows them; `drawn_split`
    (subsets.DrawnSplit) where it drew a label subset, for subsets.write_drawn_split.
    """

    multi_label = False
    class_names = None
    drawn_split = None

    def __init__(self, transform_ops, views, seed, config_key, view_trans=None):
        if views < 1:
            raise ConfigError(f"{config_key}.views: must be >= 1, got {views}")
        self.transforms = build_view_transforms(transform_ops, views, view_trans, config_key)
        self.transform = self.transforms[0]
        self.views = views
        self.seed = seed  # Global.seed, range-checked at config load; never from the dataset config
        self.config_key = config_key
        self.epoch = 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        img, label = self.load(index)
        pixels = np.asarray(img)  # once for all the views, which never write into it
        source_size = getattr(img, "info", {}).get("source_size")
        rng = self.rng(index)
        label = np.int64(label) if np.ndim(label) == 0 else np.asarray(label, dtype=np.int64)
        return (*(transform(pixels, rng, source_size) for transform in self.transforms), label)

    def decode_reduction(self, width, height):
        """By how much a width x height file may be decoded smaller: the least any view allows."""
        return min(transform.decode_reduction(width, height) for transform in self.transforms)

    def set_epoch(self, epoch):
        """Select the augmentation randomness of `epoch`; call before creating the loader iterator."""
        self.epoch = int(epoch)

    def rng(self, index):
        return np.random.default_rng([self.seed, self.epoch, int(index)])


class FileDataset(SeededDataset):
    """Image files, `samples` [(path, label)]: decoding with optional skipping (this module, voc.py)."""

    def __init__(self, transform_ops, views, skip_bad_images, seed, config_key, view_trans=None):
        super().__init__(transform_ops, views, seed, config_key, view_trans)
        self.skip_bad_images = skip_bad_images
        self.num_skipped = 0  # per process: each loader worker counts its own skips

    def load(self, index):
        """(RGB image, label) of sample `index`, or of the next decodable one if skip_bad_images."""
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return _read_rgb(path, self.decode_reduction), label
            except Exception as err:
                if not self.skip_bad_images:
                    raise _decode_error(path, err, self.config_key) from None
                self.num_skipped += 1
                logger.warning("skipping undecodable image %s (%s); sample %d takes the next index "
                               "(%d skipped so far by this process)", path, _reason(err), index,
                               self.num_skipped)
        raise DataError(f"no image of {self.source} can be decoded")


class _ImageDataset(FileDataset):
    """Image files listed from a folder tree or a list file.

    `labelled` says whether the samples need labels: then `root` must hold class folders and every
    list-file line a label. Otherwise any folder of images and bare list-file paths do, and a sample
    without a label gets UNLABELLED; labels a list file does give are still checked.

    `split_file` (SimCLR's format) or `label_fraction` (+ `label_seed`) keep a subset of the images
    (ppmoco/data/subsets.py); labels, classes and num_classes stay those of the whole listing.
    """

    labelled = True
    labelled_form = "GeneralClsDataset"

    def __init__(self, root, image_root, cls_label_path, class_num, transform_ops, views, skip_bad_images,
                 builtin, subset, seed, config_key, view_trans=None):
        # its checks before the listing
        super().__init__(transform_ops, views, skip_bad_images, seed, config_key, view_trans)
        check_subset_keys(*subset, config_key)
        if root is not None and (image_root is not None or cls_label_path is not None):
            raise ConfigError(f"{config_key}.root: set either root or image_root + cls_label_path, not both")
        if root is None and (image_root is None or cls_label_path is None):
            missing = "image_root" if image_root is None else "cls_label_path"
            folder = "a folder of class folders" if self.labelled else "a folder of images"
            raise ConfigError(f"{config_key}.{missing}: missing; set root ({folder}) "
                              "or both image_root and cls_label_path")
        if class_num is not None and not (isinstance(class_num, int) and class_num > 0):
            raise ConfigError(f"{config_key}.class_num: expected a positive int, got {class_num!r}")
        if builtin is not None:
            if builtin not in BUILTINS:
                raise ConfigError(f"{config_key}.builtin: unknown '{builtin}'; choose one of {', '.join(BUILTINS)}")
            wanted = [root] if root is not None else [image_root, cls_label_path]
            if not all(os.path.exists(p) for p in wanted):
                build_digits(_digits_folder(wanted[-1], config_key))

        if root is not None:
            samples, classes = list_folder(root) if self.labelled else list_images(root)
            self.source = root
        else:
            samples = list_file(image_root, cls_label_path, self.labelled)
            self.source = cls_label_path
            if not samples:
                raise DataError(f"list file {cls_label_path} lists no images")
        given = [(path, label) for path, label in samples if label is not None]
        labels = np.array([label for _, label in given], dtype=np.int64)
        if class_num is not None:
            bad = np.flatnonzero((labels < 0) | (labels >= class_num))
            if bad.size:
                path, label = given[bad[0]]
                raise DataError(f"{self.source}: label {label} of {path} is outside [0, {class_num}); "
                                f"fix the labels or {config_key}.class_num")
        elif labels.size and labels.min() < 0:
            path, label = given[int(np.argmin(labels))]
            raise DataError(f"{self.source}: label {label} of {path} is negative")
        self.samples = [(path, UNLABELLED if label is None else label) for path, label in samples]
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        found = len(classes) if root is not None else int(labels.max(initial=-1)) + 1
        self.num_classes = class_num if class_num is not None else found
        self.class_names = classes if root is not None and classes else None
        kept, self.drawn_split = label_subset([path for path, _ in self.samples], root or image_root, self.labels,
                                              *subset, config_key, self.source, IMAGE_EXTENSIONS)
        if kept is not None:
            self.samples = [self.samples[i] for i in kept]
            self.labels = self.labels[kept]


@DATASETS.register(aliases=("ContrativeLearningDataset",))
class ContrastiveLearningDataset(_ImageDataset):
    """(view_1, ..., view_n, label): `views` independent augmentations of one image file, float32 CHW.

    Pretraining needs no labels: `root` may be any folder of images (list_images) and a list file
    may hold bare paths; the label is UNLABELLED then, and the methods ignore it. `view_trans1` and
    `view_trans2` give the two views pipelines of their own (BYOL's and MoCo v3's asymmetric
    augmentations): view k runs transform_ops (if given) then view_transk.
    """

    labelled = False

    def __init__(self, root=None, image_root=None, cls_label_path=None, class_num=None, transform_ops=None,
                 views=2, skip_bad_images=False, builtin=None, view_trans1=None, view_trans2=None, split_file=None,
                 label_fraction=None, label_seed=None, seed=0, config_key="dataset"):
        super().__init__(root, image_root, cls_label_path, class_num, transform_ops, views, skip_bad_images,
                         builtin, (split_file, label_fraction, label_seed), seed, config_key,
                         (view_trans1, view_trans2))


@DATASETS.register()
class GeneralClsDataset(_ImageDataset):
    """(image, label) of image files, the image as float32 CHW: for linear evaluation and kNN."""

    def __init__(self, root=None, image_root=None, cls_label_path=None, class_num=None, transform_ops=None,
                 skip_bad_images=False, builtin=None, split_file=None, label_fraction=None, label_seed=None, seed=0,
                 config_key="dataset"):
        super().__init__(root, image_root, cls_label_path, class_num, transform_ops, 1, skip_bad_images,
                         builtin, (split_file, label_fraction, label_seed), seed, config_key)


def require_labels(dataset, key_path, user):
    """Raise DataError unless every sample of `dataset` has a label (`user` names who needs them)."""
    missing = np.flatnonzero(dataset.labels == UNLABELLED)
    if missing.size:
        raise DataError(f"{key_path}: {user} trains on labels, but {missing.size} of {len(dataset)} images have "
                        f"none (e.g. {dataset.samples[missing[0]][0]}); point root at a folder of class folders "
                        "(root/<class>/<image>) or give every list-file line a label")


def _dataset_class(dataset_cfg, key_path):
    if not isinstance(dataset_cfg, dict) or "name" not in dataset_cfg:
        raise ConfigError(f"{key_path}.name: missing; choose one of {', '.join(DATASETS.names())}")
    return DATASETS.get(dataset_cfg["name"], key_path)


def labelled_form(dataset_cfg, key_path):
    """The name of the registered (image, label) dataset reading the images `dataset_cfg` names."""
    return _dataset_class(dataset_cfg, key_path).labelled_form


def build_dataset(dataset_cfg, key_path, seed):
    """The dataset described by `dataset_cfg` ({name: ..., **kwargs}) found at config `key_path`."""
    _dataset_class(dataset_cfg, key_path)
    kwargs = {key: value for key, value in dataset_cfg.items() if key != "name"}
    for key in ("seed", "config_key"):
        if key in kwargs:
            raise ConfigError(f"{key_path}.{key}: set by the trainer, not the dataset config; remove it")
    return DATASETS.build(dataset_cfg["name"], kwargs, key_path, seed=seed, config_key=key_path)

