"""The host memory allocator the training tools run on: jemalloc where it is installed.

Paddle's CPU tensors come straight from malloc. Under glibc's malloc a training step's activations,
freed and allocated again in another order every step, fragment the heap: the resident set climbs
well past what the step has in use over the first steps. jemalloc, with its freed pages kept, holds
it flat at what the step uses, at the same speed (docs/performance.md, "The tools restart themselves
on jemalloc"). A process cannot change its malloc once it runs, so a tool that wants jemalloc starts
itself again with it preloaded (LD_PRELOAD), once, before it imports Paddle; as PyTorch's CPU
launcher (torch.backends.xeon.run_cpu) preloads tcmalloc or jemalloc when it finds one.

PPMOCO_ALLOCATOR chooses: `auto` (the default: jemalloc when found, else the C library's), `jemalloc`
(an error when it is not found), `system` (the C library's malloc; what a preload set by the user
also means).
"""
import os
import sys
import sysconfig

from ppmoco.errors import ConfigError

CHOICE = "PPMOCO_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "system")
# Set in the restarted process: the preload was tried, whether or not the dynamic linker managed it.
PRELOADED = "PPMOCO_ALLOCATOR_PRELOADED"
# jemalloc returns freed pages to the kernel after 10 s by default, so each step would fault its
# activations in again; keeping them is the counterpart of glibc's keep_freed_memory.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
_ALLOCATOR_LIBRARIES = ("jemalloc", "tcmalloc", "mimalloc")


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


def preload_wanted(environ, find=find_jemalloc):
    """The library to restart with, or None to run on as is. Raises ConfigError for a bad choice."""
    choice = environ.get(CHOICE, "auto")
    if choice not in CHOICES:
        raise ConfigError(f"environment variable {CHOICE}={choice!r}: expected one of {', '.join(CHOICES)}")
    if (choice == "system" or PRELOADED in environ or not sys.platform.startswith("linux")
            or user_preloads_allocator(environ)):
        return None
    library = find()
    if library is None and choice == "jemalloc":
        raise ConfigError(f"environment variable {CHOICE}=jemalloc: no jemalloc library in "
                          f"{', '.join(library_dirs())}; install it (apt install libjemalloc2, "
                          f"conda install jemalloc) or set {CHOICE}=auto")
    return library


def preload_environment(environ, library):
    """`environ` with `library` first in LD_PRELOAD, jemalloc's page keeping unless MALLOC_CONF is
    set, and the mark that stops a second restart."""
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [library, environ.get("LD_PRELOAD", "")]))
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[PRELOADED] = library
    return env


def restart_with_preferred_allocator():
    """Start this process again (same PID, arguments and interpreter options) on jemalloc, when
    PPMOCO_ALLOCATOR and the installed libraries say so; returns when nothing is to be done.
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
