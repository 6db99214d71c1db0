import math

import cv2
import numpy as np
import pytest
import yaml
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from sklearn.datasets import load_sample_image

from ppmoco.data.transforms import (
    TRANSFORMS,
    CenterCropImage,
    ColorJitter,
    GaussianBlur,
    GaussianNoise,
    Lighting,
    NormalizeImage,
    RandCropImage,
    RandFlipImage,
    RandomAffine,
    RandomGrayscale,
    ResizeImage,
    Solarize,
    ToCHWImage,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    build_transforms,
    parse_scale,
    shift_hue,
)
from ppmoco.errors import ConfigError

V1 = """
- RandCropImage: {size: 32, scale: [0.2, 1.0]}
- RandomGrayscale: {p: 0.2}
- ColorJitter: {brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.4}
- RandFlipImage: {flip_code: 1}
- NormalizeImage: {scale: 1.0/255.0, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], order: ''}
- ToCHWImage:
"""
V2 = """
- RandCropImage: {size: 32, scale: [0.2, 1.0], interpolation: bicubic}
- ColorJitter: {brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1, p: 0.8}
- RandomGrayscale: {p: 0.2}
- GaussianBlur: {sigma: [0.1, 2.0], p: 0.5}
- RandFlipImage: {flip_code: 1}
- NormalizeImage: {scale: 1.0/255.0, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
- ToCHWImage:
"""
KEY = "Data.Train.dataset.transform_ops"


def rng(seed=0):
    return np.random.default_rng(seed)


def random_image(h=40, w=48, seed=0):
    """uint8 RGB HWC noise, the ops' input."""
    return rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def photos():
    """224 px crops of scikit-learn's two sample photos (real JPEG photographs shipped with it):
    the images the ops' tolerances against their references are stated for."""
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        photo = load_sample_image(name)
        crops += [photo[top:top + 224, left:left + 224] for top, left in [(0, 0), (150, 300), (200, 100)]]
    return crops


def pixels(img):
    return np.asarray(img, dtype=np.float64)


def grey_levels(a, b):
    """(mean, 99.9th percentile, max) of |a - b| in grey levels."""
    d = np.abs(pixels(a) - pixels(b))
    return d.mean(), np.percentile(d, 99.9), d.max()


@pytest.mark.parametrize("recipe", [V1, V2])
def test_yaml_recipes_are_seeded_functions(recipe):
    pipeline = build_transforms(yaml.safe_load(recipe), KEY)
    img = random_image()
    out = pipeline(img, rng(7))
    assert out.dtype == np.float32 and out.shape == (3, 32, 32)
    np.testing.assert_array_equal(out, pipeline(img, rng(7)))
    np.testing.assert_array_equal(out, pipeline(Image.fromarray(img), rng(7)))  # a PIL image is its pixels
    assert not np.array_equal(out, pipeline(img, rng(8)))


def coordinate_image(size=200):
    """Red = x, green = y: the crop's extent can be read back from the output pixels."""
    y, x = np.mgrid[:size, :size]
    return np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)


def test_rand_crop_size_area_and_ratio():
    crop = RandCropImage(size=224, scale=[0.2, 1.0], interpolation="nearest")
    for seed in range(40):
        out = np.asarray(crop(coordinate_image(), rng(seed))).astype(int)
        assert out.shape == (224, 224, 3)
        w = out[..., 0].max() - out[..., 0].min() + 1
        h = out[..., 1].max() - out[..., 1].min() + 1
        assert 0.2 - 0.006 <= w * h / 200 ** 2 <= 1.0
        assert 0.75 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_rand_crop_rectangular_size_and_fallback():
    out = RandCropImage(size=[20, 30])(random_image(), rng())
    assert out.shape == (20, 30, 3)
    # No 1:1 image region has aspect ratio 3..4, so every try fails: central 200x67 crop.
    crop = RandCropImage(size=8, scale=[0.9, 1.0], ratio=[3.0, 4.0])
    assert crop.crop_box(200, 200, rng()) == (0, 66, 200, 67)


