"""MoCo v3 (Chen, Xie, He 2021), following facebookresearch/moco-v3 moco/builder.py.

Two views of each image go through the base encoder (backbone + projector) and the predictor, and,
without gradient, through the momentum encoder (an exponential moving average of backbone +
projector). There is no queue: a query's positive is the momentum encoder's feature of the other
view of its image, its negatives the other images' keys, gathered from every process.

As in the reference: the projector has 2 layers on a ResNet and 3 on a ViT, the predictor keeps its
last BatchNorm on a ViT only (`projector_layers`, `predictor_last_bn` override both); the momentum m
rises from `m` to 1 along a cosine over the run, per iteration, with `m_cos` (main_moco.py's
--moco-m-cos). As in ppmoco's MoCo v1/v2, the momentum encoder's BatchNorm running statistics are
its own (Paddle lists them among `parameters()`; they are left out of the average, as PyTorch's
buffers are), and the average is taken before the step's computation, which reads the momentum
encoder only after the reference's update, so the computation is the same.
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppmoco.distributed import concat_all_gather, rank, sync_batchnorm
from ppmoco.errors import ConfigError
from ppmoco.metrics import topk_accuracy
from ppmoco.models import BatchNormMLP, VisionTransformer, build_backbone, load_pretrained_backbone
from ppmoco.modules import momentum
from ppmoco.modules.base import Module, StepOutput
from ppmoco.paddle_internals import batchnorm_statistics


def contrastive_loss(q, k, T):
    """builder.py's contrastive_loss: cross-entropy of each query against every process's keys
    (its positive at its own global index), scaled by 2T; also the logits."""
    q, k = F.normalize(q, axis=1), concat_all_gather(F.normalize(k, axis=1))
    logits = paddle.matmul(q, k, transpose_y=True) / T
    labels = paddle.arange(q.shape[0], dtype="int64") + q.shape[0] * rank()
    return F.cross_entropy(logits, labels) * (2 * T), logits, labels


class Encoder(nn.Sequential):
    """Backbone followed by MoCo v3's projector."""

    def __init__(self, backbone, layers, mlp_dim, dim):
        super().__init__(("backbone", backbone), ("head", BatchNormMLP(layers, backbone.out_dim, mlp_dim, dim)))


class MoCoV3(Module):
    """Base encoder + predictor, and a momentum encoder; a symmetric contrastive loss, no queue."""

    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0, m=0.99, m_cos=True, projector_layers=None,
                 predictor_last_bn=None, sync_bn=True):
        super().__init__()
        for key, value, ok, need in (("dim", dim, dim > 0, "> 0"), ("mlp_dim", mlp_dim, mlp_dim > 0, "> 0"),
                                     ("T", T, T > 0, "> 0"), ("m", m, 0 <= m <= 1, "in [0, 1]"),
                                     ("projector_layers", projector_layers, projector_layers is None
                                      or projector_layers >= 1, ">= 1, or null for the reference's")):
            if not ok:
                raise ConfigError(f"Model.model.{key}: {value} is out of range; it must be {need}")
        self.T, self.m, self.m_cos, self.sync_bn = T, m, m_cos, sync_bn
        backbone = build_backbone(base_encoder, "Model.model.base_encoder")
        vit = isinstance(backbone, VisionTransformer)
        layers = projector_layers or (3 if vit else 2)
        self.base_encoder = Encoder(backbone, layers, mlp_dim, dim)
        if base_encoder.get("pretrained") is not None:
            load_pretrained_backbone(backbone, base_encoder["pretrained"])
        self.momentum_encoder = Encoder(build_backbone(base_encoder, "Model.model.base_encoder"), layers, mlp_dim, dim)
        self.momentum_encoder.set_state_dict(self.base_encoder.state_dict())
        self.predictor = BatchNormMLP(2, dim, mlp_dim, dim, last_bn=vit if predictor_last_bn is None
                                      else predictor_last_bn)
        stats = batchnorm_statistics(self.base_encoder)
        self._ema_pairs = [(b, k) for b, k in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters())
                           if id(b) not in stats]
        for p in self.momentum_encoder.parameters():
            p.stop_gradient = True

    def setup(self, global_batch_size):
        # main_moco.py normalises over the global batch (SyncBatchNorm; on GPUs only, docs/mocov3.md). The
        # converted layers share the parameters and statistics of the ones they replace, so the momentum
        # pairs still hold.
        if self.sync_bn:
            for name in ("base_encoder", "momentum_encoder", "predictor"):
                setattr(self, name, sync_batchnorm(getattr(self, name)))

    def momentum_at(self, progress):
        """The momentum of the step at `progress` (a Progress)."""
        return momentum.cosine_momentum(self.m, progress.fraction) if self.m_cos else self.m

    def before_step(self, progress):
        momentum.momentum_update(self._ema_pairs, self.momentum_at(progress))

    def training_step(self, batch):
        x1, x2 = batch[0], batch[1]
        q1, q2 = self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))
        with paddle.no_grad():
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        loss1, logits, labels = contrastive_loss(q1, k2, self.T)
        loss2, _, _ = contrastive_loss(q2, k1, self.T)
        acc1, acc5 = topk_accuracy(logits, labels)
        return StepOutput(loss1 + loss2, {"acc1": acc1, "acc5": acc5})

    def feature_backbone(self):
        return self.base_encoder.backbone

    def low_precision_layers(self):
        # the momentum encoder stays float32: its update moves a weight by (1 - m) of the gap, below
        # bfloat16's resolution (Module.low_precision_layers)
        return [self.base_encoder, self.predictor]
