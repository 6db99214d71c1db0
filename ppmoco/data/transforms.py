"""Augmentation ops whose randomness comes only from an explicit numpy Generator.

The dataset seeds one Generator per (seed, epoch, sample index), so an augmented sample does not
depend on the number of loader workers or on the order they run in, and a resumed run reproduces
the same views. Ops follow torchvision semantics (as used by the reference MoCo code) and are named
like the FleetX config ops, so a MoCo v1/v2 recipe is written as a FleetX-style YAML list:

    - RandCropImage: {size: 224, scale: [0.2, 1.0]}
    - ColorJitter: {brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1, p: 0.8}
    - RandomGrayscale: {p: 0.2}
    - GaussianBlur: {sigma: [0.1, 2.0], p: 0.5}
    - RandFlipImage: {flip_code: 1}
    - NormalizeImage: {scale: 1.0/255.0}
    - ToCHWImage:

Images travel as uint8 RGB HWC arrays (Compose takes a PIL image or such an array) until
NormalizeImage turns them into float32 HWC arrays; ToCHWImage makes them CHW. Ops never write into
their input: the views of a sample all start from the same decoded pixels. The pixel ops run on
OpenCV, resampling on Pillow unless an op says `backend: cv2` (the reasons and the measurements are
in docs/performance.md). Op constructors raise ConfigError("<arg>: ...") and `build_transforms`
prefixes the config path of the op.
"""
import math

import cv2
import numpy as np
from PIL import Image

from ppmoco.errors import ConfigError
from ppmoco.registry import Registry, check_kwargs, is_number

TRANSFORMS = Registry("transform op")

# A loader worker is one process on one core, and the ops' images are too small for OpenCV's threads
# to pay; set at import, before the loader forks its workers, so that they inherit it.
cv2.setNumThreads(1)

# name -> (Pillow's filter, OpenCV's flag)
_INTERPOLATIONS = {"nearest": (Image.NEAREST, cv2.INTER_NEAREST), "bilinear": (Image.BILINEAR, cv2.INTER_LINEAR),
                   "bicubic": (Image.BICUBIC, cv2.INTER_CUBIC)}
_BACKENDS = ("pil", "cv2")


def _interpolation(name):
    if name not in _INTERPOLATIONS:
        raise ConfigError(f"interpolation: unknown '{name}'; choose one of {', '.join(_INTERPOLATIONS)}")
    return name


def _backend(name):
    """FleetX's `backend` of resizing ops, which PaddleClas offers too: see `resize`."""
    if name not in _BACKENDS:
        raise ConfigError(f"backend: unknown '{name}'; choose one of {', '.join(_BACKENDS)}")
    return name


def resize(pixels, box, size, interpolation, backend):
    """The region `box` (left, top, width, height; fractional where a reduced decode scaled it) of
    `pixels` resized to `size` (height, width).

    backend pil: Pillow's resize, which widens its filter by the shrink factor (antialiasing) and
    is what torchvision runs on PIL images, so the pixels are torchvision's. backend cv2: cv2.resize
    of the region, as PaddleClas's cv2 backend does: several times faster, but its bilinear and
    bicubic filters keep their width when shrinking, so a shrunken crop aliases (fine detail turns
    into false patterns).
    """
    left, top, w, h = box
    pil_filter, cv2_flag = _INTERPOLATIONS[interpolation]
    if backend == "cv2":
        left, top, w, h = (int(round(v)) for v in box)
        return cv2.resize(pixels[top:top + h, left:left + w], (size[1], size[0]), interpolation=cv2_flag)
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), pil_filter,
                                                     box=(left, top, left + w, top + h)))


def _is_positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size(value):
    """`size` as an int or [h, w] of positive ints -> (h, w)."""
    if _is_positive_int(value):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_positive_int(v) for v in value):
        return tuple(value)
    raise ConfigError(f"size: expected a positive int or [height, width], got {value!r}")


