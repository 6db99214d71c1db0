"""Atomic small-file writes: readers see the old file or the new one, never half of one."""
import os


def write_text_atomic(path, text):
    """Write `text` to `path` through a fsynced temporary file and a rename (creates the folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
