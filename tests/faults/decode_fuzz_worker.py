"""Child process of test_decode_fuzz.py: decode seeded random and mutated images, one JSON line each.

Run apart from pytest so that a decoder crash (a signal) or a hang fails the test instead of
taking the test session down with it. Usage: decode_fuzz_worker.py SEED CASES WORKDIR
"""
import io
import json
import os
import struct
import sys
import time
import warnings

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from ppmoco.data.datasets import decode_image  # noqa: E402
from ppmoco.errors import DataError  # noqa: E402

MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"RIFF\x00\x00\x00\x00WEBP", b"P6\n")


def valid_images(rng):
    """Small valid files in the formats and modes datasets meet, as mutation seeds."""
    pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    out = []
    for fmt, mode, kwargs in (("JPEG", "RGB", {}), ("JPEG", "RGB", {"progressive": True}), ("JPEG", "CMYK", {}),
                              ("JPEG", "L", {}), ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}),
                              ("PNG", "I;16", {}), ("GIF", "P", {}), ("BMP", "RGB", {}), ("TIFF", "RGB", {}),
                              ("WEBP", "RGB", {}), ("PPM", "RGB", {})):
        img = Image.fromarray(pixels)
        if mode == "I;16":
            img = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
        elif mode != "RGB":
            img = img.convert(mode)
        buffer = io.BytesIO()
        img.save(buffer, fmt, **kwargs)
        out.append(buffer.getvalue())
    return out


def mutate(data, rng):
    """One random damage: flipped bytes, a cut, inserted or deleted bytes, or a header field set high."""
    data = bytearray(data) or bytearray(b"\x00")
    kind = rng.integers(6)
    at = int(rng.integers(len(data)))
    if kind == 0:
        for _ in range(rng.integers(1, 12)):
            data[rng.integers(len(data))] = rng.integers(256)
    elif kind == 1:
        del data[at:]
    elif kind == 2:
        data[at:at] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
    elif kind == 3:
        del data[at:at + int(rng.integers(1, 64))]
    elif kind == 4:  # early bytes hold sizes, counts and offsets: make one huge
        head = int(rng.integers(min(len(data), 48)))
        data[head:head + 2] = struct.pack(">H", int(rng.integers(0x8000, 0x10000)))
    else:
        head = int(rng.integers(min(len(data), 48)))
        data[head:head + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
    return bytes(data)


def case(rng, seeds):
    r = rng.random()
    if r < 0.15:
        return rng.integers(0, 256, rng.integers(0, 3000), dtype=np.uint8).tobytes()
    if r < 0.3:
        return MAGICS[rng.integers(len(MAGICS))] + rng.integers(0, 256, rng.integers(0, 600), dtype=np.uint8).tobytes()
    data = seeds[rng.integers(len(seeds))]
    for _ in range(rng.integers(1, 4)):
        data = mutate(data, rng)
    return data


def main(seed, cases, workdir):
    warnings.simplefilter("ignore")  # Pillow warns a lot about broken metadata; only raising counts
    rng = np.random.default_rng(seed)
    seeds = valid_images(rng)
    path = os.path.join(workdir, "case.img")
    for index in range(cases):
        data = case(rng, seeds)
        with open(path, "wb") as f:
            f.write(data)
        start = time.perf_counter()
        try:
            img = decode_image(path)
            outcome, detail = "decoded", f"{img.mode} {img.size}"
        except DataError as err:
            outcome, detail = "DataError", str(err)
        except BaseException as err:  # what the test is looking for
            outcome, detail = "escaped", f"{type(err).__module__}.{type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
        if outcome != "DataError" or seconds > 1.0:  # keep the evidence for the test's message
            with open(os.path.join(workdir, f"case_{index}.img"), "wb") as f:
                f.write(data)
        print(json.dumps({"index": index, "outcome": outcome, "detail": detail[:300], "seconds": seconds}),
              flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