# Catches: a backend accepted and not used (the pil one must give torchvision's pixels, the PIL
# resize of the crop box; cv2 PaddleClas's, cv2.resize of the cropped region).
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
def test_resize_backends(interpolation):
    photo = load_sample_image("china.jpg")
    flags = {"nearest": (Image.NEAREST, cv2.INTER_NEAREST), "bilinear": (Image.BILINEAR, cv2.INTER_LINEAR),
             "bicubic": (Image.BICUBIC, cv2.INTER_CUBIC)}[interpolation]
    for backend in ("pil", "cv2"):
        crop = RandCropImage(size=[96, 112], interpolation=interpolation, backend=backend)
        left, top, w, h = crop.crop_box(photo.shape[1], photo.shape[0], rng(3))
        out = crop(photo, rng(3))
        if backend == "pil":
            want = Image.fromarray(photo).resize((112, 96), flags[0], box=(left, top, left + w, top + h))
        else:
            want = cv2.resize(photo[top:top + h, left:left + w], (112, 96), interpolation=flags[1])
        np.testing.assert_array_equal(out, np.asarray(want), err_msg=backend)
        resized = ResizeImage(resize_short=50, interpolation=interpolation, backend=backend)(photo, rng())
        want = (Image.fromarray(photo).resize((75, 50), flags[0]) if backend == "pil"
                else cv2.resize(photo, (75, 50), interpolation=flags[1]))
        np.testing.assert_array_equal(resized, np.asarray(want), err_msg=backend)
    with pytest.raises(ConfigError, match="^backend: unknown 'skimage'; choose one of pil, cv2"):
        RandCropImage(size=8, backend="skimage")


def test_flip():
    img = random_image()
    np.testing.assert_array_equal(RandFlipImage(p=1.0)(img, rng()), np.fliplr(img))
    np.testing.assert_array_equal(RandFlipImage(flip_code=0, p=1.0)(img, rng()), np.flipud(img))
    assert RandFlipImage(p=0.0)(img, rng()) is img


def test_normalize_and_chw_match_numpy():
    img = random_image()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    normalize = NormalizeImage(scale="1.0/255.0", mean=mean, std=std)
    hwc = normalize(img, rng())
    expected = (np.asarray(img, dtype=np.float64) / 255.0 - mean) / std
    assert hwc.dtype == np.float32 and hwc.shape == (40, 48, 3)
    np.testing.assert_allclose(hwc, expected, atol=1e-5)
    # the table of 8-bit pixels and the arithmetic of float ones (after Lighting) agree exactly
    np.testing.assert_array_equal(hwc, normalize(img.astype(np.float32), rng()))
    np.testing.assert_array_equal(normalize.invert(hwc), img)
    grey = NormalizeImage(mean=[0.5], std=[0.25])(img, rng())  # one number for every channel
    np.testing.assert_allclose(grey, (img / 255.0 - 0.5) / 0.25, atol=1e-5)
    chw = ToCHWImage()(hwc, rng())
    assert chw.shape == (3, 40, 48) and chw.flags.c_contiguous
    np.testing.assert_array_equal(chw[1], hwc[..., 1])


def test_scale_parsing_never_evaluates():
    assert parse_scale("1.0/255.0") == 1.0 / 255.0
    assert parse_scale(0.5) == 0.5 and parse_scale("2") == 2.0
    for bad in ["__import__('os')", "1/0", "1/2/3", "-1", "nan", True, [1]]:
        with pytest.raises(ConfigError, match="scale"):
            parse_scale(bad)
    cfg = [{"NormalizeImage": {"scale": "__import__('os').getcwd()"}}, {"ToCHWImage": None}]
    with pytest.raises(ConfigError, match=rf"^{KEY}\.0\.NormalizeImage\.scale: .*1\.0/255\.0"):
        build_transforms(cfg, KEY)


def test_color_jitter_zero_is_identity():
    img = random_image()
    np.testing.assert_array_equal(ColorJitter()(img, rng()), img)


def blend_factor(y, x, base, inside):
    """Least-squares f of y = base + f (x - base) over the unclipped pixels, and the max residual."""
    d = (x - base)[inside]
    f = ((y - base)[inside] * d).sum() / (d * d).sum()
    return f, np.abs((y - base)[inside] - f * d).max()


