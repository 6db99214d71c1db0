import io
import logging
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from ppmoco.data import build_dataset, decode_image
from ppmoco.data.datasets import ContrastiveLearningDataset, GeneralClsDataset, require_labels
from ppmoco.errors import ConfigError, DataError

KEY = "Data.Train.dataset"
V2_OPS = [
    {"RandCropImage": {"size": 16, "scale": [0.2, 1.0]}},
    {"ColorJitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}},
    {"RandomGrayscale": {"p": 0.2}},
    {"GaussianBlur": {"sigma": [0.1, 2.0], "p": 0.5}},
    {"RandFlipImage": {"flip_code": 1}},
    {"NormalizeImage": {"scale": "1.0/255.0"}},
    {"ToCHWImage": None},
]


def save_image(path, seed=0, size=(12, 10), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, fmt)
    return str(path)


def truncated_jpeg():
    """A JPEG cut inside its scan data: the header parses, the decode fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:len(buffer.getvalue()) * 2 // 3]


@pytest.fixture
def tree(tmp_path):
    """root/{bird,cat}: sorted classes and files, odd names, ignored non-images and hidden files."""
    root = tmp_path / "train"
    names = {"cat": ["b.png", "A b.JPG", "ä 1.png"], "bird": ["z.jpeg", "sub/a.bmp"]}
    for cls, files in names.items():
        for i, name in enumerate(files):
            save_image(root / cls / name, seed=i, fmt="JPEG" if name.lower().endswith(("jpg", "jpeg")) else None)
    (root / "cat" / "notes.txt").write_text("not an image")
    save_image(root / "cat" / ".hidden.png")
    save_image(root / ".cache" / "x.png")
    return root


def test_folder_listing_order_and_labels(tree):
    ds = GeneralClsDataset(root=str(tree))
    assert [(os.path.relpath(p, tree), label) for p, label in ds.samples] == [
        ("bird/sub/a.bmp", 0), ("bird/z.jpeg", 0), ("cat/A b.JPG", 1), ("cat/b.png", 1), ("cat/ä 1.png", 1)]
    assert ds.num_classes == 2 and ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 1, 1]
    image, label = ds[4]
    assert image.shape == (3, 10, 12) and image.dtype == np.float32 and label == 1


def test_list_file_listing(tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("cat/A b.JPG 3\n\n  bird/z.jpeg\t0  \ncat/ä 1.png 2\n", encoding="utf-8")
    ds = GeneralClsDataset(image_root=str(tree), cls_label_path=str(lst), class_num=5)
    assert ds.samples == [(os.path.join(tree, "cat/A b.JPG"), 3), (os.path.join(tree, "bird/z.jpeg"), 0),
                          (os.path.join(tree, "cat/ä 1.png"), 2)]
    assert ds.num_classes == 5
    assert GeneralClsDataset(image_root=str(tree), cls_label_path=str(lst)).num_classes == 4


@pytest.mark.parametrize("content, message", [
    ("cat/b.png 1\ncat/b.png\n", r"list\.txt line 2: expected '<relative/path> <label>'"),
    ("cat/b.png one\n", r"list\.txt line 1: label 'one' is not an integer"),
    ("cat/b.png 1\ncat/missing.png 0\n", r"list\.txt line 2: .*cat/missing\.png does not exist"),
    ("cat/b.png 5\n", r"list\.txt: label 5 of .*cat/b\.png is outside \[0, 5\)"),
    ("cat/b.png -1\n", r"list\.txt: label -1 of .*cat/b\.png is outside"),
    ("\n\n", r"list file .*list\.txt lists no images"),
])
def test_list_file_errors(tree, tmp_path, content, message):
    lst = tmp_path / "list.txt"
    lst.write_text(content)
    with pytest.raises(DataError, match=message):
        GeneralClsDataset(image_root=str(tree), cls_label_path=str(lst), class_num=5)


def test_listing_errors(tree, tmp_path):
    with pytest.raises(DataError, match=r"dataset folder .*nowhere does not exist"):
        GeneralClsDataset(root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"list file .*nolist\.txt does not exist"):
        GeneralClsDataset(image_root=str(tree), cls_label_path=str(tmp_path / "nolist.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no class subfolders"):
        GeneralClsDataset(root=str(tmp_path / "empty"))
    (tree / "dog").mkdir()
    (tree / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*dog has no images"):
        GeneralClsDataset(root=str(tree))
    os.remove(tree / "dog" / "readme.txt")
    os.rmdir(tree / "dog")
    with pytest.raises(DataError, match=r"label 1 of .*is outside \[0, 1\)"):
        GeneralClsDataset(root=str(tree), class_num=1)


def test_pretraining_lists_a_class_tree_as_the_labelled_listing_does(tree):
    """A class-folder tree used for pretraining keeps today's samples, order (resume, augmentation)
    and labels (for methods that can use them)."""
    for cls, name in (("bird", "sub-x/b.png"), ("bird-2", "c.png"), ("cat", "sub/deeper/d.png")):
        save_image(tree / cls / name)
    # Catches: one global sort of all paths ('bird-2/' sorts before 'bird/', 'sub-x/' before 'sub/').
    today = ["bird/sub-x/b.png", "bird/sub/a.bmp", "bird/z.jpeg", "bird-2/c.png",
             "cat/A b.JPG", "cat/b.png", "cat/sub/deeper/d.png", "cat/ä 1.png"]
    assert [os.path.relpath(p, tree) for p, _ in GeneralClsDataset(root=str(tree)).samples] == today
    labelled = GeneralClsDataset(root=str(tree))
    pretraining = ContrastiveLearningDataset(root=str(tree))
    assert [os.path.relpath(p, tree) for p, _ in pretraining.samples] == today
    # Catches: class labels dropped from a class tree (supervised-contrastive MoCo needs them).
    assert pretraining.labels.tolist() == labelled.labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert pretraining.num_classes == 3


def unlabelled_tree(root):
    """Images at depths 0 to 3 with no class meaning, plus what every listing skips."""
    names = ["b.png", "a.jpg", "x/1.png", "x/y/2.png", "x/y/z/3.PNG", "x-y/4.png"]
    for i, name in enumerate(names):
        save_image(root / name, seed=i, fmt="JPEG" if name.endswith(".jpg") else None)
    save_image(root / ".hidden.png")
    save_image(root / "x" / ".cache" / "5.png")
    save_image(root / ".thumbs" / "6.png")
    (root / "x" / "y" / "notes.txt").write_text("not an image")
    (root / "x" / "y" / "z" / "raw.dat").write_bytes(b"\0")
    return root


def test_pretraining_reads_flat_folders_and_deep_trees(tmp_path):
    root = unlabelled_tree(tmp_path / "photos")
    ds = ContrastiveLearningDataset(root=str(root), transform_ops=V2_OPS[:1] + V2_OPS[-2:])
    # Catches: dropping the loose images in root, the depth, or the hidden/extension rules.
    assert [os.path.relpath(p, root) for p, _ in ds.samples] == [
        "a.jpg", "b.png", "x/1.png", "x/y/2.png", "x/y/z/3.PNG", "x-y/4.png"]
    view_1, view_2, label = ds[4]
    assert view_1.shape == view_2.shape == (3, 16, 16) and label == -1
    # Catches: the labelled dataset accepting a folder without classes.
    flat = tmp_path / "flat"
    for i in range(3):
        save_image(flat / f"{i}.png", seed=i)
    assert len(ContrastiveLearningDataset(root=str(flat))) == 3
    with pytest.raises(DataError, match=rf"^dataset folder {flat} has no class subfolders; "
                                        rf"expected {flat}/<class>/<image>$"):
        GeneralClsDataset(root=str(flat))


def test_pretraining_folder_without_images_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    (empty / "a" / "b").mkdir(parents=True)
    (empty / "a" / "b" / "notes.txt").write_text("not an image")
    save_image(empty / ".hidden" / "x.png")
    # Catches: an empty dataset accepted (a loader of length 0) or a message not naming the folder.
    with pytest.raises(DataError, match=rf"^dataset folder {empty} has no images \(\.jpg, .*\) at any depth; "):
        ContrastiveLearningDataset(root=str(empty))
    with pytest.raises(DataError, match=r"dataset folder .*nowhere does not exist"):
        ContrastiveLearningDataset(root=str(tmp_path / "nowhere"))


def test_pretraining_list_file_may_hold_bare_paths(tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("cat/A b.JPG\n\nbird/z.jpeg 3\n  cat/b.png  \n", encoding="utf-8")
    ds = ContrastiveLearningDataset(image_root=str(tree), cls_label_path=str(lst))
    # Catches: bare paths refused, a path with a space split into path + label, given labels dropped.
    assert ds.samples == [(os.path.join(tree, "cat/A b.JPG"), -1), (os.path.join(tree, "bird/z.jpeg"), 3),
                          (os.path.join(tree, "cat/b.png"), -1)]
    # Catches: the label checks lost for the labels a pretraining list does give.
    with pytest.raises(DataError, match=r"list\.txt: label 3 of .*bird/z\.jpeg is outside \[0, 2\)"):
        ContrastiveLearningDataset(image_root=str(tree), cls_label_path=str(lst), class_num=2)
    lst.write_text("cat/b.png\ncat/missing.png\n")
    with pytest.raises(DataError, match=r"list\.txt line 2: .*cat/missing\.png does not exist"):
        ContrastiveLearningDataset(image_root=str(tree), cls_label_path=str(lst))
    # Catches: labelled datasets accepting bare paths (linear evaluation and the kNN bank need labels).
    with pytest.raises(DataError, match=r"list\.txt line 1: expected '<relative/path> <label>'"):
        GeneralClsDataset(image_root=str(tree), cls_label_path=str(lst))


# Catches: a method that trains on labels accepting a sample without one (it would be a class of its own
# or, with the queue's empty-slot marker, match the queue's empty slots).
def test_require_labels_refuses_a_dataset_with_an_unlabelled_sample(tree, tmp_path):
    require_labels(ContrastiveLearningDataset(root=str(tree)), KEY, "SupConIn")  # a class tree: labelled
    lst = tmp_path / "list.txt"
    lst.write_text("cat/A b.JPG 1\nbird/z.jpeg\ncat/b.png\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{KEY}: SupConIn trains on labels, but 2 of 3 images have none "
                                        rf"\(e.g. .*bird/z.jpeg\); point root at a folder of class folders"):
        require_labels(ContrastiveLearningDataset(image_root=str(tree), cls_label_path=str(lst)), KEY, "SupConIn")


@pytest.mark.parametrize("name, content, reason", [
    ("zero.jpg", b"", "empty"),
    ("truncated.jpg", truncated_jpeg(), "truncated"),
    ("text.jpg", b"hello, I am not a JPEG\n", "cannot identify"),
], ids=["zero-byte", "truncated", "text"])
def test_bad_images_raise_data_error_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / "train" / "cls" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    ds = GeneralClsDataset(root=str(tmp_path / "train"), config_key=KEY)
    with pytest.raises(DataError, match=rf"cannot decode image .*{name}: .*{reason}.*"
                                        rf"set {KEY}\.skip_bad_images: true"):
        ds[0]


def test_truncation_is_never_hidden(tmp_path, monkeypatch):
    path = tmp_path / "t.jpg"
    path.write_bytes(truncated_jpeg())
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="truncated"):
        decode_image(str(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    with pytest.raises(DataError, match="nope.png"):
        decode_image(str(tmp_path / "nope.png"))


def write_odd_images(folder):
    """Images of unusual modes and sizes, and what each must decode to (as uint8 RGB)."""
    os.makedirs(folder, exist_ok=True)
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    deep = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300)
    rgba = np.random.default_rng(1).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    cmyk = Image.new("CMYK", (9, 4), (0, 255, 255, 0))  # pure red ink
    palette = Image.fromarray(gray, "L").convert("P")
    cases = {
        "gray.png": (Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, -1)),
        "deep16.png": (Image.fromarray(deep), np.repeat(np.round(deep / 257.0).astype(np.uint8)[..., None], 3, -1)),
        "alpha.png": (Image.fromarray(rgba, "RGBA"), rgba[..., :3]),
        "gray_alpha.png": (Image.fromarray(rgba[..., :2], "LA"), np.repeat(rgba[..., :1], 3, -1)),
        "cmyk.jpg": (cmyk, None),
        "palette.png": (palette, np.repeat(gray[..., None], 3, -1)),
        "tiny.png": (Image.new("RGB", (1, 1), (10, 20, 30)), np.array([[[10, 20, 30]]], np.uint8)),
        "thin.bmp": (Image.new("RGB", (3, 1), (200, 0, 0)), np.full((1, 3, 3), [200, 0, 0], np.uint8)),
        "çà_中文.png": (Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, -1)),
    }
    for name, (img, _) in cases.items():
        img.save(os.path.join(folder, name))
    return {name: expected for name, (_, expected) in cases.items()}


def test_unusual_images_decode_to_rgb_and_flow_through_v2(tmp_path):
    expected = write_odd_images(tmp_path / "train" / "odd")
    assert Image.open(tmp_path / "train" / "odd" / "deep16.png").mode.startswith("I")
    for name, pixels in expected.items():
        img = decode_image(str(tmp_path / "train" / "odd" / name))
        assert img.mode == "RGB"
        array = np.asarray(img)
        if pixels is None:  # CMYK through JPEG: just check it stays red
            assert array[..., 0].min() > 200 and array[..., 1:].max() < 60
        else:
            np.testing.assert_array_equal(array, pixels, err_msg=name)
    ds = ContrastiveLearningDataset(root=str(tmp_path / "train"), transform_ops=V2_OPS)
    for i in range(len(ds)):
        *views, label = ds[i]
        assert [v.shape for v in views] == [(3, 16, 16)] * 2 and all(v.dtype == np.float32 for v in views)
        assert label == 0 and isinstance(label, np.int64)


def test_skip_bad_images_uses_next_index_and_counts(tmp_path, caplog):
    root = tmp_path / "train"
    save_image(root / "a" / "0.png", seed=0)
    (root / "a" / "1.png").write_bytes(b"")
    (root / "b" / "2.png").parent.mkdir()
    (root / "b" / "2.png").write_bytes(b"junk")
    save_image(root / "b" / "3.png", seed=3)
    ds = build_dataset({"name": "GeneralClsDataset", "root": str(root), "skip_bad_images": True}, KEY, seed=0)
    with caplog.at_level(logging.WARNING, logger="ppmoco.data"):
        image, label = ds[1]
    np.testing.assert_array_equal(image, ds[3][0])
    assert label == 1 and ds.num_skipped == 2
    assert "1.png" in caplog.text and "2.png" in caplog.text
    (root / "a" / "0.png").write_bytes(b"")
    (root / "b" / "3.png").write_bytes(b"")
    with pytest.raises(DataError, match="no image of .* can be decoded"):
        ds[0]


def test_views_are_seeded_by_seed_epoch_and_index(tree):
    def dataset(seed=0):
        return build_dataset({"name": "ContrastiveLearningDataset", "root": str(tree), "transform_ops": V2_OPS,
                              "views": 3}, KEY, seed=seed)

    ds = dataset()
    first = ds[2]
    assert len(first) == 4 and first[-1] == 1
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    for other in (ds[2], dataset()[2]):
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)
    ds.set_epoch(1)
    assert not np.array_equal(ds[2][0], first[0])
    ds.set_epoch(0)
    np.testing.assert_array_equal(ds[2][0], first[0])
    assert not np.array_equal(dataset(seed=1)[2][0], first[0])


def test_build_dataset_config_errors(tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("cat/b.png 0\n")
    cases = [
        ({"root": str(tree), "image_root": str(tree)}, rf"^{KEY}\.root: set either root"),
        ({"image_root": str(tree)}, rf"^{KEY}\.cls_label_path: missing"),
        ({}, rf"^{KEY}\.image_root: missing"),
        ({"root": str(tree), "builtin": "mnist"}, rf"^{KEY}\.builtin: unknown 'mnist'"),
        ({"root": str(tree), "class_num": "ten"}, rf"^{KEY}\.class_num: expected a positive int"),
        ({"root": str(tree), "seed": 3}, rf"^{KEY}\.seed: set by the trainer"),
        ({"root": str(tree), "skip_bad_image": True}, rf"^{KEY}\.skip_bad_image: unknown key.*'skip_bad_images'"),
        ({"root": str(tree), "transform_ops": [{"Flip": None}]},
         rf"^{KEY}\.transform_ops\.0: unknown transform op 'Flip'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_dataset({"name": "GeneralClsDataset", **kwargs}, KEY, seed=0)
    with pytest.raises(ConfigError, match=rf"^{KEY}\.views: must be >= 1"):
        build_dataset({"name": "ContrastiveLearningDataset", "root": str(tree), "views": 0}, KEY, seed=0)
    with pytest.raises(ConfigError, match=rf"^{KEY}: unknown dataset 'GeneralCls'"):
        build_dataset({"name": "GeneralCls", "root": str(tree)}, KEY, seed=0)
    with pytest.raises(ConfigError, match=rf"^{KEY}\.name: missing"):
        build_dataset({"root": str(tree)}, KEY, seed=0)
    ds = build_dataset({"name": "ContrativeLearningDataset", "image_root": str(tree), "cls_label_path": str(lst)},
                       KEY, seed=0)
    assert isinstance(ds, ContrastiveLearningDataset) and len(ds) == 1


def test_builtin_digits_is_built_on_first_use(tmp_path):
    root = tmp_path / "dataset" / "digits" / "val"
    ds = build_dataset({"name": "GeneralClsDataset", "root": str(root), "builtin": "digits"}, KEY, seed=0)
    assert len(ds) == 360 and ds.num_classes == 10 and ds[0][0].shape == (3, 32, 32)
    listed = build_dataset({"name": "GeneralClsDataset", "image_root": str(root.parent), "builtin": "digits",
                            "cls_label_path": str(root.parent / "val_list.txt")}, KEY, seed=0)
    assert listed.samples == ds.samples
    with pytest.raises(ConfigError, match=rf"^{KEY}\.builtin: 'digits' needs paths inside a folder named digits"):
        build_dataset({"name": "GeneralClsDataset", "root": str(tmp_path / "x"), "builtin": "digits"}, KEY, seed=0)


# --- reduced JPEG decoding (RandCropImage.decode_reduction) ---

MOCO_V2_OPS = [{"RandCropImage": {"size": 32, "scale": [0.2, 1.0]}},
               {"ColorJitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}},
               {"RandomGrayscale": {"p": 0.2}}, {"GaussianBlur": {"sigma": [0.1, 2.0], "p": 0.5}},
               {"RandFlipImage": {"flip_code": 1}}, {"NormalizeImage": None}, {"ToCHWImage": None}]


@pytest.mark.parametrize("size, scale, ratio", [(32, [0.2, 1.0], [3 / 4, 4 / 3]), (64, [0.08, 1.0], [3 / 4, 4 / 3]),
                                                (32, [0.5, 1.0], [0.2, 5.0])])
@pytest.mark.parametrize("width, height", [(500, 375), (333, 500), (1024, 683)])
def test_a_reduced_decode_keeps_every_crop_at_full_resolution(size, scale, ratio, width, height):
    # Catches: a reduction that ignores the aspect ratio or the crop's rounding (some crops would
    # then be upsampled from fewer pixels than the output has), checked over many draws.
    from ppmoco.data.transforms import RandCropImage

    op = RandCropImage(size=size, scale=scale, ratio=ratio)
    factor = op.decode_reduction(width, height)
    rng = np.random.default_rng(0)
    smallest = min(min(w, h) for _, _, w, h in (op.crop_box(width, height, rng) for _ in range(20000)))
    assert smallest / factor >= size


def _photo_jpegs(folder, count=4):
    from sklearn.datasets import load_sample_images

    folder.mkdir()
    for i in range(count):
        photo = Image.fromarray(load_sample_images().images[i % 2]).resize((500, 375), Image.BICUBIC)
        photo.save(folder / f"{i}.jpg", quality=90)
    return folder


def test_a_reduced_decode_draws_the_crops_of_a_full_decode(tmp_path):
    # Catches: the crop drawn in the reduced image's coordinates (other random crops), the box not
    # scaled to the reduced pixels, and a decode that did not reduce at all.
    root = _photo_jpegs(tmp_path / "photos")
    dataset = ContrastiveLearningDataset(root=str(root), transform_ops=MOCO_V2_OPS)
    assert dataset.transform.decode_reduction(500, 375) == 5
    assert decode_image(str(root / "0.jpg")).size == (500, 375)
    reduced = dataset.load(0)[0]
    assert reduced.size == (125, 94) and reduced.info["source_size"] == (500, 375)  # libjpeg's 1/4
    views = [dataset[i] for i in range(4)]
    dataset.transform.decode_reduction = lambda width, height: 1  # the full decode, same draws
    full = [dataset[i] for i in range(4)]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    for a, b in zip(views, full):
        for view_a, view_b in zip(a[:2], b[:2]):
            levels = np.abs((view_a - view_b) * std * 255.0)
            assert levels.mean() < 4 and np.percentile(levels, 99) < 30


def test_224_px_views_of_imagenet_sized_photos_decode_in_full(tmp_path):
    root = _photo_jpegs(tmp_path / "photos", count=1)
    ops = [{"RandCropImage": {"size": 224, "scale": [0.2, 1.0]}}, {"NormalizeImage": None}, {"ToCHWImage": None}]
    dataset = ContrastiveLearningDataset(root=str(root), transform_ops=ops)
    image = dataset.load(0)[0]
    assert image.size == (500, 375) and "source_size" not in image.info