def _range(value, key, low):
    """A [min, max] pair of numbers with low <= min <= max."""
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(is_number(v) for v in value)
            and low <= value[0] <= value[1]):
        return float(value[0]), float(value[1])
    raise ConfigError(f"{key}: expected [min, max] with {low} <= min <= max, got {value!r}")


def _non_negative(value, key):
    if value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    return float(value)


def _probability(p):
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"p: must lie in [0, 1], got {p!r}")
    return float(p)


@TRANSFORMS.register(name="DecodeImage")
class DecodeImage:
    """FleetX's first op. The dataset already decodes every file to RGB pixels (with its
    checks and one-line errors), so this op only checks its settings describe that image and
    build_transforms leaves it out of the pipeline."""

    def __init__(self, to_rgb=True, channel_first=False):
        if to_rgb is not True:
            raise ConfigError(f"to_rgb: {to_rgb!r} (BGR) is not supported; images are decoded to RGB: set true")
        if channel_first is not False:
            raise ConfigError("channel_first: the ops work on HWC images and ToCHWImage makes them CHW at "
                              "the end; set false")


@TRANSFORMS.register(name="RandCropImage")
class RandCropImage:
    """RandomResizedCrop: a random area fraction in `scale` and aspect ratio in `ratio`, resized to
    `size` by `backend` (see `resize`)."""

    def __init__(self, size, scale=[0.08, 1.0], ratio=[0.75, 1.3333333333333333], interpolation="bilinear",
                 backend="pil"):
        self.backend = _backend(backend)
        self.size = _size(size)
        self.scale = _range(scale, "scale", low=0.0)
        self.ratio = _range(ratio, "ratio", low=1e-6)
        self.interpolation = _interpolation(interpolation)

    def crop_box(self, width, height, rng):
        """(left, top, w, h) of the crop: 10 random tries, then the central crop closest to `ratio`."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        w, h = width, height
        if width / height < self.ratio[0]:
            h = max(1, int(round(width / self.ratio[0])))
        elif width / height > self.ratio[1]:
            w = max(1, int(round(height * self.ratio[1])))
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, pixels, rng, source_size=None):
        """`source_size` (width, height): the file's size when `pixels` were decoded smaller (a
        reduced JPEG decode, `decode_reduction`): the crop is drawn in the file's coordinates, as
        from a full decode, and scaled to the pixels."""
        height, width = pixels.shape[:2]
        if source_size is None or source_size == (width, height):
            return resize(pixels, self.crop_box(width, height, rng), self.size, self.interpolation, self.backend)
        left, top, w, h = self.crop_box(*source_size, rng)
        sx, sy = width / source_size[0], height / source_size[1]
        return resize(pixels, (left * sx, top * sy, w * sx, h * sy), self.size, self.interpolation, self.backend)

    def decode_reduction(self, width, height):
        """The largest whole factor by which a width x height image may be decoded smaller with every
        crop this op can draw still at least `size` in both directions: crops cover at least
        scale[0] of the area at an aspect ratio within `ratio` (the fallback crop is larger)."""
        area = self.scale[0] * width * height
        smallest_w = math.sqrt(area * self.ratio[0]) - 0.5  # crop_box rounds to the nearest pixel
        smallest_h = math.sqrt(area / self.ratio[1]) - 0.5
        return max(1, int(min(smallest_w / self.size[1], smallest_h / self.size[0])))

    def output_size(self, size):
        return self.size


@TRANSFORMS.register(name="RandFlipImage")
class RandFlipImage:
    """Flip with probability p: flip_code 1 mirrors left-right, 0 flips top-bottom (cv2.flip's codes)."""

    def __init__(self, flip_code=1, p=0.5):
        if flip_code not in (0, 1):
            raise ConfigError(f"flip_code: must be 1 (horizontal) or 0 (vertical), got {flip_code!r}")
        self.flip_code = flip_code
        self.p = _probability(p)

    def __call__(self, pixels, rng):
        return cv2.flip(pixels, self.flip_code) if rng.random() < self.p else pixels


@TRANSFORMS.register(name="ColorJitter")
class ColorJitter:
    """With probability p, jitter brightness, contrast, saturation and hue in a random order.

    Factors are uniform in [max(0, 1 - x), 1 + x] (hue shift in [-hue, hue] of a full turn). The
    adjustments are those of PIL's ImageEnhance, which torchvision uses for PIL images, written
    with OpenCV: brightness blends with black, contrast with the image's mean luma, saturation
    with each pixel's luma, and hue rotates H in HSV. Each result is 8-bit before the next
    adjustment, as in torchvision.
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=1.0):
        self.strengths = [_non_negative(brightness, "brightness"), _non_negative(contrast, "contrast"),
                          _non_negative(saturation, "saturation"), _non_negative(hue, "hue")]
        if hue > 0.5:
            raise ConfigError(f"hue: must lie in [0, 0.5], got {hue!r}")
        self.p = _probability(p)

    def __call__(self, pixels, rng):
        if rng.random() >= self.p:
            return pixels
        for k in rng.permutation(4):
            x = self.strengths[k]
            if x == 0.0:
                continue
            if k == 3:
                pixels = shift_hue(pixels, rng.uniform(-x, x))
            else:
                adjust = (adjust_brightness, adjust_contrast, adjust_saturation)[k]
                pixels = adjust(pixels, rng.uniform(max(0.0, 1.0 - x), 1.0 + x))
        return pixels


def luma(pixels):
    """uint8 luma 0.299 R + 0.587 G + 0.114 B: PIL's "L" conversion to within one grey level."""
    return cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)


