"""Minimal Modules defining more and more of the optional hooks, for the tests of the hook contract."""
from ppmoco.modules.base import Module


class Features(Module):
    """Defines extract_features only (like MoCo): the knn protocol, not linear."""

    def extract_features(self, images):
        return images


class StepOnly(Features):
    """Adds validation_step but no validation_end: still not enough for the linear protocol."""

    def validation_step(self, batch):
        return {"x": batch[0]}


class Classifier(StepOnly):
    """Inherits extract_features and validation_step and adds validation_end (like LinearEval)."""

    def validation_end(self, outputs):
        return {"top1": 1.0}
