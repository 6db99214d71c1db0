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

No predictor is trusted unchecked: the first batch of every shape in a session runs the eager hook and
the predictor, and every output must agree (TOLERANCE). A predictor that disagrees, or fails natively,
is dropped: that hook runs eagerly from then on and one log line says why. It runs on one CPU process,
in float32 unless `Eval.precision: bfloat16` asks otherwise; `Engine.execution: eager` never uses it.
Equivalence with eager and with a NumPy computation is tested in tests/eval/test_static_inference.py.
"""
import contextlib
import logging
import os
import tempfile
import time

import numpy as np
import paddle

from ppmoco import fast_path
from ppmoco.errors import ConfigError
from ppmoco.inference import NativeOutput, cpu_predictor
from ppmoco.paddle_internals import batchnorm_layers, parameter_tables

logger = logging.getLogger("ppmoco")

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


def _disagreement(expected, got, bound):
    """Why the predictor's outputs are not the eager hook's (a short phrase), or None."""
    for name, want in expected.items():
        want, have = want.numpy(), got[name].numpy()
        if want.shape != have.shape or want.dtype != have.dtype:
            return f"{name} is {have.dtype}{list(have.shape)}, eager {want.dtype}{list(want.shape)}"
        if want.dtype.kind not in "fc":
            if not np.array_equal(want, have):
                return f"{name} differs from eager in {int((want != have).sum())} of {want.size} values"
            continue
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        diff = float(np.abs(have.astype("float64") - want).max(initial=0.0))
        if not diff <= bound * scale:  # also refuses NaN
            return f"{name} is {diff:.3g} off eager's (bound {bound * scale:.3g})"
    return None


class _Predictor:
    """One hook's predictor for the weights of one session, and the batch shapes checked on it."""

    def __init__(self, predictor, names):
        self.predictor, self.names, self.checked = predictor, names, set()

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
        self.failed = {}  # hook name -> why its predictor was dropped (it runs eagerly from then on)
        self.announced = set()  # hooks whose first check passed was logged (later ones log at debug level)
        self.predictors = None  # (hook name, image shape) -> _Predictor while a session is open

    @contextlib.contextmanager
    def session(self):
        """One evaluation: the module's weights stay as they are inside; predictors are built on demand
        and dropped at the end (the next session's weights will differ)."""
        self.predictors = {}
        try:
            yield self
        finally:
            self.predictors = None

    def wrap(self, name, fn, reads_labels=False):
        """`fn(batch) -> {output: [B, ...] tensor}` as a step that runs on the checked predictor of hook
        `name` where it can, else eagerly. `fn` reads batch[0] (the images) and, if `reads_labels`,
        batch[-1], nothing else. One predictor serves every batch size of one image size."""
        if not self.enabled:
            return fn

        def step(batch):
            if self.predictors is None:
                raise RuntimeError("StaticInference.wrap: call the step inside a session()")
            if name in self.failed:
                return fn(batch)
            predictor = self.predictors.get((name, tuple(batch[0].shape[1:])))
            shape = (tuple(batch[0].shape), tuple(batch[-1].shape))
            if predictor is not None and shape in predictor.checked:
                return predictor(batch)
            return self._check(name, fn, batch, shape, reads_labels)
        return step

    def _check(self, name, fn, batch, shape, reads_labels):
        """The first batch of a shape in a session: eager, then the predictor (built if need be)."""
        started = time.perf_counter()
        expected = fn(batch)
        key, failure = (name, shape[0][1:]), None
        # Paddle's passes print to stdout while building; a failure's native traceback stays there too,
        # reported in the one line below
        with NativeOutput():
            try:
                predictor = self.predictors.get(key) or self._build(fn, batch, list(expected), reads_labels)
                got = predictor(batch)
            except Exception as err:  # noqa: BLE001 - a native failure of the predictor is reported, not fatal
                failure = err
        if failure is None:
            problem = _disagreement(expected, got, TOLERANCE[self.precision])
        else:
            lines = str(failure).strip().splitlines()
            problem = f"the predictor failed ({type(failure).__name__}: {lines[-1] if lines else 'no message'})"
        described = f"{name}, batch {'x'.join(map(str, shape[0]))}"
        if problem is None:
            self.predictors[key] = predictor
            predictor.checked.add(shape)
            log = logger.debug if name in self.announced else logger.info
            self.announced.add(name)
            log(f"static evaluation (oneDNN predictor, {self.precision}) checked against eager for {described} "
                f"({time.perf_counter() - started:.1f} s)")
            return got
        self.failed[name] = problem
        self.predictors = {k: v for k, v in self.predictors.items() if k[0] != name}
        logger.warning(f"static evaluation not used for {name}: {problem} (batch {'x'.join(map(str, shape[0]))}); "
                       "it runs eagerly (Engine.execution=eager skips this check)")
        return expected

    def _build(self, fn, batch, names, reads_labels):
        """A predictor of `fn` on the module's current weights, for any batch size at these image sizes."""
        inputs = (batch[0], batch[-1]) if reads_labels else (batch[0],)
        spec = [paddle.static.InputSpec([None, *t.shape[1:]], t.dtype, name=f"input_{i}") for i, t in enumerate(inputs)]
        with tempfile.TemporaryDirectory() as folder, _unit_affine_batchnorm(self.module):
            prefix = os.path.join(folder, PREFIX)
            paddle.jit.save(_Traced(self.module, fn, names), prefix, input_spec=spec)
            return _Predictor(cpu_predictor(prefix, self.threads, self.precision == "bfloat16"), names)
