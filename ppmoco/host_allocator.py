"""The host memory allocator the training tools run on: jemalloc where it is installed, else
ppmoco's large-block cache (large_blocks.c), else the C library's.

Paddle's CPU tensors come straight from malloc. Under glibc's malloc a training step's activations,
freed and allocated again in another order every step, either fragment its heap (the resident set
climbs well past what the step has in use) or are unmapped when freed and faulted in again every
step. jemalloc with its freed pages kept, and ppmoco's large-block cache (large blocks in a range of
their own, best fit, freed pages kept), hold the step's memory flat at what it uses, at glibc's
best speed (docs/performance.md, "Memory"). A process cannot change its malloc once it runs, so a
tool starts itself again with the allocator preloaded (LD_PRELOAD), once, before it imports Paddle;
as PyTorch's CPU launcher (torch.backends.xeon.run_cpu) preloads tcmalloc or jemalloc when it finds
one. The large-block cache is compiled with the C compiler (`cc`, or $CC) at first use into
$XDG_CACHE_HOME/ppmoco/malloc/<hash>; where it cannot be, the tools say why once and run on the C
library's.

PPMOCO_ALLOCATOR chooses: `auto` (the default: the first of the three that is available),
`jemalloc`, `large_blocks` (each an error where it is not available), `system` (the C library's
malloc; what a preload set by the user also means).
"""
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import tempfile

from ppmoco.errors import ConfigError
from ppmoco.fileio import cache_dir

CHOICE = "PPMOCO_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "large_blocks", "system")
# Set in the restarted process: the preload was tried, whether or not the dynamic linker managed it.
PRELOADED = "PPMOCO_ALLOCATOR_PRELOADED"
# jemalloc returns freed pages to the kernel after 10 s by default, so each step would fault its
# activations in again; keeping them is the counterpart of glibc's keep_freed_memory.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
LARGE_BLOCKS_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "large_blocks.c")
LARGE_BLOCKS_NAME = "libppmoco_large_blocks.so"
_ALLOCATOR_LIBRARIES = ("jemalloc", "tcmalloc", "mimalloc", "ppmoco_large_blocks")


def library_dirs():
    """Where jemalloc is installed by conda/pip prefixes, Debian/Ubuntu (multiarch) and RPM systems."""
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs = [os.path.join(sys.prefix, "lib")]
    dirs += [f"/usr/lib/{multiarch}", f"/usr/local/lib/{multiarch}"] if multiarch else []
    return dirs + ["/usr/lib64", "/usr/lib", "/usr/local/lib64", "/usr/local/lib"]


def find_jemalloc(dirs=None):
    """The path of the first jemalloc library in `dirs` (default: library_dirs()), else None."""
    for folder in library_dirs() if dirs is None else dirs:
        for name in JEMALLOC_NAMES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def user_preloads_allocator(environ):
    """Whether LD_PRELOAD in `environ` already names a malloc replacement."""
    return any(name in environ.get("LD_PRELOAD", "") for name in _ALLOCATOR_LIBRARIES)


def large_blocks_directory(compiler):
    """Where the large-block cache built from this source with `compiler` for this machine's
    architecture is kept (a home folder may be shared between machines)."""
    with open(LARGE_BLOCKS_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + f"{compiler}\0{platform.machine()}".encode()).hexdigest()[:16]
    return cache_dir("malloc", digest)


def build_large_blocks(environ):
    """The path of ppmoco's large-block cache library, compiled at its first use with $CC (default
    cc); ConfigError naming the cause and the fix where it cannot be built here."""
    what = "ppmoco's large-block cache (PPMOCO_ALLOCATOR=large_blocks)"
    if platform.libc_ver()[0] != "glibc":
        raise ConfigError(f"{what} runs on glibc's malloc, and this system's C library is another: "
                          f"set {CHOICE}=system")
    compiler = environ.get("CC") or "cc"
    folder = large_blocks_directory(compiler)
    library = os.path.join(folder, LARGE_BLOCKS_NAME)
    if os.path.isfile(library):
        return library
    try:
        os.makedirs(folder, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=LARGE_BLOCKS_NAME, dir=folder)
        os.close(fd)
    except OSError as err:
        raise ConfigError(f"{what} cannot be built: its cache folder {folder} cannot be written "
                          f"({err.strerror}): make it writable, or set XDG_CACHE_HOME to a writable folder "
                          "(it is built in $XDG_CACHE_HOME/ppmoco/malloc)") from err
    try:
        cmd = [*shlex.split(compiler), "-O2", "-shared", "-fPIC", "-o", partial, LARGE_BLOCKS_SOURCE,
               "-ldl", "-lpthread"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ConfigError(f"{what} cannot be built: the C compiler {compiler!r} does not run "
                              f"({getattr(err, 'strerror', None) or err}): install one (apt install gcc) "
                              "or name it in CC") from err
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise ConfigError(f"{what} does not compile with {compiler!r} ({last}): install gcc or clang, "
                              "or name another compiler in CC")
        os.replace(partial, library)  # each process builds its own copy: a reader never sees half of one
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


def preload_wanted(environ, find=find_jemalloc, build=build_large_blocks):
    """The library to restart with, or None to run on as is. Raises ConfigError for a bad choice or a
    chosen allocator that is not available; under `auto`, one missing is a warning on stderr."""
    choice = environ.get(CHOICE, "auto")
    if choice not in CHOICES:
        raise ConfigError(f"environment variable {CHOICE}={choice!r}: expected one of {', '.join(CHOICES)}")
    if (choice == "system" or PRELOADED in environ or not sys.platform.startswith("linux")
            or user_preloads_allocator(environ)):
        return None
    library = find() if choice in ("auto", "jemalloc") else None
    if library is None and choice == "jemalloc":
        raise ConfigError(f"environment variable {CHOICE}=jemalloc: no jemalloc library in "
                          f"{', '.join(library_dirs())}; install it (apt install libjemalloc2, "
                          f"conda install jemalloc) or set {CHOICE}=auto")
    if library is not None:
        return library
    try:
        return build(environ)
    except ConfigError as err:
        if choice == "large_blocks":
            raise
        print(f"warning: {err}; this run uses the C library's malloc, with more memory (docs/performance.md, Memory)",
              file=sys.stderr, flush=True)
        return None


def preload_environment(environ, library):
    """`environ` with `library` first in LD_PRELOAD, jemalloc's page keeping unless MALLOC_CONF is
    set (for jemalloc), and the mark that stops a second restart."""
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [library, environ.get("LD_PRELOAD", "")]))
    if "jemalloc" in os.path.basename(library):
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[PRELOADED] = library
    return env


def restart_with_preferred_allocator():
    """Start this process again (same PID, arguments and interpreter options) on the allocator
    PPMOCO_ALLOCATOR and this machine choose; returns when nothing is to be done.
    Call before anything is printed, any thread is started or Paddle is imported."""
    library = preload_wanted(os.environ)
    if library is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, preload_environment(os.environ, library))


def loaded_allocator(maps="/proc/self/maps"):
    """The malloc this process runs on, as a log line shows it: a preloaded allocator's library path,
    else "the C library's"."""
    try:
        with open(maps, encoding="utf-8") as f:
            mapped = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return "the C library's"
    found = sorted(path for path in mapped if any(name in os.path.basename(path) for name in _ALLOCATOR_LIBRARIES))
    return found[0] if found else "the C library's"