def _blend_table(base, factor):
    """base + factor (v - base) for v = 0..255 as PIL's Image.blend computes it (float32, then
    clipped and truncated), a table for cv2.LUT: one lookup per pixel gives PIL's result exactly."""
    levels = np.arange(256, dtype=np.float32)
    return np.clip(np.float32(base) + np.float32(factor) * (levels - np.float32(base)), 0, 255).astype(np.uint8)


def adjust_brightness(pixels, factor):
    """ImageEnhance.Brightness: a blend with black."""
    return cv2.LUT(pixels, _blend_table(0, factor))


def adjust_contrast(pixels, factor):
    """ImageEnhance.Contrast: a blend with the mean luma, rounded to an integer as PIL does."""
    return cv2.LUT(pixels, _blend_table(int(luma(pixels).mean() + 0.5), factor))


def adjust_saturation(pixels, factor):
    """ImageEnhance.Color: a blend with each pixel's luma. cv2.addWeighted rounds where PIL
    truncates, so results are up to one grey level higher."""
    gray = cv2.cvtColor(luma(pixels), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(pixels, factor, gray, 1.0 - factor, 0.0)


def shift_hue(pixels, shift):
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]), wrapping around, in OpenCV's HSV_FULL,
    whose H spans a turn in 0..255 like PIL's HSV; S and V stay."""
    levels = np.arange(256)
    table = np.stack([(levels + int(round(shift * 256))) % 256, levels, levels], axis=-1).astype(np.uint8)
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV_FULL)
    return cv2.cvtColor(cv2.LUT(hsv, table.reshape(256, 1, 3)), cv2.COLOR_HSV2RGB_FULL)


@TRANSFORMS.register(name="RandomGrayscale")
class RandomGrayscale:
    """With probability p, replace the image by its luma copied into all three channels."""

    def __init__(self, p=0.1):
        self.p = _probability(p)

    def __call__(self, pixels, rng):
        return cv2.cvtColor(luma(pixels), cv2.COLOR_GRAY2RGB) if rng.random() < self.p else pixels


