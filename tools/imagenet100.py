"""Write ImageNet-100's list files (CMC's 100 classes) for an ILSVRC2012 folder:

    python tools/imagenet100.py --root dataset/ILSVRC2012 [--out DIR] [--val-labels FILE]

--root holds train/<wnid>/ and val/, val/ either in class folders (val/<wnid>/) or flat with a label
file (--val-labels, default ROOT/val_list.txt: PaddleClas's 'val/ILSVRC2012_val_00000001.JPEG 65'
lines; a label is a wnid or the index of the class among the 1000 sorted train/ folders). Writes
DIR/in100_train_list.txt and DIR/in100_val_list.txt (DIR defaults to ROOT): 'relative/path label'
lines, the paths relative to ROOT, labels 0..99 by sorted wnid, as configs/mocov2_pt_in100_1n8c.yaml
and configs/moco_lincls_in100_1n8c.yaml read them.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--root", required=True, help="the ILSVRC2012 folder (holding train/ and val/)")
    parser.add_argument("--out", default=None, help="folder for the list files (default: --root)")
    parser.add_argument("--val-labels", default=None,
                        help="label file of a flat val/ (default: ROOT/val_list.txt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        stream=sys.stdout)
    from ppmoco.data.imagenet100 import write_imagenet100_lists

    written = write_imagenet100_lists(args.root, args.out, args.val_labels)
    for split, (path, count) in written.items():
        print(f"wrote {path}: {count} {split} images of the 100 classes")
    return written


if __name__ == "__main__":
    run(main)