def test_color_jitter_brightness_contrast_saturation_semantics():
    img = random_image()
    x = pixels(img)
    gray = pixels(Image.fromarray(img).convert("L"))[..., None]  # PIL's luma: the reference grey of both blends
    for seed in range(5):
        for kwargs, base in [({"brightness": 0.4}, 0.0),  # blend with black
                             ({"contrast": 0.4}, gray.mean()),  # blend with the mean grey level
                             ({"saturation": 0.4}, gray)]:  # blend with each pixel's own grey
            y = pixels(ColorJitter(**kwargs)(img, rng(seed)))
            inside = np.broadcast_to((y > 0) & (y < 255), y.shape)
            f, residual = blend_factor(y, x, np.broadcast_to(base, y.shape), inside)
            assert 0.6 - 0.01 <= f <= 1.4 + 0.01 and residual <= 1.5, kwargs


def test_color_jitter_hue_rotates_hsv_hue_only():
    img = random_image()
    hsv_in = pixels(Image.fromarray(img).convert("HSV"))
    hsv_out = pixels(Image.fromarray(ColorJitter(hue=0.5)(img, rng(3))).convert("HSV"))
    vivid = (hsv_in[..., 1] > 100) & (hsv_in[..., 2] > 100)
    shift = ((hsv_out[..., 0] - hsv_in[..., 0]) % 256)[vivid].astype(int)
    common = np.bincount(shift).argmax()
    assert common != 0 and np.abs((shift - common + 128) % 256 - 128).max() <= 3
    assert np.abs(hsv_out[..., 2] - hsv_in[..., 2]).max() <= 2


# The references are PIL's ImageEnhance, which torchvision's ColorJitter runs on PIL images (and
# MoCo v2 on its crops), on real photographs at the training size. Brightness and contrast are
# PIL's to the grey level; saturation rounds where PIL truncates (<= 1 level).
# Catches: a blend with the wrong base (grey for contrast, the mean for saturation, ...), the factor
# applied as 1 - f, a contrast mean that is not the luma's, rounding/clipping unlike PIL's.
@pytest.mark.parametrize("factor", [0.0, 0.6, 0.97, 1.4])
def test_brightness_contrast_saturation_match_pil_imageenhance(factor):
    for photo in photos():
        reference = Image.fromarray(photo)
        for adjust, enhancer, tolerance in [(adjust_brightness, ImageEnhance.Brightness, 0),
                                            (adjust_contrast, ImageEnhance.Contrast, 0),
                                            (adjust_saturation, ImageEnhance.Color, 1)]:
            want = np.asarray(enhancer(reference).enhance(factor))
            assert grey_levels(adjust(photo, factor), want)[2] <= tolerance, adjust.__name__


def float_hue_rotation(rgb, shift):
    """The exact hue rotation: float HSV (matplotlib's), H moved by `shift` turns modulo 1."""
    hsv = rgb_to_hsv(rgb / 255.0)
    hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
    return hsv_to_rgb(hsv) * 255.0


def pil_hue_rotation(rgb, shift):
    """torchvision's adjust_hue on PIL images: PIL's 8-bit HSV, H moved by shift * 255 and wrapped."""
    h, s, v = Image.fromarray(rgb).convert("HSV").split()
    h = Image.fromarray(((np.asarray(h, dtype=np.int16) + int(round(shift * 255))) % 256).astype(np.uint8))
    return np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB"))


# 8-bit HSV loses a few levels in saturated colours either way; OpenCV's is at least as close to the
# exact rotation as PIL's (on these photos: mean <= 0.62 vs <= 0.70 levels, 99.9th percentile <= 5.7
# vs <= 7.8).
# Catches: the hue moved in the wrong units (OpenCV's 0..180 HSV or degrees), the wrong direction,
# S or V changed, no wrap-around.
@pytest.mark.parametrize("shift", [0.0, 0.03, -0.1, 0.37, -0.5])
def test_hue_matches_the_exact_rotation_and_pil(shift):
    for photo in photos():
        got = shift_hue(photo, shift)
        mean, p999, _ = grey_levels(got, float_hue_rotation(photo, shift))
        assert mean <= 0.7 and p999 <= 6, (shift, mean, p999)
        assert grey_levels(got, pil_hue_rotation(photo, shift))[0] <= 1.5  # measured <= 1.32


def test_grayscale_matches_pil():
    for photo in photos():
        want = np.asarray(Image.fromarray(photo).convert("L").convert("RGB"))
        assert grey_levels(RandomGrayscale(p=1.0)(photo, rng()), want)[2] <= 1


