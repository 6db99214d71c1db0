"""The contract between a method (Module) and the Engine that trains it.

A Module owns its networks, loss and metrics; the Engine owns optimisation, data, distribution,
checkpoints and logging, and knows nothing about any particular method. A new method is a new
Module subclass registered in MODULES plus a YAML file. Every hook runs eagerly, on any device: it
may use any Paddle op, read values on the host and branch on them.

Hooks a subclass defines:
- `training_step(batch) -> StepOutput`: the loss to back-propagate, scalar metrics to log, and the
  tensors `after_step` needs once the optimizer has updated (MoCo's keys). `batch` is the list of
  tensors the dataset yields (views..., label).
- optionally `validation_step(batch) -> {name: [N, ...] tensor}` and
  `validation_end(outputs) -> {name: float}`: the Engine gathers the per-sample outputs over the
  exact evaluation set (dataset order, padding removed) before calling `validation_end`
  (the `linear` evaluation protocol).
- optionally `feature_backbone() -> Layer`: the backbone the evaluation protocols read. Naming it
  gives the method `extract_features(images) -> [N, D]` (the backbone's output, for the `knn`
  protocol) and, where the backbone has stage maps (`forward_stages`: the ResNets, not the Vision
  Transformers), `extract_stages(images) -> [stem, res2, res3, res4, res5]` (for the `svm` and
  `lowshot_svm` protocols; ppmoco/eval/features.py pools them). A method may define those two
  itself instead.
  The base versions of the four optional hooks (validation_step, validation_end, extract_features,
  extract_stages) raise UnsupportedHook where the method provides none; `module.supports(hook)`
  tells whether it does, so a protocol can refuse a module before any data is read.
  On one CPU process the evaluation hooks run on checked Paddle Inference predictors
  (ppmoco/eval/static_inference.py): they are traced, so they read no value on the host.
- optionally `low_precision_layers() -> [Layer]`: what O2 mixed precision casts to float16/bfloat16
  (default: the whole module; Paddle keeps normalisation layers float32 within them). A method
  returns less where low precision would break it: MoCo returns its query encoder, so the key
  encoder, whose momentum update moves a weight by 1e-3 of the gap (below bfloat16's resolution),
  and the queue stay float32.
- optionally `before_step(progress)` / `after_step(state)`: gradient-free state updates that must
  come before the step's computation (MoCo's momentum encoder) or after its optimizer update (MoCo's
  enqueue of `state["keys"]`, `state` being StepOutput.after_step): an in-place write inside
  `training_step` would change a tensor autograd still reads. `progress` (a Progress) says where
  the run is, for schedules by iteration (MoCo v3's momentum).

Class attribute `needs_labels`: True for a method that trains on the labels (batch[-1]), such as the
supervised-contrastive MoCo variants. The Engine then refuses training data holding an unlabelled
sample before anything runs.
"""
import dataclasses

import paddle
import paddle.nn as nn

from ppmoco.errors import PpmocoError

OPTIONAL_HOOKS = ("validation_step", "validation_end", "extract_features", "extract_stages")


@dataclasses.dataclass
class StepOutput:
    """What `training_step` returns: `loss` is back-propagated; `metrics` ({name: scalar tensor}) are
    logged beside it; `after_step` ({name: tensor}) is handed to `Module.after_step` after the
    optimizer update."""

    loss: paddle.Tensor
    metrics: dict = dataclasses.field(default_factory=dict)
    after_step: dict = dataclasses.field(default_factory=dict)

    def logged(self):
        """{name: scalar tensor} to log: the loss and the metrics."""
        return {"loss": self.loss, **self.metrics}


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run is when a step starts: `epoch` is fractional (epochs done + batches done in this
    epoch / batches per epoch), `step` the optimizer steps done before this one, `total_steps` those
    of Engine.num_train_epochs (schedules follow the epochs, as the learning rate does, also where
    Engine.max_steps stops a run earlier). A step run outside a run (tools/benchmark.py, tests) is
    the first of one."""

    epoch: float = 0.0
    step: int = 0
    total_steps: int = 1

    @property
    def fraction(self):
        """step / total_steps: 0 at the first step, approaching 1 at the last."""
        return self.step / self.total_steps


class UnsupportedHook(PpmocoError):
    """A caller used an optional hook (OPTIONAL_HOOKS) that the method does not define."""

    def __init__(self, module, hook):
        super().__init__(f"{type(module).__name__} does not support {hook}()")


class Module(nn.Layer):
    """Base class of trainable methods."""

    monitor = None  # name of the validation metric whose best value is kept as checkpoint `best`
    needs_labels = False  # training_step reads the labels: unlabelled training data is refused

    def setup(self, global_batch_size):
        """Check the method against the run's geometry before anything starts (raise ConfigError)."""

    def trainable_parameters(self):
        """Parameters the optimizer updates (gradient-carrying ones by default)."""
        return [p for p in self.parameters() if not p.stop_gradient]

    def low_precision_layers(self):
        """The sublayers O2 mixed precision casts to low precision (see the module docstring)."""
        return [self]

    def before_step(self, progress):
        """Runs (without gradient) before every training_step; `progress` is a Progress."""

    def after_step(self, state):
        """Runs (without gradient) after every optimizer update, with training_step's
        StepOutput.after_step (an empty dict when it gave none)."""

    def on_epoch_end(self, epoch):
        """Called after every training epoch; `epoch` counts the finished epochs from 1."""

    def feature_backbone(self):
        """The backbone the evaluation protocols read, or None (optional hook)."""
        return None

    def supports(self, hook):
        """Whether this method provides the optional hook `hook` (one of OPTIONAL_HOOKS): defines it,
        or, for the feature extraction hooks, names a feature_backbone that serves it.

        Compares the class attribute with Module's own: every Module has the hook, so `hasattr`
        cannot tell a method that defines it from one that only inherits the refusal. A method, not
        a helper to import, so the evaluation protocols need nothing from ppmoco.modules.
        """
        if hook not in OPTIONAL_HOOKS:
            raise ValueError(f"{hook!r} is not an optional Module hook; those are {OPTIONAL_HOOKS}")
        if getattr(type(self), hook) is not getattr(Module, hook):
            return True
        backbone = self.feature_backbone() if hook in ("extract_features", "extract_stages") else None
        # a backbone without stage maps (a Vision Transformer) gives no extract_stages
        return backbone is not None and (hook == "extract_features" or hasattr(backbone, "forward_stages"))

    def validation_step(self, batch):
        """Per-sample outputs of one evaluation batch, {name: [N, ...] tensor} (optional hook)."""
        raise UnsupportedHook(self, "validation_step")

    def validation_end(self, outputs):
        """Metrics {name: float} from the outputs of the whole evaluation set (optional hook)."""
        raise UnsupportedHook(self, "validation_end")

    def extract_features(self, images):
        """Backbone features [N, D] of a batch of images (optional hook; feature_backbone's output)."""
        if not self.supports("extract_features"):
            raise UnsupportedHook(self, "extract_features")
        return self.feature_backbone()(images)

    def extract_stages(self, images):
        """The backbone's [stem, res2, res3, res4, res5] feature maps of a batch (optional hook;
        feature_backbone's, where it has stage maps)."""
        if not self.supports("extract_stages"):
            raise UnsupportedHook(self, "extract_stages")
        return self.feature_backbone().forward_stages(images)