@TRANSFORMS.register(name="GaussianBlur")
class GaussianBlur:
    """With probability p, a Gaussian blur of standard deviation sigma ~ U[sigma] (the MoCo v2 blur).

    MoCo v2 blurs with PIL's GaussianBlur(radius=sigma): three box blurs of a fractional radius
    whose combined variance is sigma^2 (Gwosdek et al. 2011), each rounded to 8 bits, the edge
    pixels repeated outwards. This is that algorithm run by OpenCV, within 3 grey levels of PIL.
    A sampled Gaussian (cv2.GaussianBlur) would not do: below sigma ~0.7 it blurs far less than
    its sigma says (at 0.3 its variance is a tenth of sigma^2).
    """

    def __init__(self, sigma=[0.1, 2.0], p=0.5):
        self.sigma = _range(sigma, "sigma", low=0.0)
        self.p = _probability(p)

    def __call__(self, pixels, rng):
        if rng.random() >= self.p:
            return pixels
        kernel = box_kernel(rng.uniform(*self.sigma))
        for _ in range(3):
            pixels = cv2.sepFilter2D(pixels, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)
        return pixels


def box_kernel(sigma, passes=3):
    """The 1-D box [a, 1, ..., 1, a] / sum of which `passes` passes have variance sigma^2: PIL's
    _gaussian_blur_radius (libImaging/BoxBlur.c) gives the radius l + a of the box."""
    variance = sigma * sigma / passes
    length = math.sqrt(12.0 * variance + 1.0)
    whole = math.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))
    return (np.r_[frac, np.ones(2 * whole + 1), frac] / (2 * whole + 1 + 2 * frac)).astype(np.float32)


@TRANSFORMS.register(name="Solarize")
class Solarize:
    """With probability p, invert every pixel value >= threshold (v -> 255 - v), the others kept:
    PIL's ImageOps.solarize, which BYOL's and MoCo v3's Solarize runs with threshold 128, as one
    table lookup (cv2.LUT), so its pixels are PIL's exactly. threshold 0 inverts all, 256 nothing."""

    def __init__(self, threshold=128, p=1.0):
        if not 0 <= threshold <= 256:
            raise ConfigError(f"threshold: must lie in [0, 256], got {threshold!r}")
        self.threshold = threshold
        self.p = _probability(p)
        levels = np.arange(256)
        self.table = np.where(levels < threshold, levels, 255 - levels).astype(np.uint8)

    def __call__(self, pixels, rng):
        return cv2.LUT(pixels, self.table) if rng.random() < self.p else pixels


@TRANSFORMS.register(name="RandomAffine")
class RandomAffine:
    """With probability p, rotate by ±degrees, x-shear by ±shear degrees, scale and translate about
    the image centre (bilinear, uncovered pixels 0); meant for small digit images."""

    def __init__(self, degrees=0.0, translate=[0.0, 0.0], scale=[1.0, 1.0], shear=0.0, p=1.0):
        self.degrees = _non_negative(degrees, "degrees")
        if not (len(translate) == 2 and all(is_number(t) and 0.0 <= t <= 1.0 for t in translate)):
            raise ConfigError(f"translate: expected [fraction of width, fraction of height] in [0, 1], "
                              f"got {translate!r}")
        self.translate = (float(translate[0]), float(translate[1]))
        self.scale = _range(scale, "scale", low=1e-6)
        self.shear = _non_negative(shear, "shear")
        self.p = _probability(p)

    def __call__(self, pixels, rng):
        if rng.random() >= self.p:
            return pixels
        height, width = pixels.shape[:2]
        angle = math.radians(rng.uniform(-self.degrees, self.degrees))
        tx = round(rng.uniform(-1.0, 1.0) * self.translate[0] * width)
        ty = round(rng.uniform(-1.0, 1.0) * self.translate[1] * height)
        scale = rng.uniform(*self.scale)
        shear = math.radians(rng.uniform(-self.shear, self.shear))
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        forward = scale * rotation @ np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
        # The output -> input map, input = centre + forward^-1 (output - centre - shift), in
        # coordinates where pixel i is centred on i (OpenCV's), so the centre is (size - 1) / 2.
        inverse = np.linalg.inv(forward)
        centre = np.array([(width - 1) * 0.5, (height - 1) * 0.5])
        offset = centre - inverse @ (centre + np.array([tx, ty]))
        return cv2.warpAffine(pixels, np.hstack([inverse, offset[:, None]]), (width, height),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)