# MoCo v2's blur is PIL's GaussianBlur(radius=sigma). Catches: a sampled Gaussian (cv2.GaussianBlur
# is 15-22 levels off at sigma 0.3, where it hardly blurs), a radius that is not sigma, one box pass
# instead of three, a border that is not the repeated edge.
@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.7, 1.0, 1.6, 2.0])
def test_gaussian_blur_matches_pil(sigma):
    blur = GaussianBlur(sigma=[sigma, sigma], p=1.0)
    for photo in photos():
        want = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(radius=sigma)))
        mean, _, worst = grey_levels(blur(photo, rng()), want)
        assert mean <= 0.6 and worst <= 3, (sigma, mean, worst)


def reference_color_jitter(img, rng, strengths, p):
    """torchvision's ColorJitter on a PIL image (ImageEnhance), drawing its order and factors from
    `rng` as the dataset's seeded ops do. The hue is ppmoco's (tested above): 8-bit HSV loses
    different levels in OpenCV and PIL, and a strong saturation or contrast after it would
    magnify them (to 20+ levels), hiding what this compares."""
    if rng.random() >= p:
        return img
    pil = Image.fromarray(img)
    for k in rng.permutation(4):
        x = strengths[k]
        if k == 3:
            pil = Image.fromarray(shift_hue(np.asarray(pil), rng.uniform(-x, x)))
        else:
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[k]
            pil = enhancer(pil).enhance(rng.uniform(max(0.0, 1.0 - x), 1.0 + x))
    return np.asarray(pil)


# Catches (each is 27+ levels off on average for some seed): the order not randomised (or drawn and
# not used), factors not uniform in [1 - x, 1 + x], the hue range not [-hue, hue], p ignored. The
# rounding of saturation (<= 1 level), magnified by the adjustments after it, is what remains: mean
# <= 0.8 and 99th percentile <= 5 levels on this photo.
def test_color_jitter_matches_torchvision_semantics_draw_by_draw():
    strengths = [0.4, 0.4, 0.4, 0.1]  # MoCo v2's
    jitter = ColorJitter(*strengths, p=0.8)
    photo = photos()[4]
    for seed in range(24):
        got = jitter(photo, rng(seed))
        d = np.abs(pixels(got) - pixels(reference_color_jitter(photo, rng(seed), strengths, 0.8)))
        assert d.mean() <= 1.0 and np.percentile(d, 99) <= 6, (seed, d.mean(), np.percentile(d, 99))


# Catches: an op writing into its input (a view's op would change the pixels the next view starts
# from; the dataset hands every view the same array).
@pytest.mark.parametrize("op", [RandCropImage(size=16), RandFlipImage(p=1.0), ColorJitter(0.4, 0.4, 0.4, 0.1),
                                RandomGrayscale(p=1.0), GaussianBlur(p=1.0), RandomAffine(degrees=10.0),
                                GaussianNoise(std=0.1), ResizeImage(resize_short=16), CenterCropImage(size=16),
                                NormalizeImage(), Lighting(), Solarize(p=1.0)],
                         ids=lambda op: type(op).__name__)
def test_ops_leave_their_input_alone(op):
    img = random_image()
    original = img.copy()
    img.flags.writeable = False  # numpy and OpenCV refuse to write into it
    op(img, rng())
    np.testing.assert_array_equal(img, original)


# Catches: an op's p ignored (always or never applied) or inverted (applied with 1 - p).
@pytest.mark.parametrize("op", [ColorJitter(brightness=0.4, p=0.3), RandomGrayscale(p=0.3),
                                GaussianBlur(sigma=[1.0, 2.0], p=0.3), RandFlipImage(p=0.3),
                                RandomAffine(scale=[1.5, 2.0], p=0.3), GaussianNoise(std=0.1, p=0.3),
                                Solarize(p=0.3)],
                         ids=lambda op: type(op).__name__)
def test_probability(op):
    img = random_image(16, 16)
    changed = [not np.array_equal(op(img, rng(s)), img) for s in range(300)]
    assert 0.22 < np.mean(changed) < 0.38


def test_grayscale_gives_luma_in_all_channels():
    img = random_image()
    out = pixels(RandomGrayscale(p=1.0)(img, rng()))
    luma = pixels(img) @ np.array([0.299, 0.587, 0.114])
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert np.abs(out[..., 0] - luma).max() <= 1.0
    assert RandomGrayscale(p=0.0)(img, rng()) is img


