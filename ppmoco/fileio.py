"""Atomic writes: readers see the old file (or folder) or the new one, never half of one."""
import os
import shutil


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


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_dir(*parts):
    """A folder of ppmoco's build cache: $XDG_CACHE_HOME/ppmoco/<parts> (default ~/.cache/ppmoco/...)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ppmoco", *parts)


def replace_dir(new, final):
    """Put the finished folder `new` at `final` (on the same file system), replacing a folder there.

    Its files reach the disk before the rename. An old folder is renamed aside first and deleted
    last, so `final` names the old folder or the new one, each complete; a crash between the two
    renames leaves no `final` and the old folder at `new + '.old'`.
    """
    for root, _, files in os.walk(new):
        for name in files:
            _fsync(os.path.join(root, name))
    aside = f"{new}.old"
    if os.path.exists(final):
        os.rename(final, aside)
    try:
        os.rename(new, final)
    except OSError:
        if os.path.isdir(aside):
            os.rename(aside, final)
        raise
    _fsync(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(aside, ignore_errors=True)
