"""Per-view pipelines of ContrastiveLearningDataset (`view_trans1`, `view_trans2`: PaddleClas's
MoCoImageNetDataset and PASSL's names): view k runs the shared `transform_ops`, then its own list,
drawing from the sample's one seeded generator after the views before it."""
import os

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from ppmoco.data import build_dataset
from ppmoco.data.datasets import ContrastiveLearningDataset
from ppmoco.data.preview import view_grid
from ppmoco.data.transforms import build_transforms
from ppmoco.errors import ConfigError

KEY = "Data.Train.dataset"
END = [{"NormalizeImage": {"scale": "1.0/255.0"}}, {"ToCHWImage": None}]
# MoCo v3's recipe (main_moco.py's augmentation1 / augmentation2) at 16 px, as a config writes it.
MOCO_V3 = yaml.safe_load("""
transform_ops:
  - DecodeImage: {to_rgb: true, channel_first: false}
  - RandCropImage: {size: 16, scale: [0.08, 1.0]}
  - ColorJitter: {brightness: 0.4, contrast: 0.4, saturation: 0.2, hue: 0.1, p: 0.8}
  - RandomGrayscale: {p: 0.2}
view_trans1:
  - GaussianBlur: {sigma: [0.1, 2.0], p: 1.0}
  - RandFlipImage: {flip_code: 1}
  - NormalizeImage: {scale: 1.0/255.0, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
  - ToCHWImage:
view_trans2:
  - GaussianBlur: {sigma: [0.1, 2.0], p: 0.1}
  - Solarize: {p: 0.2}
  - RandFlipImage: {flip_code: 1}
  - NormalizeImage: {scale: 1.0/255.0, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
  - ToCHWImage:
""")


@pytest.fixture
def images(tmp_path):
    """root/<class>/<i>.png: four 24 x 20 noise images in two classes."""
    root = tmp_path / "train"
    for i in range(4):
        os.makedirs(root / f"c{i % 2}", exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def dataset(root, seed=0, **cfg):
    return build_dataset({"name": "ContrastiveLearningDataset", "root": str(root), **cfg}, KEY, seed=seed)


def normalized(pixels):
    return build_transforms(END, "ops")(pixels, None)


def replay(ds, index, lists, seed=0, epoch=0):
    """The views of sample `index` rebuilt by hand: each full list (shared ops + the view's own) in
    turn on the one generator (seed, epoch, index) of the sample."""
    draws = np.random.default_rng([seed, epoch, index])
    pixels = np.asarray(ds.load(index)[0])
    return [build_transforms(ops, "ops")(pixels, draws) for ops in lists]


# Catches: the lists swapped, one list used for both views, the shared transform_ops skipped or run
# for one view only, view 2's Solarize not run.
def test_view_one_runs_list_one_and_view_two_list_two(images):
    crop = [{"CenterCropImage": {"size": 8}}]
    ds = dataset(images, transform_ops=crop, view_trans1=END, view_trans2=[{"Solarize": {"p": 1.0}}] + END)
    for index in range(len(ds)):
        view_1, view_2, label = ds[index]
        centre = np.asarray(ds.load(index)[0])[6:14, 8:16]
        np.testing.assert_array_equal(view_1, normalized(centre))
        np.testing.assert_array_equal(view_2, normalized(np.asarray(ImageOps.solarize(Image.fromarray(centre)))))
        assert label == index // 2


# Catches: a generator per view (re-seeded, so both views would share their crop), the views drawn in
# another order, view 2 drawing from a fresh generator, the epoch or the index left out of the seed.
def test_the_views_draw_in_turn_from_the_samples_seeded_generator(images):
    ds = dataset(images, **MOCO_V3)
    lists = [MOCO_V3["transform_ops"] + MOCO_V3["view_trans1"], MOCO_V3["transform_ops"] + MOCO_V3["view_trans2"]]
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            *views, _ = ds[index]
            assert [v.shape for v in views] == [(3, 16, 16)] * 2 and not np.array_equal(*views)
            for got, want in zip(views, replay(ds, index, lists, epoch=epoch)):
                np.testing.assert_array_equal(got, want)


# Catches: views that change between two reads or two builds of the same run (a resumed run would
# train on other views), or that ignore Global.seed or the epoch.
def test_the_same_seed_gives_the_same_views_twice(images):
    first = dataset(images, **MOCO_V3)[2]
    again = dataset(images, **MOCO_V3)
    for other in (again[2], again[2]):
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)
    again.set_epoch(1)
    assert not np.array_equal(again[2][0], first[0])
    again.set_epoch(0)  # a resume sets the epoch it restarts in
    np.testing.assert_array_equal(again[2][1], first[1])
    assert not np.array_equal(dataset(images, seed=1, **MOCO_V3)[2][1], first[1])


