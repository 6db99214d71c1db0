"""Promise 8: random bytes and damaged JPEG/PNG/GIF/BMP/TIFF/WebP files given to decode_image either
decode to RGB or raise DataError: no other exception, no crash, no hang (fixed seed, bounded time)."""
import io
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ppmoco.data import decode_image
from ppmoco.errors import DataError

HERE = os.path.dirname(__file__)
CASES = 400
# Per call: a few hundred bytes may still claim a canvas of up to PIL.Image.MAX_IMAGE_PIXELS
# (larger is refused before decoding), which takes about a second on one slow core.
PER_CALL_S = 10.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_image_never_escapes_or_hangs(tmp_path, seed):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "decode_fuzz_worker.py"), str(seed), str(CASES),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the decoder crashed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["index"] for r in results] == list(range(CASES))
    escaped = [r for r in results if r["outcome"] == "escaped"]
    assert not escaped, f"not a DataError (inputs kept in {tmp_path}): {escaped[:5]}"
    for r in results:
        if r["outcome"] == "decoded":
            assert r["detail"].startswith("RGB "), r
        else:
            assert "cannot decode image" in r["detail"] and "skip_bad_images" in r["detail"], r
    slow = [r for r in results if r["seconds"] > PER_CALL_S]
    assert not slow, f"decode_image took too long (inputs kept in {tmp_path}): {slow[:5]}"
    # The mix exercised both paths: some damaged files still decode, most are refused.
    outcomes = {r["outcome"] for r in results}
    assert outcomes == {"decoded", "DataError"}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_tiny_file_claiming_a_huge_canvas_is_refused_before_decoding(tmp_path):
    """Found by fuzzing: a 700-byte JPEG whose header says 13000 x 13000 decoded (gray fill) in over
    a second into 500 MB; Pillow only warns below twice MAX_IMAGE_PIXELS, decode_image refuses."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 13000, 13000)
    path = tmp_path / "claims_huge.jpg"
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"claims_huge.jpg: 13000x13000 pixels exceed PIL.Image.MAX_IMAGE_PIXELS"):
        decode_image(str(path))
    assert time.perf_counter() - start < 0.5
