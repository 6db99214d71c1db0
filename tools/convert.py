"""Write a pretrained backbone for another framework: python tools/convert.py SRC DST --to FORMAT.

SRC is anything Model.model.base_encoder.pretrained accepts (a ppmoco pretraining or linear
evaluation checkpoint, a PaddleFleetX MoCo checkpoint, facebookresearch/moco's .pth.tar, a
paddle.vision or torchvision state dict; for a ViT, a ppmoco or facebookresearch/moco-v3 checkpoint
or a timm state dict); the architecture is read from its tensors. Only the query encoder's backbone
is written: projection head, classifier and key encoder are dropped.

FORMAT:
  torchvision    PyTorch state dict, torchvision names ("pytorch style" for mmdetection/mmpretrain)
  detectron2     .pkl as facebookresearch/moco's convert-pretrain-to-detectron2.py writes it
  paddle-vision  .pdparams for paddle.vision.models.resnet18/34/50/101
  paddleclas     .pdparams with PaddleClas ResNet names (Global.pretrained_model)
  paddledet      .pdparams with PaddleDetection ResNet names (pretrain_weights; ResNet-50/101)
  timm           PyTorch state dict for timm's VisionTransformer (ViTs only; the ResNet formats refuse ViTs)
The config lines each framework needs are in configs/transfer/ (docs/transfer_export.md).
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402


def parse(argv):
    parser = tool_parser(__doc__)
    parser.add_argument("src", metavar="SRC", help="pretrained weights (file, checkpoint folder or name without "
                                                   ".pdparams)")
    parser.add_argument("dst", metavar="DST", help="file to write")
    parser.add_argument("--to", required=True, metavar="FORMAT", help="torchvision, detectron2, paddle-vision, "
                                                                      "paddleclas, paddledet or timm")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    from ppmoco.transfer import convert

    for line in convert(args.src, args.dst, args.to):
        print(line)


if __name__ == "__main__":
    run(main)
