"""Export a backbone for inference: python tools/export.py -c CFG [-o k=v] [--image-size 224] [--onnx] [--out DIR].

The backbone of Model.model.base_encoder, with the weights its `pretrained` key names, in eval mode
(BatchNorm running statistics) and giving pooled features [N, C], becomes a Paddle inference model
(model.json + model.pdiparams) and, with --onnx, model.onnx (the `export` extra: pip install -e ".[export]"),
for images [N, 3, H, W] of any batch size N. The image size is --image-size, else the size the
config's Data.Eval transforms give. Each exported model is run on a batch and compared with the
backbone; the export is written to --out (default Inference.model_dir) only when every check passes,
replacing an earlier export there, with export.json describing it. A linear-evaluation config
(MOCOClsModule) exports its backbone only, not the classifier.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco import export  # noqa: E402
from ppmoco.cli import parse_args, run  # noqa: E402
from ppmoco.config import load_config, resolve_config_path  # noqa: E402


def add_arguments(parser):
    parser.add_argument("--image-size", default=None, metavar="N|HxW",
                        help="input image size (default: what the Data.Eval transforms give)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx, checked in onnxruntime")
    parser.add_argument("--out", default=None, help="export folder (default Inference.model_dir), replaced whole")


def main(argv=None):
    args = parse_args(__doc__, argv, add_arguments)
    cfg = load_config(args.config, args.override)
    image_size = export.parse_image_size(args.image_size) if args.image_size else export.config_image_size(cfg)
    out_dir, option = (args.out, "--out") if args.out else (cfg["Inference"]["model_dir"], "Inference.model_dir")
    export.check_target(out_dir, option)
    onnx = export.onnx_tools() if args.onnx else None
    encoder = cfg["Model"]["model"]["base_encoder"]
    weights = export.pretrained_weights(encoder)
    from ppmoco.engine import setup_environment
    from ppmoco.models import build_backbone, load_pretrained_backbone

    # On the CPU whatever the config says: the saved program does not depend on the device it was
    # traced on, and the checks run where onnxruntime and Paddle Inference run here.
    setup_environment(dict(cfg["Global"], device="cpu"), {})
    backbone = build_backbone(encoder, "Model.model.base_encoder")
    load_pretrained_backbone(backbone, weights)
    evaluation = cfg["Data"]["Eval"] or {}
    report = export.export_backbone(backbone, out_dir, image_size, onnx, manifest={
        "config": os.path.abspath(resolve_config_path(args.config)),
        "backbone": {k: v for k, v in encoder.items() if k != "pretrained"},
        "weights": os.path.abspath(weights),
        "preprocessing": evaluation.get("dataset", {}).get("transform_ops"),
    })
    print("\n".join(export.describe(report, out_dir)))
    if cfg["Model"]["module"] in ("MOCOClsModule", "LinearEval"):
        print("  the backbone only: the linear classifier of MOCOClsModule is not part of the export")
    return report


if __name__ == "__main__":
    run(main)