# Catches: transform_ops alone no longer today's views bit for bit (one pipeline run `views` times
# on the sample's generator), and per-view lists that are not just the shared ops followed by their
# own (the same list for both views must give what transform_ops holding all of it gives).
def test_transform_ops_alone_and_equal_view_lists_keep_todays_views(images):
    shared, own = MOCO_V3["transform_ops"], MOCO_V3["view_trans2"]
    alone = dataset(images, transform_ops=shared + own, views=3)
    split = dataset(images, transform_ops=shared, view_trans1=own, view_trans2=own)
    for index in range(len(alone)):
        for got, want in zip(alone[index][:-1], replay(alone, index, [shared + own] * 3)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(split[index][:-1], alone[index][:2]):
            np.testing.assert_array_equal(got, want)


# Catches: the picture of the views (the Engine's _show_views) failing with per-view pipelines or
# drawing view 1's pipeline in view 2's place.
def test_the_preview_shows_each_views_own_pipeline(images):
    ds = dataset(images, view_trans1=END, view_trans2=[{"Solarize": {"p": 1.0}}] + END)
    grid = view_grid(ds, [1], size=20)  # nearest resampling, which solarizing commutes with
    image = np.asarray(Image.fromarray(np.asarray(ds.load(1)[0])).resize((20, 20), Image.NEAREST))
    cells = [grid[:, c * 22:c * 22 + 20] for c in range(3)]
    np.testing.assert_array_equal(cells[0], image)
    np.testing.assert_array_equal(cells[1], image)
    np.testing.assert_array_equal(cells[2], np.asarray(ImageOps.solarize(Image.fromarray(image))))


# Catches: only view 1's pipeline deciding how much smaller a JPEG may be decoded (view 2's larger
# crops would then be upsampled from too few pixels).
def test_a_reduced_decode_is_the_least_any_view_allows(images):
    small, large = [{"RandCropImage": {"size": 32}}], [{"RandCropImage": {"size": 224}}]
    ds = dataset(images, view_trans1=small + END, view_trans2=large + END)
    assert ds.transforms[0].decode_reduction(1000, 1000) == 7 and ds.transforms[1].decode_reduction(1000, 1000) == 1
    assert ds.decode_reduction(1000, 1000) == 1
    swapped = dataset(images, view_trans1=large + END, view_trans2=small + END)
    assert swapped.decode_reduction(1000, 1000) == 1


TWO = {"view_trans1": END, "view_trans2": END}


@pytest.mark.parametrize("cfg, message", [
    ({"view_trans1": END}, rf"^{KEY}\.view_trans2: missing; view_trans1 and view_trans2 come together .*; add "
                           r"view_trans2 or remove view_trans1$"),
    ({"view_trans2": END}, rf"^{KEY}\.view_trans1: missing; .*add view_trans1 or remove view_trans2$"),
    ({**TWO, "views": 3}, rf"^{KEY}\.views: 3, but view_trans1 and view_trans2 make 2 views; set views: 2 or "
                          r"remove view_trans1 and view_trans2 \(then transform_ops makes every view\)$"),
    ({**TWO, "transform_ops": [{"RandFlipImage": None}] + END},
     rf"^{KEY}\.transform_ops: NormalizeImage and ToCHWImage end each pipeline, so they go at the end of "
     rf"{KEY}\.view_trans1, not in the ops that run before it; move them there$"),
    ({"view_trans1": END, "view_trans2": [{"Solarize": None}]},
     rf"^{KEY}\.view_trans2: must end with NormalizeImage then ToCHWImage"),
    ({"view_trans1": END, "view_trans2": [{"Solarise": None}] + END},
     rf"^{KEY}\.view_trans2\.0: unknown transform op 'Solarise'.*did you mean 'Solarize'"),
    ({"view_trans1": END, "view_trans2": [{"Solarize": {"threshold": 300}}] + END},
     rf"^{KEY}\.view_trans2\.0\.Solarize\.threshold: must lie in \[0, 256\], got 300$"),
    ({"view_trans1": {"Solarize": None}, "view_trans2": END}, rf"^{KEY}\.view_trans1: expected a list of ops"),
    ({**TWO, "transform_ops": [{"RandFlipImage": {"flip": 1}}]},
     rf"^{KEY}\.transform_ops\.0\.RandFlipImage\.flip: unknown key"),
    ({"view_trans1": END, "view_trans2": [{"NormalizeImage": {"mean": [0.5, 0.5, 0.5]}}, {"ToCHWImage": None}]},
     rf"^{KEY}\.view_trans2: its NormalizeImage differs from view_trans1's; .*; give both the same scale, mean "
     r"and std$"),
    ({"transform_ops": [{"RandFlipImage": None}], "view_trans1": [{"DecodeImage": None}] + END, "view_trans2": END},
     rf"^{KEY}\.view_trans1: DecodeImage may only come first"),
], ids=["only-1", "only-2", "views-3", "normalize-shared", "no-end", "unknown-op", "bad-threshold", "not-a-list",
        "bad-shared-op", "normalize-differs", "decode-late"])
def test_config_errors_name_the_key_the_cause_and_the_fix(images, cfg, message):
    # Catches: a half-given pair, a view count the lists do not make, a shared list that normalises,
    # or a bad op accepted, or reported without its key and fix (or on more than one line).
    with pytest.raises(ConfigError, match=message) as caught:
        dataset(images, **cfg)
    assert "\n" not in str(caught.value)


# Catches: the labelled datasets (one view: linear evaluation, kNN) accepting per-view lists they ignore.
def test_labelled_datasets_have_no_per_view_lists(images):
    with pytest.raises(ConfigError, match=rf"^{KEY}\.view_trans1: unknown key"):
        build_dataset({"name": "GeneralClsDataset", "root": str(images), **TWO}, KEY, seed=0)
    assert ContrastiveLearningDataset(root=str(images), **TWO).views == 2
