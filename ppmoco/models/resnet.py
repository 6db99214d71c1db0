"""ResNet backbones whose parameter names match paddle.vision and torchvision.

Names (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...) are kept identical so that
paddle.vision `.pdparams` and converted torchvision/MoCo checkpoints load without renaming. The
network has no classifier: heads are separate layers owned by the training module.
"""
from typing import NamedTuple, Tuple

import paddle
from paddle import nn

from ppmoco.errors import ConfigError
from ppmoco.registry import Registry

BACKBONES = Registry("backbone")
# Per-stage planes of the published ResNets (the stem has widths[0] channels).
STANDARD_WIDTHS = (64, 128, 256, 512)


def _conv(in_ch, out_ch, kernel_size, stride=1):
    """Bias-free conv with torchvision's init (kaiming-normal, fan_out, relu), as MoCo uses."""
    init = nn.initializer.KaimingNormal(nonlinearity="relu", mode="fan_out")
    return nn.Conv2D(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                     weight_attr=paddle.ParamAttr(initializer=init), bias_attr=False)


def _bn(channels, zero_weight=False):
    """BatchNorm with PyTorch's defaults (momentum 0.1 is Paddle's 0.9, eps 1e-5), weight 1 or 0."""
    weight = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0 if zero_weight else 1.0))
    bias = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0))
    return nn.BatchNorm2D(channels, momentum=0.9, epsilon=1e-5, weight_attr=weight, bias_attr=bias)


def _downsample(in_ch, out_ch, stride):
    """1x1 projection shortcut when the shape changes; None keeps the identity shortcut."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv(in_ch, out_ch, 1, stride), _bn(out_ch))


class BasicBlock(nn.Layer):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch, planes, stride=1, zero_init_last=False):
        super().__init__()
        self.conv1 = _conv(in_ch, planes, 3, stride)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = _bn(planes, zero_weight=zero_init_last)
        self.relu = nn.ReLU()
        self.downsample = _downsample(in_ch, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class BottleneckBlock(nn.Layer):
    """1x1-3x3-1x1 bottleneck with the stride on the 3x3 conv (ResNet v1.5, as torchvision)."""

    expansion = 4

    def __init__(self, in_ch, planes, stride=1, zero_init_last=False):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, planes, 1)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = _bn(planes)
        self.conv3 = _conv(planes, out_ch, 1)
        self.bn3 = _bn(out_ch, zero_weight=zero_init_last)
        self.relu = nn.ReLU()
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Layer):
    """Headless ResNet: `forward` gives pooled features, `forward_stages` the five feature maps.

    `widths` are the per-stage planes (the stem has widths[0] channels); `cifar_stem` swaps the
    7x7/2 conv + max-pool for a 3x3/1 conv so 32 px images keep their resolution.
    `zero_init_residual` zeroes each block's last BN weight so blocks start as identities.
    """

    def __init__(self, block, layers, widths=STANDARD_WIDTHS, cifar_stem=False,
                 in_channels=3, zero_init_residual=False):
        super().__init__()
        if len(widths) != 4:
            raise ConfigError(f"widths: a ResNet has 4 stages, got widths {list(widths)}")
        stem = widths[0]
        if cifar_stem:
            self.conv1 = _conv(in_channels, stem, 3)
            self.maxpool = None
        else:
            self.conv1 = _conv(in_channels, stem, 7, stride=2)
            self.maxpool = nn.MaxPool2D(kernel_size=3, stride=2, padding=1)
        self.bn1 = _bn(stem)
        self.relu = nn.ReLU()

        self.stage_channels = [stem]
        for i, (planes, depth) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            blocks = [block(self.stage_channels[-1], planes, stride, zero_init_residual)]
            out_ch = planes * block.expansion
            blocks += [block(out_ch, planes, 1, zero_init_residual) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_channels.append(out_ch)
        self.out_dim = self.stage_channels[-1]

    def forward_stages(self, x):
        """[stem, res2, res3, res4, res5] feature maps, for multi-stage evaluation; the stem is taken
        before the max-pool, as mmselfsup's ResNet gives it (112 px at 224)."""
        stem = self.relu(self.bn1(self.conv1(x)))
        outputs = [stem, self.layer1(stem if self.maxpool is None else self.maxpool(stem))]
        for layer in (self.layer2, self.layer3, self.layer4):
            outputs.append(layer(outputs[-1]))
        return outputs

    def forward(self, x):
        """Globally average-pooled last-stage features, shape [N, out_dim]."""
        return self.forward_stages(x)[-1].mean(axis=[2, 3])


# The one table of ResNet depths: block type and blocks per stage. Config factories, reading
# pretrained weights (which depth do these tensors describe?) and the converters all read it.
ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (BottleneckBlock, (3, 4, 6, 3)),
    "resnet101": (BottleneckBlock, (3, 4, 23, 3)),
}


class Architecture(NamedTuple):
    """Which ppmoco ResNet a set of weights is: a name of ARCHS, its widths and its stem."""

    name: str
    widths: Tuple[int, int, int, int] = STANDARD_WIDTHS
    cifar_stem: bool = False

    @property
    def standard(self):
        """The network paddle.vision, torchvision and the detection frameworks build by that name."""
        return tuple(self.widths) == STANDARD_WIDTHS and not self.cifar_stem

    @property
    def block(self):
        return ARCHS[self.name][0]

    @property
    def layers(self):
        return ARCHS[self.name][1]

    def build(self):
        return ResNet(self.block, self.layers, widths=self.widths, cifar_stem=self.cifar_stem)

    def __str__(self):
        """E.g. "ResNet-50", "ResNet-18 with widths [4, 8, 8, 8] and the CIFAR stem"."""
        changes = [f"widths {list(self.widths)}"] if tuple(self.widths) != STANDARD_WIDTHS else []
        changes += ["the CIFAR stem"] if self.cifar_stem else []
        depth = f"ResNet-{self.name[len('resnet'):]}"
        return f"{depth} with {' and '.join(changes)}" if changes else depth


def _register(name):
    """Register a config-buildable factory; tuple widths also accept YAML lists (registry rule)."""
    def factory(widths=STANDARD_WIDTHS, cifar_stem=False, zero_init_residual=False):
        block, layers = ARCHS[name]
        return ResNet(block, layers, widths=widths, cifar_stem=cifar_stem,
                      zero_init_residual=zero_init_residual)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name} backbone ({'-'.join(map(str, ARCHS[name][1]))} blocks)."
    return BACKBONES.register(factory, name=name)


resnet18 = _register("resnet18")
resnet34 = _register("resnet34")
resnet50 = _register("resnet50")
resnet101 = _register("resnet101")
