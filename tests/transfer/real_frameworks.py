"""PaddleClas's and PaddleDetection's real ResNets loading tools/convert.py's files, in a process of
their own: `python real_frameworks.py --images X.npy --out Y.npz --paddleclas-r50 F ...`.

The packages come from a folder they were installed into without dependencies
(requirements-transfer.txt): .transfer_deps in the project, or $PPMOCO_TRANSFER_DEPS. A separate
process keeps their imports (and sys.path) away from the rest of the test session. Exit code
DEPS_MISSING, with the import error on stderr, says they are not there.

Each file is loaded the way the framework loads pretrained weights (PaddleClas's
load_dygraph_pretrain behind Global.pretrained_model, PaddleDetection's load_pretrain_weight behind
pretrain_weights) into the model the configs/transfer/ file describes, in eval mode; the features
of the images are written to the .npz.
"""
import argparse
import os
import sys

import numpy as np
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPS = os.environ.get("PPMOCO_TRANSFER_DEPS") or os.path.join(ROOT, ".transfer_deps")
DEPS_MISSING = 3
PADDLECLAS = {"release": "paddleclas 2.6.0 (PyPI wheel)", "file": "ppcls/arch/backbone/legendary_models/resnet.py"}
PADDLEDET = {"release": "paddledet 2.6.0 (PyPI wheel)", "file": "ppdet/modeling/backbones/resnet.py"}
PADDLECLAS_CONFIG = os.path.join(ROOT, "configs", "transfer", "paddleclas_ResNet50_moco_finetune.yaml")
PADDLEDET_CONFIG = os.path.join(ROOT, "configs", "transfer", "paddledet_mask_rcnn_r50_fpn_1x_coco_moco.yml")


def import_real_frameworks(deps):
    """Put `deps` at the end of sys.path (this environment's packages win) and import both."""
    # The paddleclas wheel holds PaddleClas's package `ppcls` one folder down; its own top-level
    # module imports opencv for its command line, which is not needed here.
    sys.path += [deps, os.path.join(deps, "paddleclas")]
    import ppcls.arch  # noqa: F401
    import ppdet.modeling  # noqa: F401
    from ppcls.utils import logger
    logger.init_logger()  # PaddleClas's model constructors log, and fail before this


def paddleclas_features(path, images, arch):
    """PaddleClas's builder on the config's Arch, the weights loaded as Global.pretrained_model."""
    import paddle
    from ppcls.arch import build_model
    from ppcls.utils.save_load import load_dygraph_pretrain

    with open(PADDLECLAS_CONFIG, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    model = build_model({"Arch": dict(config["Arch"], **arch)})
    load_dygraph_pretrain(model, path)
    model.fc = paddle.nn.Identity()  # the fine-tuning classifier is new: compare the pooled features
    model.eval()
    return model(paddle.to_tensor(images)).numpy()


def paddledet_features(path, images):
    """The config's ResNet inside a detector-like parent, the weights loaded as pretrain_weights."""
    import paddle
    from ppdet.modeling.backbones.resnet import ResNet
    from ppdet.utils.checkpoint import load_pretrain_weight

    with open(PADDLEDET_CONFIG, encoding="utf-8") as f:
        config = yaml.safe_load(f)

    # norm_type is shared: the top-level value, unless the ResNet section gives its own
    kwargs = dict({"norm_type": config["norm_type"]}, **config["ResNet"])

    class Detector(paddle.nn.Layer):  # detectors hold the backbone as `backbone`
        def __init__(self):
            super().__init__()
            self.backbone = ResNet(**kwargs)

    detector = Detector()
    load_pretrain_weight(detector, path)
    detector.eval()
    return [stage.numpy() for stage in detector.backbone({"image": paddle.to_tensor(images)})]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--paddleclas-r50")
    parser.add_argument("--paddleclas-r18")
    parser.add_argument("--paddledet-r50")
    args = parser.parse_args()
    try:
        import_real_frameworks(DEPS)
    except ImportError as err:
        print(f"PaddleClas/PaddleDetection not importable from {DEPS}: {err}", file=sys.stderr)
        sys.exit(DEPS_MISSING)
    images = np.load(args.images)
    out = {}
    if args.paddleclas_r50:
        out["paddleclas_r50"] = paddleclas_features(args.paddleclas_r50, images, {})
    if args.paddleclas_r18:
        out["paddleclas_r18"] = paddleclas_features(args.paddleclas_r18, images,
                                                    {"name": "ResNet18", "use_first_short_conv": False})
    if args.paddledet_r50:
        for index, stage in enumerate(paddledet_features(args.paddledet_r50, images)):
            out[f"paddledet_r50_res{index + 2}"] = stage
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