@TRANSFORMS.register(name="GaussianNoise")
class GaussianNoise:
    """With probability p, add N(0, std) noise in [0, 1] pixel units, clipped to [0, 1].

    It rounds back to 8-bit pixels (an error of at most 0.5/255) so that it can sit anywhere among
    the pixel ops, before NormalizeImage.
    """

    def __init__(self, std=0.0, p=1.0):
        self.std = _non_negative(std, "std")
        self.p = _probability(p)

    def __call__(self, pixels, rng):
        if rng.random() >= self.p or self.std == 0.0:
            return pixels
        unit = pixels / 255.0
        noisy = np.clip(unit + rng.normal(0.0, self.std, unit.shape), 0.0, 1.0)
        return np.round(noisy * 255.0).astype(np.uint8)


@TRANSFORMS.register(name="ResizeImage")
class ResizeImage:
    """Resize the short side to `resize_short` (keeping the aspect ratio), or to exactly `size`, by
    `backend` (see `resize`)."""

    def __init__(self, resize_short=None, size=None, interpolation="bilinear", backend="pil"):
        self.backend = _backend(backend)
        if (resize_short is None) == (size is None):
            raise ConfigError("resize_short: set exactly one of resize_short and size")
        if not (resize_short is None or _is_positive_int(resize_short)):
            raise ConfigError(f"resize_short: expected a positive int, got {resize_short!r}")
        self.resize_short = resize_short
        self.size = None if size is None else _size(size)
        self.interpolation = _interpolation(interpolation)

    def __call__(self, pixels, rng):
        height, width = pixels.shape[:2]
        return resize(pixels, (0, 0, width, height), self.output_size((height, width)), self.interpolation,
                      self.backend)

    def output_size(self, size):
        """(height, width) this op gives an image of `size` (None: unknown, then only `size` tells)."""
        if self.size is not None:
            return self.size
        if size is None:
            return None
        h, w = size
        if w <= h:
            return max(1, int(round(self.resize_short * h / w))), self.resize_short
        return self.resize_short, max(1, int(round(self.resize_short * w / h)))


@TRANSFORMS.register(name="CenterCropImage")
class CenterCropImage:
    """Crop the central `size` region (images smaller than that are padded with 0)."""

    def __init__(self, size):
        self.size = _size(size)

    def __call__(self, pixels, rng):
        h, w = self.size
        top = int(round((pixels.shape[0] - h) / 2.0))
        left = int(round((pixels.shape[1] - w) / 2.0))
        margin = max(0, -top, -left, top + h - pixels.shape[0], left + w - pixels.shape[1])
        if margin:
            pixels = np.pad(pixels, ((margin, margin), (margin, margin), (0, 0)))
        return pixels[top + margin:top + margin + h, left + margin:left + margin + w]

    def output_size(self, size):
        return self.size


def parse_scale(value):
    """A positive number, or a string "a" or "a/b" as FleetX configs write `1.0/255.0`; never eval'd."""
    number = None
    if is_number(value):
        number = float(value)
    elif isinstance(value, str) and value.count("/") <= 1:
        try:
            parts = [float(part) for part in value.split("/")]
            number = parts[0] / parts[1] if len(parts) == 2 else parts[0]
        except (ValueError, ZeroDivisionError):
            pass
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(f"scale: expected a positive number or a fraction like '1.0/255.0', got {value!r}")
    return number


