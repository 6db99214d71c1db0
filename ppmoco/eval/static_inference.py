"""Evaluation forward passes on Paddle Inference predictors running oneDNN (the CPU fast path of evaluation).

Eager Paddle runs conv2d with plain CPU kernels. An evaluation hook (`extract_features`, the pooled
`extract_stages`, `validation_step`) traced by paddle.jit.save and run by a Paddle Inference predictor
with oneDNN and its CPU fusion passes (BatchNorm folded into the convolutions, convolution + ReLU /
+ residual add fused) was 1.8-2.7x faster than eager for ResNet-50 features and 1.2-1.9x faster than a
PIR program placed on oneDNN (docs/performance.md, "Evaluation on the
fast path"). Folding BatchNorm bakes the weights into the predictor, so it cannot read the live parameters:
a predictor is built per `session()` (one evaluation; the weights do not change within it, and they
do between the kNN monitor's epochs) and dropped at its end. A build costs ~1.5 s for ResNet-18 and
~3-4 s for ResNet-50 at 224 px, next to one evaluation pass over the data.

No predictor is trusted unchecked (ppmoco.fast_path.CheckedFastPath): the first batch of every shape in
a session runs the eager hook and the predictor, and every output must agree (TOLERANCE). A predictor
that disagrees, or fails natively, is dropped: that hook runs eagerly from then on and one log line says
why. It runs on one CPU process, in float32 unless `Eval.precision: bfloat16` asks otherwise;
`Engine.execution: eager` never uses it.
Equivalence with eager and with a NumPy computation is tested in tests/eval/test_static_inference.py.
"""
import contextlib
import functools
import os
import tempfile

import paddle

from ppmoco import fast_path
from ppmoco.errors import ConfigError
from ppmoco.inference import NativeOutput, cpu_predictor
from ppmoco.paddle_internals import batchnorm_layers, parameter_tables

# How far each output of a checked predictor may be from eager's: max |static - eager| <= bound x
# max(1, max |eager|), relative to the largest output beyond 1 (as ppmoco/export.py's check). Float32
# measured 8e-7 (ResNet-50 features) and 2e-6 (ResNet-18 linear-probe logits). bfloat16 keeps 8 bits
# of mantissa: ResNet-50 features came within ~1e-2; its bound still fails a wrong program (an error
# of the size of the output). Integer outputs (labels, label ranks) must be equal.
TOLERANCE = {"float32": 1e-5, "bfloat16": 0.05}
PREFIX = "model"


class _Traced(paddle.nn.Layer):
    """`fn([images, labels]) -> {name: tensor}` as a Layer paddle.jit.save can trace (labels None where
    `fn` reads the images only: Paddle refuses an input that no output depends on); its outputs as a
    list in `names`' order. The module is a sublayer so its parameters are saved with the program."""

    def __init__(self, module, fn, names):
        super().__init__()
        self.module, self.fn, self.names = module, fn, names

    def forward(self, images, labels=None):
        out = self.fn([images, labels])
        return [paddle.assign(out[name]) for name in self.names]  # a copy: an output may be an input


@contextlib.contextmanager
def _unit_affine_batchnorm(module):
    """Give every BatchNorm without affine parameters (mmselfsup's multi-head probe) a scale of 1 and a
    shift of 0 while it is traced: the same function, but oneDNN's inference batch_norm dereferences a
    missing scale and the process dies of a segmentation fault, which no check could catch."""
    swapped = []
    for layer, channels in batchnorm_layers(module):
        if layer.weight is None and layer.bias is None:
            for name, value in (("weight", 1.0), ("bias", 0.0)):
                # Layer.__setattr__ moves a Parameter from the plain attribute (None) into the layer's table
                setattr(layer, name, paddle.create_parameter([channels], "float32",
                                                             default_initializer=paddle.nn.initializer.Constant(value)))
            swapped.append(layer)
    try:
        yield
    finally:
        for layer in swapped:
            params, _ = parameter_tables(layer)
            for name in ("weight", "bias"):
                del params[name]
                vars(layer)[name] = None  # as BatchNorm's __init__ left it


class _Predictor:
    """One hook's predictor for the weights of one session."""

    def __init__(self, predictor, names):
        self.predictor, self.names = predictor, names

    def __call__(self, batch):
        inputs = {"input_0": batch[0], "input_1": batch[-1]}  # _build's names for _Traced's arguments
        for name in self.predictor.get_input_names():
            value = inputs[name].numpy()
            handle = self.predictor.get_input_handle(name)
            handle.reshape(value.shape)
            handle.copy_from_cpu(value)
        self.predictor.run()
        outputs = [self.predictor.get_output_handle(name).copy_to_cpu() for name in self.predictor.get_output_names()]
        return {name: paddle.to_tensor(value) for name, value in zip(self.names, outputs)}


