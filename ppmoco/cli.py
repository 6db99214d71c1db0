"""Shared command-line handling for tools/: -c/-o parsing and one-line user errors (exit 2)."""
import argparse
import sys

from ppmoco.errors import PpmocoError


def parse_args(description, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    parser.add_argument("-o", "--override", action="append", default=[], nargs="+",
                        metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = parser.parse_args(argv)
    args.override = [item for group in args.override for item in group]
    return args


def run(main, argv=None):
    """Call main(argv); a PpmocoError becomes one line on stderr and exit code 2."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except PpmocoError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
