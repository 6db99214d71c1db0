"""Look at the augmentation before a long run: a PNG grid of training images beside their views.

    python tools/show_views.py -c configs/mocov2_pt_digits_1n2c.yaml --num 8 --size 96

Each row is one image of Data.Train.dataset: the decoded image, then each of its augmented views
exactly as training draws them in epoch --epoch (same seed, crops, colour, blur, flips), undone from
NormalizeImage back to pixels. Written to --out (default: Engine.save_load.output_dir/views.png).
"""
import io
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import parse_args, run  # noqa: E402
from ppmoco.config import load_config  # noqa: E402
from ppmoco.errors import ConfigError  # noqa: E402
from ppmoco.fileio import write_bytes_atomic  # noqa: E402


def add_arguments(parser):
    parser.add_argument("--num", type=int, default=8, help="images (rows), spread over the dataset")
    parser.add_argument("--size", type=int, default=96, help="pixels per picture in the grid")
    parser.add_argument("--epoch", type=int, default=0, help="the epoch whose augmentation to show")
    parser.add_argument("--out", default=None, help="PNG path")


def main(argv=None):
    args = parse_args(__doc__, argv, add_arguments)
    if args.num < 1 or args.size < 8 or args.epoch < 0:
        raise ConfigError("--num must be >= 1, --size >= 8 and --epoch >= 0")
    cfg = load_config(args.config, args.override)
    from PIL import Image

    from ppmoco.data import build_dataset
    from ppmoco.data.preview import spread_indices, view_grid

    dataset = build_dataset(cfg["Data"]["Train"]["dataset"], "Data.Train.dataset", cfg["Global"]["seed"])
    dataset.set_epoch(args.epoch)
    indices = spread_indices(len(dataset), args.num)
    grid = view_grid(dataset, indices, args.size)
    out = args.out or os.path.join(cfg["Engine"]["save_load"]["output_dir"], "views.png")
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    write_bytes_atomic(out, buffer.getvalue())
    print(f"wrote {out}: {len(indices)} images x (1 + {len(dataset[0]) - 1} views), {grid.shape[1]}x{grid.shape[0]} px")
    return out


if __name__ == "__main__":
    run(main)