def _channel_stats(values, key):
    if not (len(values) in (1, 3) and all(is_number(v) for v in values)):
        raise ConfigError(f"{key}: expected 3 numbers (one per RGB channel) or 1 for all, got {values!r}")
    return np.asarray(values, dtype=np.float32)


@TRANSFORMS.register(name="Lighting")
class Lighting:
    """AlexNet's PCA lighting noise (mmselfsup's `Lighting`, from fb.resnet.torch): every pixel gets
    eigvec @ (alpha * eigval) with alpha ~ N(0, alphastd) per image, ImageNet's RGB eigen-decomposition
    by default. mmselfsup adds it to the [0, 1] tensor before normalising; here it is added to the
    0..255 pixel values (times 255), which NormalizeImage's default scale turns into the same thing.
    It returns a float32 HWC array, so it comes right before NormalizeImage."""

    def __init__(self, alphastd=0.1, eigval=[0.2175, 0.0188, 0.0045],
                 eigvec=[[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]):
        self.alphastd = _non_negative(alphastd, "alphastd")
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)
        if self.eigval.shape != (3,) or self.eigvec.shape != (3, 3):
            raise ConfigError(f"eigval, eigvec: expected 3 values and a 3 x 3 matrix, got {eigval!r}, {eigvec!r}")

    def __call__(self, pixels, rng):
        alpha = rng.normal(0.0, self.alphastd, 3)
        rgb = self.eigvec @ (alpha * self.eigval)
        return (np.asarray(pixels, dtype=np.float32) + (255.0 * rgb).astype(np.float32)).astype(np.float32)


@TRANSFORMS.register(name="NormalizeImage")
class NormalizeImage:
    """RGB pixels -> float32 HWC array (x * scale - mean) / std. scale None means 1/255.

    8-bit pixels go through a table of the 256 results per channel (cv2.LUT: one lookup per value,
    the same float32 numbers as the arithmetic); Lighting's float pixels through the arithmetic.
    """

    def __init__(self, scale=None, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], order=""):
        self.scale = np.float32(1.0 / 255.0 if scale is None else parse_scale(scale))
        self.mean = _channel_stats(mean, "mean")
        self.std = _channel_stats(std, "std")
        if np.any(self.std == 0):
            raise ConfigError(f"std: must be non-zero, got {std!r}")
        if order not in ("", "hwc"):
            raise ConfigError(f"order: only '' (HWC) is supported, got {order!r}; "
                              "end the list with ToCHWImage to get CHW")
        levels = np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1)
        self.table = self.normalize(levels).reshape(256, 1, 3)

    def normalize(self, pixels):
        return (pixels * self.scale - self.mean) / self.std

    def __call__(self, pixels, rng):
        if pixels.dtype == np.uint8:
            return cv2.LUT(pixels, self.table)
        return self.normalize(np.asarray(pixels, dtype=np.float32))

    def invert(self, normalized):
        """float32 HWC array this op produced -> uint8 RGB pixels (rounded, clipped), for pictures."""
        pixels = (np.asarray(normalized, dtype=np.float32) * self.std + self.mean) / self.scale
        return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


@TRANSFORMS.register(name="ToCHWImage")
class ToCHWImage:
    """HWC array -> contiguous CHW array, the layout paddle's conv layers expect."""

    def __call__(self, img, rng):
        return np.ascontiguousarray(np.transpose(img, (2, 0, 1)))


