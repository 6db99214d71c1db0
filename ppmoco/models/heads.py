"""Heads that sit on the backbone's pooled features.

Paddle stores a Linear weight as [in, out], the transpose of torch's [out, in]; checkpoint
converters must transpose it, while the init below only depends on fan_in = in_dim.
"""
import math

import paddle
from paddle import nn


def _torch_default_linear(in_dim, out_dim, bias=True):
    """Linear initialised like torch.nn.Linear, which the MoCo reference heads keep.

    torch's kaiming_uniform(a=sqrt(5)) weight bound and its bias bound both reduce to
    1/sqrt(fan_in).
    """
    bound = 1.0 / math.sqrt(in_dim)
    init = nn.initializer.Uniform(-bound, bound)
    return nn.Linear(in_dim, out_dim, weight_attr=paddle.ParamAttr(initializer=init),
                     bias_attr=paddle.ParamAttr(initializer=init) if bias else False)


class ProjectionHead(nn.Sequential):
    """MoCo's projection: one Linear (v1, fc to 128) or Linear-ReLU-Linear (v2, 2048-2048-128).

    Sublayers are numbered like the reference's `fc` Sequential (`0`, and `2` for v2).
    """

    def __init__(self, in_dim, out_dim, hidden_dim=None):
        if hidden_dim is None:
            layers = [_torch_default_linear(in_dim, out_dim)]
        else:
            layers = [_torch_default_linear(in_dim, hidden_dim), nn.ReLU(),
                      _torch_default_linear(hidden_dim, out_dim)]
        super().__init__(*layers)


class BatchNormMLP(nn.Sequential):
    """MoCo v3's projector and predictor (moco-v3 builder.py's _build_mlp): `num_layers` Linear layers
    without bias, each but the last followed by BatchNorm and ReLU, the last by BatchNorm without
    affine parameters where `last_bn` (SimCLR's design). Sublayers are numbered as the reference's
    Sequential; BatchNorm momentum 0.9 is PyTorch's 0.1."""

    def __init__(self, num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
        layers = []
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(_torch_default_linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim,
                                                bias=False))
            if not last:
                layers += [nn.BatchNorm1D(hidden_dim, momentum=0.9, epsilon=1e-5), nn.ReLU()]
            elif last_bn:
                layers.append(nn.BatchNorm1D(out_dim, momentum=0.9, epsilon=1e-5, weight_attr=False, bias_attr=False))
        super().__init__(*layers)


class LinearClassifier(nn.Layer):
    """Linear-evaluation classifier, initialised as main_lincls.py: weight N(0, 0.01), bias 0."""

    def __init__(self, in_dim, num_classes):
        super().__init__()
        self.fc = nn.Linear(
            in_dim, num_classes,
            weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 0.01)),
            bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)))

    def forward(self, x):
        return self.fc(x)


class NormLinearHead(LinearClassifier):
    """One head of mmselfsup's MultiClsHead: a pooled [N, C, g, g] stage map normalised per channel by
    BatchNorm without affine parameters (mmselfsup's `norm_cfg=dict(type='SyncBN', momentum=0.1,
    affine=False)`: torch's momentum 0.1 is Paddle's 0.9), flattened to C*g*g features, then the
    linear classifier (N(0, 0.01), bias 0: mmselfsup's init_cfg for its Linear layers)."""

    def __init__(self, channels, grid, num_classes):
        super().__init__(channels * grid * grid, num_classes)
        self.norm = nn.BatchNorm2D(channels, momentum=0.9, epsilon=1e-5, weight_attr=False, bias_attr=False)

    def forward(self, pooled):
        return self.fc(self.norm(pooled).flatten(1))
