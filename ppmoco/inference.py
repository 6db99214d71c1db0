"""Paddle Inference on CPU: a predictor of a saved model (ppmoco/export.py checks exports with it, the
evaluation fast path runs on it: ppmoco/eval/static_inference.py), and the capture of what native code
prints while one is built and first run."""
import io
import os
import sys
import tempfile

import paddle


def cpu_predictor(prefix, threads, bfloat16=False):
    """A Paddle Inference predictor of the model paddle.jit.save wrote at `prefix` (PREFIX.json and
    PREFIX.pdiparams), on oneDNN with its CPU fusion passes; `bfloat16` runs the ops oneDNN has in
    bfloat16 in bfloat16 (needs AVX512-BF16 or AMX-BF16 to be fast)."""
    # Not config.disable_glog_info(): it silences Paddle's warnings for the whole process, the line
    # naming an op that fails in a later training program among them (callers capture the build's
    # output instead: NativeOutput).
    config = paddle.inference.Config(f"{prefix}.json", f"{prefix}.pdiparams")
    config.set_cpu_math_library_num_threads(threads)
    config.enable_onednn()
    if bfloat16:
        config.enable_onednn_bfloat16()
    return paddle.inference.create_predictor(config)


def _flush_c_stdio():
    """Flush the C library's stdio buffers, which hold lines printed to a pipe until they fill; nothing
    where Python has no handle on the C library (ctypes.CDLL(None) fails on Windows)."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (ImportError, OSError, TypeError, AttributeError):
        pass


class NativeOutput:
    """Keeps what is printed inside the block, by native code (Paddle's passes) or Python code
    (paddle2onnx's logger), off the console and in `text`; a block that raises passes it on to
    stderr as context. Python's sys.stdout/stderr are swapped too, as they need not write to the
    process's file descriptors 1 and 2 (under pytest they do not)."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in self.saved:
            os.dup2(self.file.fileno(), fd)
        self.python = io.StringIO()
        self.streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.python
        return self

    def __exit__(self, exc_type, exc, tb):
        sys.stdout, sys.stderr = self.streams
        _flush_c_stdio()
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace") + self.python.getvalue()
        self.file.close()
        if exc_type is not None:
            sys.stderr.write(self.text)
