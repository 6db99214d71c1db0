"""Run logging: readable lines on stdout and in output_dir/train.log, scalars to VisualDL.

Only rank 0 writes; other ranks keep a logger that prints warnings and errors.
"""
import logging
import os
import sys


class _LazyFileHandler(logging.FileHandler):
    """Creates the log file (and its folder) with the first record: a run rejected before it logs
    anything leaves nothing behind."""

    def __init__(self, path):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def setup_logger(output_dir, is_main):
    logger = logging.getLogger("ppmoco")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main:
        to_file = _LazyFileHandler(os.path.join(output_dir, "train.log"))
        to_file.setFormatter(fmt)
        logger.addHandler(to_file)
    return logger


class VisualDLWriter:
    """VisualDL writer (scalars, pictures) on rank 0; a no-op elsewhere."""

    def __init__(self, logdir, enabled):
        self._writer = None
        if enabled:
            from visualdl import LogWriter
            self._writer = LogWriter(logdir=logdir)

    def add(self, tag, value, step):
        if self._writer is not None:
            self._writer.add_scalar(tag=tag, value=float(value), step=step)

    def embedding(self, tag, features, labels):
        """Rows of `features` [N, D] with their labels, for VisualDL's embedding view."""
        if self._writer is not None:
            self._writer.add_embeddings(tag=tag, mat=features.tolist(), metadata=[str(int(v)) for v in labels])

    def image(self, tag, pixels, step):
        """`pixels`: uint8 HWC RGB."""
        if self._writer is not None:
            self._writer.add_image(tag=tag, img=pixels, step=step)

    def close(self):
        if self._writer is not None:
            self._writer.close()

