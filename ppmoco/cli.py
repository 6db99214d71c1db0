"""Shared command-line handling for tools/: -c/-o parsing and one-line user errors (exit 2)."""
import argparse
import contextlib
import errno
import multiprocessing
import os
import sys
import threading

from ppmoco.errors import ConfigError, PpmocoError
from ppmoco.host_allocator import restart_with_preferred_allocator
from ppmoco.versions import check_paddle

# A user error raised in a helper thread (see _thread_hook), and who reports it: the main thread
# when it can still exit normally (worker processes are stopped by the exit handlers), else the
# helper thread itself after this grace period.
_THREAD_ERRORS = []
_THREAD_FAILED = threading.Event()
_MAIN_REPORTS = threading.Event()
_GRACE_S = 2.0
_FATAL_HOOKS = []  # see on_fatal


def on_fatal(hook):
    """Call hook(error, line) when the tool fails, before it exits: a user error from any thread, with the
    line it prints, or an unexpected exception, with `Type: message`; for the rest of run(). The
    training tool records there where a rank of a restartable job failed (ppmoco/engine/restart.py)."""
    _FATAL_HOOKS.append(hook)


def _fatal(error, line):
    for hook in _FATAL_HOOKS:
        with contextlib.suppress(OSError):  # a record that cannot be written (disk full) changes no error
            hook(error, line)


class _Parser(argparse.ArgumentParser):
    """An unknown or malformed option is a user error like any other: one `error:` line from run()
    (argparse would print its usage first and say `PROG: error:`)."""

    def error(self, message):
        raise ConfigError(f"{message}; see {self.prog} --help")


def tool_parser(description):
    """The argument parser of every tool: --debug, and bad options reported as user errors."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def parse_args(description, argv=None, add_arguments=None):
    """-c/-o/--debug, plus what `add_arguments(parser)` adds for one tool."""
    parser = tool_parser(description)
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    parser.add_argument("-o", "--override", action="append", default=[], nargs="+",
                        metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    args.override = [item for group in args.override for item in group]
    return args


def one_line(err):
    """The message of user error `err` as one line.

    Paddle's DataLoader re-raises a worker's exception as the same type with the worker's whole
    traceback as its message; the original message is that traceback's last line.
    """
    text = str(err).strip()
    if "\n" in text:
        text = text.splitlines()[-1].strip()
        for name in (f"{type(err).__module__}.{type(err).__qualname__}", type(err).__qualname__):
            if text.startswith(name + ": "):
                text = text[len(name) + 2:]
                break
    return text


def _unexpected(err):
    """An exception that is no user error as one line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__


def _report(message):
    print(f"error: {message}", file=sys.stderr, flush=True)


# File-system failures the user fixes (space, permissions, a file where a folder should be),
# whichever write hits them first: the log, config.yaml, VisualDL, a checkpoint.
_FS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
              errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def _fs_error(err):
    """`err` as a one-line message when it is a file-system failure on a named path, else None."""
    if isinstance(err, OSError) and err.errno in _FS_ERRNOS and err.filename:
        reason = err.strerror
        if err.errno in (errno.ENOTDIR, errno.EEXIST):
            reason = f"{reason} (a file stands where a folder is needed)"
        return (f"file system error on {err.filename}: {reason}; free disk space, fix the "
                "permissions, or point Engine.save_load.output_dir to a writable folder")
    return None


def _thread_hook(debug, previous):
    """threading.excepthook that turns a user error raised in a helper thread into the run's error.

    Python cannot move a thread's exception to the main thread. Paddle's DataLoader decodes in a
    thread when num_workers is 0 and never wakes the consumer if the dataset raises: the main
    thread would wait forever, so after a grace period this hook ends the process itself (any
    checkpoint being written survives: they are atomic). With workers, the DataLoader re-raises a
    worker's error in a reader thread and the main thread fails with an unrelated SystemError:
    run() then reports this error instead and exits normally, which also stops the workers.
    """
    def hook(args):
        if not isinstance(args.exc_value, PpmocoError):
            return previous(args)
        if debug:
            previous(args)
        _THREAD_ERRORS.append(args.exc_value)
        _THREAD_FAILED.set()
        if not _MAIN_REPORTS.wait(_GRACE_S):
            _fatal(args.exc_value, one_line(args.exc_value))
            _report(one_line(args.exc_value))
            for child in multiprocessing.active_children():
                child.terminate()
            os._exit(args.exc_value.exit_code)
    return hook


def run(main, argv=None, preferred_allocator=False):
    """Call main(argv) on a Paddle ppmoco is tested on; a PpmocoError, from any thread, becomes one
    line on stderr and exit code 2.

    preferred_allocator: a tool whose memory is training's first restarts itself on jemalloc when
    installed (ppmoco.host_allocator); only from the command line (argv None), never in a caller's
    process.
    """
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    previous = threading.excepthook
    threading.excepthook = _thread_hook(debug, previous)
    try:
        if preferred_allocator and argv is None:
            restart_with_preferred_allocator()
        check_paddle()
        return main(argv)
    except PpmocoError as e:
        _fatal(e, one_line(e))
        if debug:
            raise
        _report(one_line(e))
        sys.exit(e.exit_code)
    except OSError as e:
        message = _fs_error(e)
        _fatal(e, message or _unexpected(e))
        if message is None or debug:
            raise
        _report(message)
        sys.exit(PpmocoError.exit_code)
    except Exception as e:
        # A helper thread's user error may be the cause (it broke a queue the main thread reads).
        if not _THREAD_FAILED.wait(_GRACE_S if threading.active_count() > 1 else 0):
            _fatal(e, _unexpected(e))
            raise
        _MAIN_REPORTS.set()
        _fatal(_THREAD_ERRORS[0], one_line(_THREAD_ERRORS[0]))
        _report(one_line(_THREAD_ERRORS[0]))
        sys.exit(_THREAD_ERRORS[0].exit_code)
    finally:
        threading.excepthook = previous
        _FATAL_HOOKS.clear()  # registered by this run's main()
