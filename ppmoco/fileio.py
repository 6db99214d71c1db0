"""Atomic small-file writes: readers see the old file or the new one, never half of one."""
import os


def _write_atomic(path, data, mode, **open_kwargs):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, **open_kwargs) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (disk full, interrupt) leaves neither a half file nor its temporary.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    """Write `text` to `path` through a fsynced temporary file and a rename (creates the folder)."""
    _write_atomic(path, text, "w", encoding="utf-8")


def write_bytes_atomic(path, data):
    """`write_text_atomic` for bytes (an encoded PNG, ...)."""
    _write_atomic(path, data, "wb")
