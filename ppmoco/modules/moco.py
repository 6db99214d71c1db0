"""MoCo v1/v2 (He et al. 2019; Chen et al. 2020), following facebookresearch/moco builder.py.

v1 and v2 differ only by configuration: the projection head (linear vs 2-layer MLP), the
temperature, the augmentation and the lr schedule.

Deliberate choices (see docs/differences.md):
- The momentum update averages parameters only. Paddle lists BatchNorm's running statistics among
  `parameters()`; they are excluded, so the key encoder keeps its own statistics as in PyTorch.
- Shuffle BN runs the same code for any number of processes; `bn_splits` > 1 additionally splits
  each process's batch into BN groups, so a single process still gets per-group statistics with a
  shuffled key batch (one process with bn_splits 8 behaves like 8 GPUs with 1 split).
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppmoco.distributed import batch_shuffle, batch_unshuffle, concat_all_gather, world_size
from ppmoco.errors import ConfigError
from ppmoco.metrics import topk_accuracy
from ppmoco.models import ProjectionHead, build_backbone, load_pretrained_backbone
from ppmoco.modules import momentum
from ppmoco.modules.base import Module, StepOutput
from ppmoco.paddle_internals import batchnorm_statistics
from ppmoco.registry import check_kwargs


class Encoder(nn.Layer):
    """Backbone followed by the projection head."""

    def __init__(self, backbone_cfg, projector_cfg, dim):
        super().__init__()
        self.backbone = build_backbone(backbone_cfg, "Model.model.base_encoder")
        head_kwargs = dict(projector_cfg or {}, in_dim=self.backbone.out_dim, out_dim=dim)
        check_kwargs(ProjectionHead, head_kwargs, "Model.model.projector")
        self.head = ProjectionHead(**head_kwargs)

    def forward(self, x):
        return self.head(self.backbone(x))


def key_logits(q, k, queue, T):
    """[N, 1 + K] similarities / T of each query to its own key (column 0) and to the queue's keys."""
    return paddle.concat([(q * k).sum(axis=1, keepdim=True), paddle.matmul(q, queue)], axis=1) / T


def info_nce(q, k, queue, T):
    """InfoNCE with the positive key at index 0: cross-entropy of [q.k, q.queue] / T."""
    logits = key_logits(q, k, queue, T)
    loss = F.cross_entropy(logits, paddle.zeros([logits.shape[0]], dtype="int64"))
    return loss, logits


class MoCo(Module):
    """Query encoder, momentum key encoder and a queue of K negative keys."""

    def __init__(self, base_encoder, projector=None, dim=128, K=65536, m=0.999, T=0.07,
                 bn_splits=1):
        super().__init__()
        for key, value, ok, need in (("dim", dim, dim > 0, "> 0"), ("T", T, T > 0, "> 0"),
                                     ("K", K, K > 0, "> 0 and a multiple of the global batch"),
                                     ("m", m, 0 <= m <= 1, "in [0, 1]"),
                                     ("bn_splits", bn_splits, bn_splits >= 1, ">= 1")):
            if not ok:
                raise ConfigError(f"Model.model.{key}: {value} is out of range; it must be {need}")
        self.K, self.m, self.T, self.bn_splits = K, m, T, bn_splits
        self.encoder_q = Encoder(base_encoder, projector, dim)
        if base_encoder.get("pretrained") is not None:  # start from given weights instead of random
            load_pretrained_backbone(self.encoder_q.backbone, base_encoder["pretrained"])
        self.encoder_k = Encoder(base_encoder, projector, dim)
        self.encoder_k.set_state_dict(self.encoder_q.state_dict())
        stats = batchnorm_statistics(self.encoder_q)  # Paddle lists them among parameters()
        self._ema_pairs = [(q, k) for q, k in zip(self.encoder_q.parameters(),
                                                   self.encoder_k.parameters())
                           if id(q) not in stats]
        for p in self.encoder_k.parameters():
            p.stop_gradient = True
        self.register_buffer("queue", F.normalize(paddle.randn([dim, K]), axis=0))
        self.register_buffer("queue_ptr", paddle.zeros([1], dtype="int64"))

    def setup(self, global_batch_size):
        if global_batch_size > self.K or self.K % global_batch_size:
            suggestion = global_batch_size * max(1, self.K // global_batch_size)
            raise ConfigError(
                f"Model.model.K: {self.K} must be a multiple of the global batch size "
                f"{global_batch_size} (batch_size x processes); e.g. K={suggestion}")
        local = global_batch_size // world_size()
        if local % self.bn_splits:
            raise ConfigError(f"Model.model.bn_splits: {self.bn_splits} must divide the "
                              f"per-process batch {local}")

    def feature_backbone(self):
        return self.encoder_q.backbone

    def low_precision_layers(self):
        # The key encoder and the queue stay float32: see Module.low_precision_layers.
        return [self.encoder_q]

    def momentum_update(self):
        """Key encoder parameters <- m * key + (1 - m) * query (BatchNorm statistics excluded)."""
        momentum.momentum_update(self._ema_pairs, self.m)

    def before_step(self, progress):
        # builder.py updates the key encoder after the query forward; the query forward does not
        # read the key encoder, so updating first is the same computation.
        self.momentum_update()

    def after_step(self, state):
        # builder.py enqueues inside forward and reads a copy of the queue; enqueueing after the
        # update is the same computation without the copy, and keeps the in-place write after
        # every read of the queue (autograd's).
        self.enqueue(**state)

    def queue_columns(self, n):
        """The queue columns the next `n` enqueued keys go to (the oldest `n`), as a device tensor."""
        return (self.queue_ptr + paddle.arange(n, dtype="int64")) % self.K

    @paddle.no_grad()
    def enqueue(self, keys):
        """Replace the oldest keys with this step's keys from all ranks (in rank order).

        The pointer stays a device tensor: no host sync per step.
        """
        keys = concat_all_gather(keys)
        n = keys.shape[0]
        columns = self.queue_columns(n)
        queue = paddle.put_along_axis(self.queue, columns.unsqueeze(0).expand([keys.shape[1], n]),
                                      keys.T.astype(self.queue.dtype), axis=1)
        paddle.assign(queue, output=self.queue)
        paddle.assign((self.queue_ptr + n) % self.K, output=self.queue_ptr)

    def _grouped(self, encoder, x):
        """Run `encoder` on bn_splits chunks so each chunk gets its own BatchNorm statistics."""
        if self.bn_splits == 1:
            return encoder(x)
        return paddle.concat([encoder(c) for c in paddle.chunk(x, self.bn_splits)], axis=0)

    @paddle.no_grad()
    def encode_keys(self, im_k):
        """Key features with shuffle BN: shuffle across ranks, encode, restore the order."""
        shuffled, idx_unshuffle = batch_shuffle(im_k)
        k = F.normalize(self._grouped(self.encoder_k, shuffled), axis=1)
        return batch_unshuffle(k, idx_unshuffle)

    def encode(self, im_q, im_k):
        """Unit query features (with gradient) and unit key features (shuffle BN, no gradient)."""
        return F.normalize(self._grouped(self.encoder_q, im_q), axis=1), self.encode_keys(im_k)

    def training_step(self, batch):
        q, k = self.encode(batch[0], batch[1])
        loss, logits = info_nce(q, k, self.queue.detach(), self.T)
        acc1, acc5 = topk_accuracy(logits, paddle.zeros([logits.shape[0]], dtype="int64"))
        return StepOutput(loss, {"acc1": acc1, "acc5": acc5}, after_step={"keys": k})
