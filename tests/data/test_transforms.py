import numpy as np
import pytest
import yaml
from PIL import Image

from ppmoco.data.transforms import (
    TRANSFORMS,
    CenterCropImage,
    ColorJitter,
    GaussianBlur,
    GaussianNoise,
    NormalizeImage,
    RandCropImage,
    RandFlipImage,
    RandomAffine,
    RandomGrayscale,
    ResizeImage,
    ToCHWImage,
    build_transforms,
    parse_scale,
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
    return Image.fromarray(rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def pixels(img):
    return np.asarray(img, dtype=np.float64)


@pytest.mark.parametrize("recipe", [V1, V2])
def test_yaml_recipes_are_seeded_functions(recipe):
    pipeline = build_transforms(yaml.safe_load(recipe), KEY)
    img = random_image()
    out = pipeline(img, rng(7))
    assert out.dtype == np.float32 and out.shape == (3, 32, 32)
    np.testing.assert_array_equal(out, pipeline(img, rng(7)))
    assert not np.array_equal(out, pipeline(img, rng(8)))


def coordinate_image(size=200):
    """Red = x, green = y: the crop's extent can be read back from the output pixels."""
    y, x = np.mgrid[:size, :size]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8), "RGB")


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
    assert out.size == (30, 20)
    # No 1:1 image region has aspect ratio 3..4, so every try fails: central 200x67 crop.
    crop = RandCropImage(size=8, scale=[0.9, 1.0], ratio=[3.0, 4.0])
    assert crop.crop_box(200, 200, rng()) == (0, 66, 200, 67)


def test_flip():
    img = random_image()
    np.testing.assert_array_equal(np.asarray(RandFlipImage(p=1.0)(img, rng())), np.fliplr(np.asarray(img)))
    np.testing.assert_array_equal(np.asarray(RandFlipImage(flip_code=0, p=1.0)(img, rng())),
                                  np.flipud(np.asarray(img)))
    assert RandFlipImage(p=0.0)(img, rng()) is img


def test_normalize_and_chw_match_numpy():
    img = random_image()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    hwc = NormalizeImage(scale="1.0/255.0", mean=mean, std=std)(img, rng())
    expected = (np.asarray(img, dtype=np.float64) / 255.0 - mean) / std
    assert hwc.dtype == np.float32 and hwc.shape == (40, 48, 3)
    np.testing.assert_allclose(hwc, expected, atol=1e-5)
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
    np.testing.assert_array_equal(np.asarray(ColorJitter()(img, rng())), np.asarray(img))


def blend_factor(y, x, base, inside):
    """Least-squares f of y = base + f (x - base) over the unclipped pixels, and the max residual."""
    d = (x - base)[inside]
    f = ((y - base)[inside] * d).sum() / (d * d).sum()
    return f, np.abs((y - base)[inside] - f * d).max()


def test_color_jitter_brightness_contrast_saturation_semantics():
    img = random_image()
    x = pixels(img)
    gray = pixels(img.convert("L"))[..., None]  # PIL's luma: the reference grey of both blends below
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
    hsv_in = pixels(img.convert("HSV"))
    hsv_out = pixels(ColorJitter(hue=0.5)(img, rng(3)).convert("HSV"))
    vivid = (hsv_in[..., 1] > 100) & (hsv_in[..., 2] > 100)
    shift = ((hsv_out[..., 0] - hsv_in[..., 0]) % 256)[vivid].astype(int)
    common = np.bincount(shift).argmax()
    assert common != 0 and np.abs((shift - common + 128) % 256 - 128).max() <= 3
    assert np.abs(hsv_out[..., 2] - hsv_in[..., 2]).max() <= 2


def test_color_jitter_probability():
    img = random_image()
    changed = [not np.array_equal(np.asarray(ColorJitter(brightness=0.4, p=0.3)(img, rng(s))), np.asarray(img))
               for s in range(200)]
    assert 0.2 < np.mean(changed) < 0.4


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


def test_random_affine_identity_and_translation():
    img = random_image(32, 32)
    np.testing.assert_array_equal(np.asarray(RandomAffine()(img, rng())), np.asarray(img))
    x = np.asarray(img)
    for seed in range(5):
        y = np.asarray(RandomAffine(translate=[0.25, 0.0])(img, rng(seed)))
        shifts = [t for t in range(-8, 9)
                  if np.array_equal(y, np.roll(x, t, axis=1) * (np.arange(32) - t >= 0)[None, :, None]
                                    * (np.arange(32) - t < 32)[None, :, None])]
        assert len(shifts) == 1


def test_random_affine_rotation_keeps_centre():
    img = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12), "L").convert("RGB")
    out = pixels(RandomAffine(degrees=45.0, shear=10.0)(img, rng(1)))
    assert out[16, 16, 0] == 255 and out[0, 0, 0] == 0 and out[..., 0].max() == 255


def test_gaussian_noise_std_and_clip():
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    out = pixels(GaussianNoise(std=0.05)(img, rng()))
    assert abs(np.std(out - 128) / 255 - 0.05) < 0.005
    bright = pixels(GaussianNoise(std=0.5)(Image.new("RGB", (8, 8), (250, 250, 250)), rng()))
    assert bright.max() == 255 and bright.min() >= 0
    np.testing.assert_array_equal(np.asarray(GaussianNoise()(img, rng())), np.asarray(img))


def test_resize_and_center_crop():
    img = random_image(20, 40)
    assert ResizeImage(resize_short=16)(img, rng()).size == (32, 16)
    assert ResizeImage(size=[10, 12])(img, rng()).size == (12, 10)
    for size, (top, left) in [(10, (5, 15)), ([7, 9], (6, 16))]:
        h, w = (size, size) if isinstance(size, int) else size
        np.testing.assert_array_equal(np.asarray(CenterCropImage(size)(img, rng())),
                                      np.asarray(img)[top:top + h, left:left + w])
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
           "GaussianNoise", "ResizeImage", "CenterCropImage", "NormalizeImage", "ToCHWImage"}
    assert ops <= set(TRANSFORMS.names())


@pytest.mark.parametrize("bad_op, message", [
    ({"ColorJiter": {"brightness": 0.4}}, rf"^{KEY}\.2: unknown transform op 'ColorJiter'.*did you mean 'ColorJitter'"),
    ({"ColorJitter": {"brightnes": 0.4}}, rf"^{KEY}\.2\.ColorJitter\.brightnes: unknown key.*'brightness'"),
    ({"ColorJitter": {"p": "high"}}, rf"^{KEY}\.2\.ColorJitter\.p: expected float"),
    ({"ColorJitter": {"hue": 0.7}}, rf"^{KEY}\.2\.ColorJitter\.hue: must lie in \[0, 0\.5\]"),
    ({"RandFlipImage": {"p": 1.5}}, rf"^{KEY}\.2\.RandFlipImage\.p: must lie in \[0, 1\]"),
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
    got = pipeline(Image.fromarray(pixels), np.random.default_rng(7))
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
