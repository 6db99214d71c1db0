"""Linear evaluation of a frozen backbone, as facebookresearch/moco main_lincls.py.

Every backbone weight is frozen and the backbone stays in eval mode (its BatchNorm statistics never
change); only the fc layer, initialised N(0, 0.01) with zero bias, is trained. After the first epoch
the backbone is compared with the pretrained file, as the reference's sanity check does.
FineTune (ppmoco/modules/finetune.py) is this module with the backbone trained too.
"""
import logging

import numpy as np
import paddle
import paddle.nn.functional as F

from ppmoco.errors import ConfigError
from ppmoco.metrics import numpy_topk_accuracy, topk_accuracy
from ppmoco.models import LinearClassifier, build_backbone, load_pretrained_backbone
from ppmoco.modules.base import Module, StepOutput

logger = logging.getLogger("ppmoco")


def _as_float32(tensor):
    """A tensor's values as a float32 numpy array (bfloat16's numpy() would be its raw uint16 bits)."""
    return tensor.numpy() if tensor.dtype == paddle.float32 else tensor.astype("float32").numpy()


def _frozen_as(frozen, tensor):
    """The float32 snapshot `frozen` as the values `tensor`'s dtype holds: cast where the tensor lives by
    the cast O2 applies to it, so on GPU the same kernel rounds both (as float32 numpy)."""
    if tensor.dtype == paddle.float32:
        return frozen
    return _as_float32(paddle.to_tensor(frozen, place=tensor.place).astype(tensor.dtype))


def _under(name, prefixes):
    """Whether structured name `name` lies under one of `prefixes` ("" holds every name; `layer1` holds
    `layer1.0.conv1.weight` but not `layer10...`)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


class FrozenBackboneProbe(Module):
    """What the classifiers on a pretrained backbone share (LinearEval, MultiHeadLinearEval, and FineTune,
    which freezes a part only): the backbone built and loaded from `base_encoder`; its frozen part, the
    tensors under `frozen_prefixes` (structured-name prefixes; "" the whole backbone, as the probes
    freeze it), which takes no gradient, stays in eval mode (its BatchNorm statistics never change) and
    is checked against the loaded weights after the first epoch; the reported top-k. A subclass adds its
    classifier."""

    frozen_prefixes = ("",)  # what __init__ freezes (see freeze)

    def __init__(self, base_encoder, topk):
        super().__init__()
        if not (topk and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in topk)
                and 1 in topk):
            raise ConfigError(f"Model.metric.train.topk: {topk!r} must be a list of ints > 0 that includes 1 "
                              "(the best checkpoint keeps the top-1 accuracy); e.g. [1, 5]")
        self.topk = list(topk)
        self.backbone = build_backbone(base_encoder, "Model.model.base_encoder")
        if base_encoder.get("pretrained") is not None:
            load_pretrained_backbone(self.backbone, base_encoder["pretrained"])
        else:
            logger.warning("Model.model.base_encoder.pretrained is not set: evaluating a randomly "
                           "initialised backbone (the baseline)")
        self.freeze(self.frozen_prefixes)

    def freeze(self, prefixes):
        """Freeze the backbone tensors under `prefixes` (structured-name prefixes, "" every tensor): their
        parameters take no gradient, their layers stay in eval mode, and after the first epoch they must
        equal their values now. Called while the module is built: by __init__ with `frozen_prefixes`, then
        by a subclass that freezes a part it knows only once the backbone is built (FineTune, whose
        `frozen_prefixes` are empty); a parameter frozen once stays frozen."""
        self.frozen_prefixes = tuple(prefixes)
        self._frozen = {k: v.numpy().copy() for k, v in self.backbone.state_dict().items()
                        if _under(k, self.frozen_prefixes)}
        for name, p in self.backbone.named_parameters():
            if _under(name, self.frozen_prefixes):
                p.stop_gradient = True

    def train(self):
        """Train the rest; the frozen layers keep eval-mode BatchNorm."""
        super().train()
        for name, layer in self.backbone.named_sublayers(include_self=True):
            if _under(name, self.frozen_prefixes):
                layer.eval()
        return self

    def feature_backbone(self):
        return self.backbone

    def on_epoch_end(self, epoch):
        if epoch == 1 and self._frozen:
            self.check_backbone_unchanged()

    def check_backbone_unchanged(self):
        """The reference's sanity check: training must not touch the frozen backbone tensors.

        The snapshot is float32, taken before O2 mixed precision casts the backbone's convolutions to
        float16/bfloat16 (paddle.amp.decorate, when the Engine builds its step): a tensor in another
        dtype is compared with the snapshot cast the same way, exactly, so any change the backbone
        can hold in its dtype (one unit in its last place) still fails the check."""
        state = self.backbone.state_dict()
        for name, frozen in self._frozen.items():
            if not np.array_equal(_as_float32(state[name]), _frozen_as(frozen, state[name])):
                raise RuntimeError(f"backbone tensor {name} changed during training although it is frozen "
                                   "(a ppmoco bug: please report it)")
        logger.info("sanity check passed: the frozen backbone tensors equal the loaded weights")


class LinearEval(FrozenBackboneProbe):
    monitor = "top1"  # validation metric whose best value the Engine keeps as the `best` checkpoint

    def __init__(self, base_encoder, num_classes, topk=[1, 5]):
        super().__init__(base_encoder, topk)
        self.classifier = LinearClassifier(self.backbone.out_dim, num_classes)

    def _logits(self, images):
        with paddle.no_grad():
            features = self.backbone(images)
        return self.classifier(features)

    def _loss(self, logits, labels):
        return F.cross_entropy(logits, labels)

    def training_step(self, batch):
        images, labels = batch[0], batch[-1]
        logits = self._logits(images)
        loss = self._loss(logits, labels)
        # a k at or above the number of classes counts every row (ppmoco.metrics)
        accuracies = topk_accuracy(logits, labels, self.topk)
        return StepOutput(loss, {f"acc{k}": acc for k, acc in zip(self.topk, accuracies)})

    def validation_step(self, batch):
        return {"logits": self._logits(batch[0]), "labels": batch[-1]}

    def validation_end(self, outputs):
        """Top-k (each k of `topk`) in percent over every evaluation image, each counted once (ppmoco.metrics)."""
        return numpy_topk_accuracy(outputs["logits"], outputs["labels"], self.topk)