def test_gaussian_blur_smooths_and_keeps_mean():
    img = random_image(64, 64)
    out = pixels(GaussianBlur(sigma=[1.0, 2.0], p=1.0)(img, rng()))
    assert np.std(np.diff(out, axis=1)) < 0.5 * np.std(np.diff(pixels(img), axis=1))
    assert abs(out.mean() - pixels(img).mean()) < 2.0
    assert GaussianBlur(p=0.0)(img, rng()) is img


# BYOL's and MoCo v3's Solarize is PIL's ImageOps.solarize (threshold 128), on every level of
# every channel. Catches: the comparison at the threshold off by one (> instead of >=), 256 - v
# instead of 255 - v, the levels below the threshold inverted instead of those above, a threshold
# not honoured, a float round trip that rounds.
@pytest.mark.parametrize("threshold", [0, 1, 64, 127, 128, 129, 200, 255, 256])
def test_solarize_matches_pil_bit_for_bit(threshold):
    every_level = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1)
    every_level = np.concatenate([every_level, every_level[..., :1][::-1]], -1).astype(np.uint8)
    for img in [random_image(seed=s) for s in range(3)] + photos()[:2] + [every_level]:
        want = np.asarray(ImageOps.solarize(Image.fromarray(img), threshold))
        got = Solarize(threshold=threshold, p=1.0)(img, rng())
        assert got.dtype == np.uint8 and got.shape == img.shape
        np.testing.assert_array_equal(got, want)
    assert Solarize(threshold=threshold, p=0.0)(img, rng()) is img


# The op draws exactly one number per call, whatever p, and applies iff it is below p (torchvision's
# RandomApply): a draw more or less would shift every later op of the view and every later view.
# Catches: p ignored or inverted, <= instead of <, a draw skipped when p is 0 or 1, an extra draw.
@pytest.mark.parametrize("p", [0.0, 0.2, 1.0])
def test_solarize_applies_on_one_draw_below_p(p):
    img = random_image(8, 8)
    op = Solarize(p=p)
    for seed in range(100):
        draws, reference = rng(seed), rng(seed)
        applied = reference.random() < p
        out = op(img, draws)
        np.testing.assert_array_equal(out, np.asarray(ImageOps.solarize(Image.fromarray(img))) if applied else img)
        assert draws.random() == reference.random()


def test_random_affine_identity_and_translation():
    img = random_image(32, 32)
    np.testing.assert_array_equal(RandomAffine()(img, rng()), img)
    x = img
    for seed in range(5):
        y = RandomAffine(translate=[0.25, 0.0])(img, rng(seed))
        shifts = [t for t in range(-8, 9)
                  if np.array_equal(y, np.roll(x, t, axis=1) * (np.arange(32) - t >= 0)[None, :, None]
                                    * (np.arange(32) - t < 32)[None, :, None])]
        assert len(shifts) == 1


def test_random_affine_rotation_keeps_centre():
    img = np.repeat(np.pad(np.full((8, 8), 255, np.uint8), 12)[..., None], 3, axis=2)
    out = pixels(RandomAffine(degrees=45.0, shear=10.0)(img, rng(1)))
    assert out[16, 16, 0] == 255 and out[0, 0, 0] == 0 and out[..., 0].max() == 255


# PIL's affine transform is what this op ran before OpenCV. Off the input's border (where PIL
# repeats the edge pixel and OpenCV blends in the fill) they agree to a level or two.
# Catches: the centre or the half-pixel convention wrong (half a pixel off: mean 1.9, 99th
# percentile 14 levels), the map inverted (rotation the other way), the fill not 0.
def test_random_affine_matches_pils_affine_transform():
    photo = load_sample_image("flower.jpg")[100:164, 200:264]
    op = RandomAffine(degrees=30.0, translate=[0.1, 0.1], scale=[0.8, 1.2], shear=10.0)
    for seed in range(4):
        draws = rng(seed)
        draws.random()
        angle = math.radians(draws.uniform(-30.0, 30.0))
        tx, ty = round(draws.uniform(-1.0, 1.0) * 0.1 * 64), round(draws.uniform(-1.0, 1.0) * 0.1 * 64)
        scale, shear = draws.uniform(0.8, 1.2), math.radians(draws.uniform(-10.0, 10.0))
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        inverse = np.linalg.inv(scale * rotation @ np.array([[1.0, math.tan(shear)], [0.0, 1.0]]))
        offset = np.array([32.0, 32.0]) - inverse @ np.array([32.0 + tx, 32.0 + ty])  # PIL: centre (w/2, h/2)
        coeffs = (*inverse[0], offset[0], *inverse[1], offset[1])
        want = Image.fromarray(photo).transform((64, 64), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)
        got = op(photo, rng(seed))
        inside = np.asarray(want).min(axis=2) > 0  # away from the fill, whose edge PIL does not blend
        inside &= cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        d = np.abs(pixels(got[inside]) - pixels(np.asarray(want)[inside]))
        assert d.mean() <= 0.7 and np.percentile(d, 99) <= 2, (seed, d.mean(), np.percentile(d, 99))


