"""mmselfsup's multi-head linear probe ("feature1..5"): one classifier per backbone stage, trained at once.

The backbone is LinearEval's: frozen, in eval mode, checked after the first epoch. Each layer of
`layers` (ppmoco/feature_layers.py; default feat1..feat5, mmselfsup's five) is its stage map pooled by
ppmoco.models.pool_stages (ResNet-50: 9216, 9216, 8192, 9216, 8192 features at any input size) and
classified by a NormLinearHead: BatchNorm over the channels without affine parameters, then a linear
layer initialised N(0, 0.01). The loss is the sum of the heads' cross-entropies (mmselfsup's runner
adds its `loss.1`..`loss.5`), so each head trains as if alone. Validation reports each head's top-k
as `feat1_top1`, `feat1_top5`, ...; the best checkpoint keeps the last layer's top-1 (`feat5_top1`
by default: the deepest layer, the benchmark's headline).
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppmoco.errors import ConfigError
from ppmoco.feature_layers import LAYERS
from ppmoco.metrics import label_ranks, rank_accuracy, topk_accuracy
from ppmoco.models import NormLinearHead, pool_stages
from ppmoco.modules.base import StepOutput
from ppmoco.modules.linear_eval import FrozenBackboneProbe

FEATURES = ["feat1", "feat2", "feat3", "feat4", "feat5"]


class MultiHeadLinearEval(FrozenBackboneProbe):
    def __init__(self, base_encoder, num_classes, layers=FEATURES, topk=[1, 5]):
        super().__init__(base_encoder, topk)
        if not (isinstance(layers, (list, tuple)) and layers and all(layer in LAYERS for layer in layers)
                and len(set(layers)) == len(layers)):
            raise ConfigError(f"Model.model.layers: {layers!r} must be a non-empty list of distinct layers "
                              f"among {', '.join(LAYERS)}; e.g. [{', '.join(FEATURES)}]")
        self.layers = list(layers)
        self.monitor = f"{self.layers[-1]}_top1"  # the Engine keeps the best value as checkpoint `best`
        if not self.supports("extract_stages"):
            raise ConfigError(f"Model.model.base_encoder.name: {base_encoder['name']} has no stage feature maps to "
                              "pool (a Vision Transformer); the multi-head probe needs a ResNet: evaluate it with "
                              "the linear probe (Model.module: LinearEval)")
        channels = self.backbone.stage_channels
        self.heads = nn.LayerDict({layer: NormLinearHead(channels[LAYERS[layer][0]], LAYERS[layer][1], num_classes)
                                   for layer in self.layers})

    def _logits(self, images):
        """{layer: [N, num_classes] scores of its head}."""
        with paddle.no_grad():
            pooled = pool_stages(self.backbone.forward_stages(images), self.layers)
        return {layer: self.heads[layer](pooled[layer]) for layer in self.layers}

    def training_step(self, batch):
        images, labels = batch[0], batch[-1]
        out = {}
        for layer, logits in self._logits(images).items():
            out[f"{layer}_loss"] = F.cross_entropy(logits, labels)
            out.update({f"{layer}_acc{k}": acc for k, acc in zip(self.topk, topk_accuracy(logits, labels, self.topk))})
        return StepOutput(paddle.add_n([out[f"{layer}_loss"] for layer in self.layers]), out)

    def validation_step(self, batch):
        """Each head's rank of the true label (ppmoco.metrics.label_ranks), not its scores: five heads'
        ImageNet scores would be 1 GB per process over the 50,000 validation images."""
        labels = batch[-1]
        return {layer: label_ranks(logits, labels) for layer, logits in self._logits(batch[0]).items()}

    def validation_end(self, outputs):
        """`<layer>_top<k>` in percent per head, each evaluation image counted once."""
        return {f"{layer}_{name}": value for layer in self.layers
                for name, value in rank_accuracy(outputs[layer], self.topk).items()}
