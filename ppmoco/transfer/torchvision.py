"""torchvision's ResNet names: what mmdetection, mmpretrain and mmselfsup call "pytorch style".

The same module names as paddle.vision, with PyTorch's BatchNorm statistics (`running_mean`,
`running_var`) and the `num_batches_tracked` counter a strict `load_state_dict` demands. The
counter is written as 0: it only matters to a BatchNorm built with momentum=None (a cumulative
average), which no ResNet uses. The file is a bare state dict, which `torchvision` loads directly
and mmengine's `load_checkpoint` takes as it takes `{'state_dict': ...}` (mmdet's selfsup2mmdet.py).
"""
import io

from ppmoco.errors import ConfigError
from ppmoco.transfer.target import TORCH_BN, TORCH_BN_BUFFERS, Target, paddle_vision_modules


def require_torch(target="torchvision"):
    """Refuse `--to target` before anything is read where torch, which writes its files, is missing."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(f"--to {target}: writing a PyTorch file needs torch: pip install torch (the CPU "
                          "build is enough)") from None


def save_torch(state):
    """{name: array} as the bytes of a torch.save file of tensors."""
    import torch

    buffer = io.BytesIO()
    torch.save({name: torch.tensor(value) for name, value in state.items()}, buffer)
    return buffer.getvalue()


def _usage(arch, dst):
    if not arch.standard:
        return (f"torchvision names for a PyTorch ResNet built as this {arch}; torchvision.models.{arch.name} "
                "itself has the published widths and the 7x7 stem, and will not load it")
    return (f"torchvision: net = torchvision.models.{arch.name}(); net.fc = torch.nn.Identity(); "
            f"net.load_state_dict(torch.load('{dst}')); mmdetection: init_cfg=dict(type='Pretrained', "
            f"checkpoint='{dst}') (configs/transfer/mmdet_mask-rcnn_r50_fpn_mocov2.py)")


TARGET = Target(
    name="torchvision",
    framework="torchvision",
    modules=paddle_vision_modules,
    bn_tensors=TORCH_BN,
    bn_buffers=TORCH_BN_BUFFERS,
    serialize=save_torch,
    usage=_usage,
    standard_only=False,
    requires=require_torch,
)