def test_gaussian_noise_std_and_clip():
    img = np.full((64, 64, 3), 128, np.uint8)
    out = GaussianNoise(std=0.05)(img, rng())
    assert out.dtype == np.uint8 and abs(np.std(pixels(out) - 128) / 255 - 0.05) < 0.005
    bright = pixels(GaussianNoise(std=0.5)(np.full((8, 8, 3), 250, np.uint8), rng()))
    assert bright.max() == 255 and bright.min() >= 0
    np.testing.assert_array_equal(GaussianNoise()(img, rng()), img)


def test_resize_and_center_crop():
    img = random_image(20, 40)
    assert ResizeImage(resize_short=16)(img, rng()).shape == (16, 32, 3)
    assert ResizeImage(size=[10, 12])(img, rng()).shape == (10, 12, 3)
    for size, (top, left) in [(10, (5, 15)), ([7, 9], (6, 16))]:
        h, w = (size, size) if isinstance(size, int) else size
        np.testing.assert_array_equal(CenterCropImage(size)(img, rng()), img[top:top + h, left:left + w])
    # larger than the image: padded with 0 around it, as PIL's crop outside the image is
    for size in [24, [30, 36], [16, 52]]:
        h, w = (size, size) if isinstance(size, int) else size
        top, left = int(round((20 - h) / 2.0)), int(round((40 - w) / 2.0))
        np.testing.assert_array_equal(CenterCropImage(size)(img, rng()),
                                      np.asarray(Image.fromarray(img).crop((left, top, left + w, top + h))))
    for kwargs in [{}, {"resize_short": 8, "size": 8}]:
        with pytest.raises(ConfigError, match="exactly one"):
            ResizeImage(**kwargs)


@pytest.mark.parametrize("ops, size", [
    ("[{ResizeImage: {resize_short: 20}}, {CenterCropImage: {size: 16}}]", (16, 16)),
    ("[{RandCropImage: {size: [12, 10]}}, {RandomAffine: {degrees: 10.0}}, {GaussianBlur: {p: 1.0}}]", (12, 10)),
    ("[{CenterCropImage: {size: 24}}, {ResizeImage: {size: [8, 6]}}, {RandFlipImage: {flip_code: 1}}]", (8, 6)),
    ("[{ResizeImage: {resize_short: 20}}]", None),
    ("[{CenterCropImage: {size: [8, 4]}}, {ResizeImage: {resize_short: 20}}]", (40, 20)),
    ("[]", None),
])
def test_output_size_is_the_size_of_every_output(ops, size):
    # catches: a size-changing op left out of output_size (tools/export.py would export the wrong size)
    pipeline = build_transforms(yaml.safe_load(ops) + [{"NormalizeImage": None}, {"ToCHWImage": None}], "ops")
    assert pipeline.output_size() == size
    shapes = {pipeline(random_image(h, w), rng()).shape for h, w in [(30, 50), (50, 30)]}
    assert shapes == ({(3, *size)} if size else {(3, 20, 33), (3, 33, 20)} if "resize_short" in ops
                      else {(3, 30, 50), (3, 50, 30)})


def test_registry_names():
    ops = {"RandCropImage", "RandFlipImage", "ColorJitter", "RandomGrayscale", "GaussianBlur", "RandomAffine",
           "GaussianNoise", "ResizeImage", "CenterCropImage", "NormalizeImage", "ToCHWImage", "Solarize"}
    assert ops <= set(TRANSFORMS.names())


