"""Fine-tuning: a pretrained backbone and a new linear head, both trained (FleetX's GeneralClsModule).

Full fine-tuning and the semi-supervised protocol (1% or 10% of the labels, docs/finetune.md) are this
module with other data and recipes. It is the linear probe (LinearEval) with the backbone trained too:
- the backbone is loaded from `base_encoder.pretrained` as the probe loads it (ppmoco's, FleetX's and
  facebookresearch's MoCo v1/v2/v3 checkpoints, ResNets and ViTs, all or nothing) or, without it,
  kept at its random init (the baseline);
- the head is the probe's `classifier` (weight N(0, 0.01), bias 0, as mmselfsup's LinearClsHead), so
  `Optimizer.lr_mult: {classifier: 100}` gives it mmselfsup's head learning-rate multiplier;
- the backbone trains in train mode (BatchNorm statistics learn, over the global batch on several GPUs
  with `sync_bn`, as mmselfsup's SyncBN), except with `frozen_stages: N` (mmcv's ResNet option): -1
  freezes nothing, 0 the stem, N the stem and the first N stages (a ViT: patch embedding, class token
  and position embedding, then the first N blocks). A frozen tensor takes no gradient, its layers
  stay in eval mode, and it is checked unchanged after the first epoch, as the probe checks its
  backbone;
- `label_smoothing` (FleetX's `Model.loss.train.epsilon`) trains on the targets (1 - eps) one-hot +
  eps / classes, as FleetX's CELoss and torch's cross_entropy(label_smoothing=eps);
- validation (top-k), the `best` checkpoint (top-1) and the results-table row are the probe's; the
  BatchNorm statistics of several processes are averaged after each epoch, before validation and
  checkpoints.
"""
import paddle.nn.functional as F

from ppmoco.distributed import all_reduce_mean, sync_batchnorm
from ppmoco.errors import ConfigError
from ppmoco.models import VisionTransformer
from ppmoco.modules.linear_eval import LinearEval
from ppmoco.paddle_internals import batchnorm_running_statistics


def stage_prefixes(backbone):
    """[stem, stage 1, stage 2, ...] of `backbone`, each as the structured-name prefixes of its tensors."""
    if isinstance(backbone, VisionTransformer):
        return [("patch_embed", "cls_token", "pos_embed"), *((f"blocks.{i}",) for i in range(len(backbone.blocks)))]
    return [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]


class FineTune(LinearEval):
    frozen_prefixes = ()  # LinearEval freezes the whole backbone; here frozen_stages chooses

    def __init__(self, base_encoder, num_classes, frozen_stages=-1, label_smoothing=0.0, sync_bn=True,
                 topk=[1, 5]):
        super().__init__(base_encoder, num_classes, topk)
        stages = stage_prefixes(self.backbone)
        if not -1 <= frozen_stages < len(stages):
            raise ConfigError(f"Model.model.frozen_stages: {frozen_stages} is out of range; {base_encoder['name']} "
                              f"has a stem (0) and {len(stages) - 1} stages, so use -1 (nothing frozen) to "
                              f"{len(stages) - 1}")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"Model.loss.train.epsilon: {label_smoothing} must lie in [0, 1) (the label "
                              "smoothing); e.g. 0.1, or null for none")
        self.freeze([prefix for stage in stages[:frozen_stages + 1] for prefix in stage])
        self.label_smoothing, self.sync_bn = float(label_smoothing), sync_bn

    def setup(self, global_batch_size):
        if self.sync_bn:
            self.backbone = sync_batchnorm(self.backbone)

    def on_epoch_end(self, epoch):
        # BatchNorm that learns per process (CPU processes, or GPU ones without sync_bn) leaves each its own
        # running statistics: averaged over the processes (timm's distribute_bn), the validation and the
        # checkpoints after an epoch see one model, the one tools/eval.py scores. Frozen statistics are equal
        # everywhere, and stay so bit for bit.
        all_reduce_mean(batchnorm_running_statistics(self.backbone))
        super().on_epoch_end(epoch)

    def _logits(self, images):
        return self.classifier(self.backbone(images))

    def _loss(self, logits, labels):
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
