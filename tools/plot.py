"""Pictures of a run: python tools/plot.py RUN_DIR [--tsne [--checkpoint DIR]] [--out PATH] [--size WxH].

RUN_DIR is a run's Engine.save_load.output_dir. By default its VisualDL logs (vdl/) give the curves:
loss, learning rate, training acc1, images/s, kNN top-1 per k and linear top-1, whichever the run
logged, written to RUN_DIR/curves.png. With --tsne, the backbone of a checkpoint (default: the
run's latest) embeds the run's evaluation images (Data.Eval of RUN_DIR/config.yaml) and a t-SNE
scatter coloured by class goes to RUN_DIR/tsne.png.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
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


def tsne(run_dir, checkpoint, size):
    """PNG bytes and a one-line summary of the t-SNE of a checkpoint's evaluation features."""
    from ppmoco.config import load_config
    from ppmoco.data import build_dataset
    from ppmoco.engine import setup_environment
    from ppmoco.engine.checkpoint import latest_checkpoint
    from ppmoco.eval.evaluator import eval_loader
    from ppmoco.eval.inference import predict_dataset
    from ppmoco.models import build_backbone, load_pretrained_backbone
    from ppmoco.plots import plot_embedding

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"--checkpoint: {run_dir} has no 'latest' checkpoint; name one")
    eval_cfg, seed = cfg["Data"]["Eval"], cfg["Global"]["seed"]
    if not (eval_cfg and eval_cfg.get("dataset")):
        raise ConfigError(f"{run_dir}/config.yaml: Data.Eval.dataset is not set; t-SNE needs labelled images")
    env = setup_environment(cfg["Global"], {})  # one process, whatever the run used
    backbone = build_backbone(cfg["Model"]["model"]["base_encoder"], "Model.model.base_encoder")
    load_pretrained_backbone(backbone, checkpoint, key_path="--checkpoint")
    backbone.eval()
    dataset = build_dataset(eval_cfg["dataset"], "Data.Eval.dataset", seed)
    data = eval_loader(dataset, eval_cfg, env, seed)
    out = predict_dataset(lambda batch: {"features": backbone(batch[0]), "labels": batch[-1]},
                          *data, name="t-SNE features")
    png, _ = plot_embedding(out["features"], out["labels"], size, seed)
    classes = len(set(out["labels"].tolist()))
    return png, f"t-SNE of {len(out['labels'])} images in {classes} classes, backbone of {checkpoint}"


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("run_dir", help="a run's output_dir")
    parser.add_argument("--tsne", action="store_true", help="a t-SNE of evaluation features instead of curves")
    parser.add_argument("--checkpoint", default=None, help="with --tsne: checkpoint folder (default: latest)")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png or tsne.png)")
    parser.add_argument("--size", default="1200x800", help="WIDTHxHEIGHT in pixels")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    if args.tsne:
        png, summary = tsne(args.run_dir, args.checkpoint, size)
    else:
        png, panels = plot_curves(read_scalars(args.run_dir), size)
        summary = "; ".join(f"{title}: {', '.join(tags)}" for title, tags in panels.items())
    out = args.out or os.path.join(args.run_dir, "tsne.png" if args.tsne else "curves.png")
    write_bytes_atomic(out, png)
    print(f"wrote {out} ({size[0]}x{size[1]} px): {summary}")
    return out


if __name__ == "__main__":
    run(main)
