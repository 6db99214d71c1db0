"""paddle.vision.models.resnet18/34/50/101: ppmoco's own names, so the key map is the identity."""
from ppmoco.transfer.target import PADDLE_BN, Target, paddle_vision_modules, save_pdparams


def _usage(arch, dst):
    return (f"paddle.vision: net = paddle.vision.models.{arch.name}(num_classes=N); "
            f"net.set_state_dict(paddle.load('{dst}')) (fc stays new), or ppmoco.load_backbone('{dst}')")


TARGET = Target(
    name="paddle-vision",
    framework="paddle.vision",
    modules=paddle_vision_modules,
    bn_tensors=PADDLE_BN,
    serialize=save_pdparams,
    usage=_usage,
)