@pytest.mark.parametrize("bad_op, message", [
    ({"ColorJiter": {"brightness": 0.4}}, rf"^{KEY}\.2: unknown transform op 'ColorJiter'.*did you mean 'ColorJitter'"),
    ({"ColorJitter": {"brightnes": 0.4}}, rf"^{KEY}\.2\.ColorJitter\.brightnes: unknown key.*'brightness'"),
    ({"ColorJitter": {"p": "high"}}, rf"^{KEY}\.2\.ColorJitter\.p: expected float"),
    ({"ColorJitter": {"hue": 0.7}}, rf"^{KEY}\.2\.ColorJitter\.hue: must lie in \[0, 0\.5\]"),
    ({"RandFlipImage": {"p": 1.5}}, rf"^{KEY}\.2\.RandFlipImage\.p: must lie in \[0, 1\]"),
    ({"Solarize": {"threshold": 300}}, rf"^{KEY}\.2\.Solarize\.threshold: must lie in \[0, 256\], got 300$"),
    ({"Solarize": {"threshold": 127.5}}, rf"^{KEY}\.2\.Solarize\.threshold: expected int"),
    ({"Solarize": {"p": -0.1}}, rf"^{KEY}\.2\.Solarize\.p: must lie in \[0, 1\]"),
    ({"RandCropImage": {"size": 8, "interpolation": "lanczos"}},
     rf"^{KEY}\.2\.RandCropImage\.interpolation: unknown 'lanczos'; choose one of nearest, bilinear, bicubic"),
    ({"RandCropImage": {}}, rf"^{KEY}\.2\.RandCropImage: missing required key 'size'"),
    ({"RandCropImage": {"size": [8, 0]}}, rf"^{KEY}\.2\.RandCropImage\.size: expected a positive int"),
    ({"ColorJitter": 0.4}, rf"^{KEY}\.2\.ColorJitter: expected a mapping"),
    ({"RandFlipImage": None, "ColorJitter": None}, rf"^{KEY}\.2: expected a one-key mapping"),
    ("RandFlipImage", rf"^{KEY}\.2: expected a one-key mapping"),
])
def test_config_errors_name_the_key(bad_op, message):
    cfg = yaml.safe_load(V2)
    cfg[2] = bad_op
    with pytest.raises(ConfigError, match=message):
        build_transforms(cfg, KEY)


def test_pipeline_must_end_with_normalize_and_chw():
    for cfg in [[{"RandFlipImage": None}], [{"ToCHWImage": None}, {"NormalizeImage": None}],
                [{"NormalizeImage": None}, {"NormalizeImage": None}, {"ToCHWImage": None}]]:
        with pytest.raises(ConfigError, match=rf"^{KEY}: must end with NormalizeImage then ToCHWImage"):
            build_transforms(cfg, KEY)
    with pytest.raises(ConfigError, match=rf"^{KEY}: expected a list"):
        build_transforms({"RandFlipImage": None}, KEY)
    default = build_transforms(None, KEY)(random_image(), rng())
    assert default.shape == (3, 40, 48) and default.dtype == np.float32


def test_lighting_then_normalize_equals_mmselfsups_lighting_on_the_unit_tensor():
    # Catches the noise added after normalising (it would be divided by std twice or not at all), the
    # eigenvalues applied per row instead of per column (eigvec @ (alpha * eigval)), a draw per pixel
    # instead of per image, and the 0..1 noise added to 0..255 pixels unscaled.

    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 3)).astype(np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pipeline = build_transforms([{"Lighting": None}, {"NormalizeImage": {"mean": mean.tolist(), "std": std.tolist()}},
                                 {"ToCHWImage": None}], "ops")
    got = pipeline(pixels, np.random.default_rng(7))
    alpha = np.random.default_rng(7).normal(0, 0.1, 3)
    eigval = np.array([0.2175, 0.0188, 0.0045])
    eigvec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    rgb = (eigvec * alpha[None, :] * eigval[None, :]).sum(1)  # mmselfsup's expression, written out
    want = ((pixels.transpose(2, 0, 1) / 255.0 + rgb[:, None, None]) - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = (pixels.transpose(2, 0, 1) / 255.0 - mean[:, None, None]) / std[:, None, None]
    assert np.abs(got - plain).max() > 100 * 1e-5  # the noise is well above the tolerance
    with pytest.raises(ConfigError, match="Lighting returns pixel arrays: use it once, right before NormalizeImage"):
        build_transforms([{"Lighting": None}, {"RandFlipImage": None}, {"NormalizeImage": None},
                          {"ToCHWImage": None}], "ops")