def unsupported_reason(env, mix_precision):
    """Why the fast path cannot run for the RunEnv `env` and Engine.mix_precision, as a phrase, or None."""
    if env.world_size > 1:
        return f"{env.world_size} processes"
    if env.device != "cpu":
        return f"device {env.device}"
    if mix_precision["enable"] and mix_precision["dtype"] != "bfloat16":
        return "float16 mixed precision"
    return None


class StaticInference:
    """Wraps evaluation hooks to run on checked predictors (see the module docstring).

    `execution` is Engine.execution (auto, eager), `precision` Eval.precision (float32, bfloat16),
    `mix_precision` Engine.mix_precision, `env` the RunEnv.
    """

    def __init__(self, module, execution, precision, mix_precision, env):
        self.module, self.precision = module, precision
        unsupported = unsupported_reason(env, mix_precision)
        self.enabled = execution != "eager" and unsupported is None
        self.threads = env.num_threads
        if precision == "bfloat16":
            if not self.enabled:
                raise ConfigError("Eval.precision: bfloat16 runs on the CPU fast path only (one CPU process, "
                                  f"Engine.execution auto; here: {unsupported or 'Engine.execution eager'}); "
                                  "set Eval.precision=float32")
            cpu = fast_path.cpu_info()
            if not fast_path.has_bfloat16_units(cpu):
                raise ConfigError(f"Eval.precision: bfloat16 needs a CPU with AVX512-BF16 or AMX-BF16 units, which "
                                  f"this one ({cpu['model']}) lacks (oneDNN would emulate it, slower than float32); "
                                  "set Eval.precision=float32")
        # hook name -> its CheckedFastPath, kept for the run: a dropped predictor stays dropped
        self.paths = {}
        self.open = False  # inside a session()

    @property
    def failed(self):
        """{hook name: why its predictor was dropped} (those hooks run eagerly from then on)."""
        return {name: path.failed for name, path in self.paths.items() if path.failed is not None}

    @contextlib.contextmanager
    def session(self):
        """One evaluation: the module's weights stay as they are inside; predictors are built on demand
        and dropped at the end (the next session's weights will differ)."""
        self.open = True
        try:
            yield self
        finally:
            self.open = False
            for path in self.paths.values():
                path.reset()

    def wrap(self, name, fn, reads_labels=False):
        """`fn(batch) -> {output: [B, ...] tensor}` as a step that runs on the checked predictor of hook
        `name` where it can, else eagerly. `fn` reads batch[0] (the images) and, if `reads_labels`,
        batch[-1], nothing else. One predictor serves every batch size of one image size."""
        if not self.enabled:
            return fn
        if name not in self.paths:
            self.paths[name] = fast_path.CheckedFastPath(
                fn, lambda args, expected: self._predictor(name, reads_labels, *args, expected),
                functools.partial(fast_path.disagreement, bound=TOLERANCE[self.precision]),
                key=lambda batch: (tuple(batch[0].shape), tuple(batch[-1].shape)),
                describe=lambda key: f"batch {'x'.join(map(str, key[0]))}",
                name="static evaluation", detail=f"oneDNN predictor, {self.precision}", target=name,
                fast_name="the predictor")
        path = self.paths[name]
        path.plain = fn  # the Evaluator wraps its hooks anew each evaluation (their autocast may change)

        def step(batch):
            if not self.open:
                raise RuntimeError("StaticInference.wrap: call the step inside a session()")
            return path(batch)
        return step

    def _predictor(self, name, reads_labels, batch, expected):
        """Hook `name`'s checked predictor of this image size (one serves every batch size), else a new one."""
        path, size = self.paths[name], tuple(batch[0].shape[1:])
        same = [predictor for (images, _), predictor in path.checked.items() if images[1:] == size]
        return same[0] if same else self._build(path.plain, batch, list(expected), reads_labels)

    def _build(self, fn, batch, names, reads_labels):
        """A predictor of `fn` on the module's current weights, for any batch size at these image sizes."""
        inputs = (batch[0], batch[-1]) if reads_labels else (batch[0],)
        spec = [paddle.static.InputSpec([None, *t.shape[1:]], t.dtype, name=f"input_{i}") for i, t in enumerate(inputs)]
        # NativeOutput: Paddle's passes print to stdout while building (a failure's output goes to stderr)
        with NativeOutput(), tempfile.TemporaryDirectory() as folder, _unit_affine_batchnorm(self.module):
            prefix = os.path.join(folder, PREFIX)
            paddle.jit.save(_Traced(self.module, fn, names), prefix, input_spec=spec)
            return _Predictor(cpu_predictor(prefix, self.threads, self.precision == "bfloat16"), names)
