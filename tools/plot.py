"""Curves of a run as a PNG: python tools/plot.py RUN_DIR [--out PATH] [--size 1200x800].

RUN_DIR is a run's Engine.save_load.output_dir; its VisualDL logs (vdl/) give loss, learning rate,
training acc1, images/s, kNN top-1 per k and linear top-1, whichever the run logged. Written to
RUN_DIR/curves.png unless --out says otherwise.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run  # noqa: E402
from ppmoco.errors import ConfigError  # noqa: E402
from ppmoco.fileio import write_bytes_atomic  # noqa: E402
from ppmoco.plots import plot_curves, read_scalars  # noqa: E402


def parse_size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected WIDTHxHEIGHT in pixels like 1200x800, got {text!r}") from None
    if width < 100 or height < 100:
        raise ConfigError(f"--size: at least 100x100 pixels, got {text!r}")
    return width, height


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's output_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    parser.add_argument("--size", default="1200x800", help="WIDTHxHEIGHT in pixels")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    png, panels = plot_curves(read_scalars(args.run_dir), size)
    out = args.out or os.path.join(args.run_dir, "curves.png")
    write_bytes_atomic(out, png)
    drawn = "; ".join(f"{title}: {', '.join(tags)}" for title, tags in panels.items())
    print(f"wrote {out} ({size[0]}x{size[1]} px): {drawn}")
    return out


if __name__ == "__main__":
    run(main)