class Compose:
    """Apply the ops in order, all drawing from one Generator: (RGB PIL image or uint8 HWC array,
    rng) -> float32 CHW."""

    def __init__(self, ops):
        self.ops = list(ops)

    def __call__(self, img, rng, source_size=None):
        """`source_size`: see decode_reduction; only the first op sees it (it says where its crop
        lies), later ops work on what the first made."""
        img = np.asarray(img)
        for i, op in enumerate(self.ops):
            img = op(img, rng, source_size) if i == 0 and source_size is not None else op(img, rng)
        return img

    def decode_reduction(self, width, height):
        """By how much a width x height file may be decoded smaller without losing resolution in
        any view: the first op's answer (RandCropImage's), else 1 (decode in full)."""
        first = self.ops[0] if self.ops else None
        return first.decode_reduction(width, height) if hasattr(first, "decode_reduction") else 1

    def output_size(self):
        """(height, width) of every array this pipeline returns, or None when that depends on the
        input image. Ops that set the size have `output_size(size_before)`; the others keep it."""
        size = None
        for op in self.ops:
            if hasattr(op, "output_size"):
                size = op.output_size(size)
        return size


def _build_ops(ops_cfg, key_path):
    """The op objects of a FleetX-style list at config `key_path`, each checked and built."""
    example = "like '- RandFlipImage: {p: 0.5}'"
    if not isinstance(ops_cfg, (list, tuple)):
        raise ConfigError(f"{key_path}: expected a list of ops {example}, got {type(ops_cfg).__name__}")
    ops = []
    for i, item in enumerate(ops_cfg):
        if not (isinstance(item, dict) and len(item) == 1):
            raise ConfigError(f"{key_path}.{i}: expected a one-key mapping {example}, got {item!r}")
        (name, kwargs), = item.items()
        op_path = f"{key_path}.{i}.{name}"
        if not (kwargs is None or isinstance(kwargs, dict)):
            raise ConfigError(f"{op_path}: expected a mapping of arguments or nothing, got {kwargs!r}")
        cls = TRANSFORMS.get(name, f"{key_path}.{i}")
        check_kwargs(cls, kwargs or {}, op_path)
        try:
            ops.append(cls(**(kwargs or {})))
        except ConfigError as err:
            raise ConfigError(f"{op_path}.{err}") from None
    return ops


def build_transforms(ops_cfg, key_path, first_cfg=None, first_path=None):
    """Compose from a FleetX-style list [{OpName: {kwargs} or None}, ...].

    None gives just NormalizeImage (ImageNet statistics) + ToCHWImage. Otherwise the list must end
    with NormalizeImage then ToCHWImage, so every sample leaves as a float32 CHW array.
    `first_cfg` (at config `first_path`): ops that run before the list's own (a dataset's
    transform_ops shared by per-view lists); NormalizeImage and ToCHWImage end the list, not them.
    """
    if ops_cfg is None and first_cfg is None:
        return Compose([NormalizeImage(), ToCHWImage()])
    first = [] if first_cfg is None else _build_ops(first_cfg, first_path)
    if any(isinstance(op, (NormalizeImage, ToCHWImage)) for op in first):
        raise ConfigError(f"{first_path}: NormalizeImage and ToCHWImage end each pipeline, so they go at the end "
                          f"of {key_path}, not in the ops that run before it; move them there")
    own = _build_ops(ops_cfg, key_path)
    ops = first + own
    if any(isinstance(op, DecodeImage) for op in ops[1:]):
        where = first_path if any(isinstance(op, DecodeImage) for op in first[1:]) else key_path
        raise ConfigError(f"{where}: DecodeImage may only come first (images arrive decoded)")
    ops = [op for op in ops if not isinstance(op, DecodeImage)]
    kinds = [type(op) for op in ops]
    if Lighting in kinds and (kinds.count(Lighting) > 1 or kinds[-3:-2] != [Lighting]):
        raise ConfigError(f"{key_path}: Lighting returns pixel arrays: use it once, right before NormalizeImage")
    if kinds[-2:] != [NormalizeImage, ToCHWImage] or kinds.count(NormalizeImage) + kinds.count(ToCHWImage) != 2:
        raise ConfigError(f"{key_path}: must end with NormalizeImage then ToCHWImage (and use them only "
                          "there); append '- NormalizeImage: {scale: 1.0/255.0}' and '- ToCHWImage:'")
    return Compose(ops)
