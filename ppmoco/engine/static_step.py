"""The training step compiled into one static program and run on oneDNN kernels (the CPU fast path).

Eager Paddle runs conv2d on CPU with plain kernels; the same step as a static program whose
convolutions run on oneDNN is several times faster (docs/performance.md). Nothing of
the method is written twice: the program is built by calling the Module's own `training_step` once
on static inputs while every parameter and buffer of the module is temporarily replaced by a static
value of the same name. Those static variables then share memory with the eager tensors, and so do
the optimizer's velocities, so checkpoints, evaluation, resume and the NaN guard keep working on
the eager module and optimizer without copies. `Module.before_step` and `Module.after_step` (MoCo's
momentum update and enqueue) run eagerly on the shared tensors around each program run: written
inside the program, their in-place updates were measured to race the step's reads.

Paddle's oneDNN placement pass moves every op it can to oneDNN; the ops in PLAIN_CPU_OPS go back
to Paddle's CPU kernels, each for the measured reason given there. With `Engine.conv: onednn` the
convolutions are ppmoco's own oneDNN operator (ppmoco/ops), which the pass leaves as it is: Paddle's
convolution kernels cache reordered copies of their data for the life of the process.

No program is trusted unchecked: the first batch of every shape runs the eager step and the
program from the same state (weights, BN statistics, queue, velocities, random generator) and
compares the loss and the update of every tensor, the queue's included (CHECK_TOLERANCES). A program that
disagrees, or fails natively, is dropped: that shape runs eagerly from then on and one log line says
why; with `Engine.execution: static` it is a one-line error instead. The check costs one eager step
and two copies of the training state in a temporary file per batch shape (docs/training.md "The CPU fast path").
Equivalence with eager and with a PyTorch reference is tested in tests/engine/test_static_step.py
and tests/engine/test_moco_reference.py.
"""
import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
import time
import warnings

import numpy as np
import paddle

from ppmoco import paddle_internals as internals
from ppmoco.engine.env import release_freed_memory
from ppmoco.errors import ConfigError

logger = logging.getLogger("ppmoco")

# oneDNN ops that go back to Paddle's CPU kernels, each for a measured reason (docs/performance.md):
PLAIN_CPU_OPS = {
    "add": ("Paddle's in-place pass lets oneDNN's add write over an input the backward still reads "
            "(wrong ResNet gradients; right with FLAGS_pir_apply_inplace_pass off)"),
    "add_grad": "raises dnnl::error when a broadcast operand's reduction has batch 1 (the heads' bias)",
    "batch_norm_": "does not write the running mean/variance back in training mode",
    "batch_norm_grad": "falls back to oneDNN's slow reference code on blocked-layout gradients",
    "relu_grad": "same reference-code fallback as batch_norm_grad",
    "relu_grad_": "same reference-code fallback as batch_norm_grad",
    "matmul_grad": "crashes when one input needs no gradient (the detached queue)",
    "divide_grad": "returns a wrong gradient for the divisor (F.normalize)",
    "pool2d_grad": "raises a oneDNN error (ResNet's max-pool stem)",
    "concat": "its gradients came out wrong in the MoCo step (at the projection head)",
    "log_softmax": ("each Paddle-kernel reader of its result gets its own layout transfer sharing the memory, so "
                    "the in-place pass let a `where` overwrite it while log_softmax_grad still read it (wrong "
                    "gradients of the supervised-contrastive losses)"),
    "mean": "prints 'ReduceMeanCheckIfOneDNNSupport' to stdout at every run (and it is cheap)",
}
_onednn_ready = False


def _register_onednn_dialect():
    """Lower a one-op program with FLAGS_use_onednn, the only public way to load Paddle's oneDNN
    operator dialect, which the placement pass below needs."""
    global _onednn_ready
    if _onednn_ready:
        return
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [1], "float32")
        y = paddle.nn.functional.relu(x)
    paddle.set_flags({"FLAGS_use_onednn": True})  # (called in static mode by place_on_onednn)
    try:
        paddle.static.Executor(paddle.CPUPlace()).run(
            main, feed={"x": np.ones([1], "float32")}, fetch_list=[y], scope=paddle.static.Scope())
    finally:
        paddle.set_flags({"FLAGS_use_onednn": False})
    _onednn_ready = True


def _operand(value):
    """An op's input as Paddle's builders take it (a list for a combined vector input)."""
    owner = value.get_defining_op()
    if owner is not None and owner.name() == "builtin.combine":
        return [owner.operand_source(i) for i in range(owner.num_operands())]
    return value


def _rebuild_plain(op, attr_names, is_test):
    """Replace a oneDNN op by the Paddle CPU op with the same operands and `attr_names` (the
    Paddle op's attributes, in its builder's order; oneDNN ops carry extra ones)."""
    attrs = op.attrs()
    args = [_operand(op.operand_source(i)) for i in range(op.num_operands())]
    args += [is_test if name == "is_test" else attrs[name] for name in attr_names]
    paddle.pir.set_insertion_point(op)
    outs = internals.pir_builder(op.name().split(".", 1)[1])(*args)
    for old, new in zip(op.results(), outs if isinstance(outs, (list, tuple)) else [outs]):
        old.replace_all_uses_with(new)
    op.erase()


def _kind(op):
    return op.name().split(".", 1)[1]


def place_on_onednn(program):
    """Move the ops of `program` that oneDNN supports onto oneDNN, except PLAIN_CPU_OPS."""
    _register_onednn_dialect()
    # The placement pass targets inference and sets every is_test; keep the program's own values
    # (a frozen eval-mode backbone keeps is_test=True BatchNorm) and train everything else.
    is_test, attr_names = {}, {}
    for op in program.global_block().ops:
        if _kind(op) in PLAIN_CPU_OPS:
            attr_names[_kind(op)] = op.get_attr_names()
        if op.has_attr("is_test"):
            is_test.setdefault(_kind(op), []).append(op.attrs()["is_test"])
    passes = paddle.pir.PassManager()
    passes.add_pass(internals.ONEDNN_PLACEMENT_PASS, {})
    passes.run(program)
    for op in list(program.global_block().ops):
        if not op.name().startswith("onednn_op."):
            continue
        kind = _kind(op)
        own = is_test[kind].pop(0) if is_test.get(kind) else False
        if kind in PLAIN_CPU_OPS:
            _rebuild_plain(op, attr_names[kind], own)
        elif op.has_attr("is_test"):
            op.set_bool_attr("is_test", own)
    paddle.pir.reset_insertion_point_to_end()


@contextlib.contextmanager
def _static_mode():
    """Paddle builds and runs PIR programs only while static mode is on; the rest of ppmoco is eager."""
    paddle.enable_static()
    try:
        yield
    finally:
        paddle.disable_static()


class _SwappedState:
    """Context that replaces each parameter and buffer of `module` by a static value named after its
    state-dict key (a trainable static parameter for a trainable one, else a frozen one)."""

    def __init__(self, module):
        self.module = module
        self.names = {id(t): k for k, t in module.state_dict(keep_vars=True).items()}
        self.saved, self.values = [], {}

    def __enter__(self):
        zero = paddle.nn.initializer.Constant(0.0)
        for layer in self.module.sublayers(include_self=True):
            for table in internals.parameter_tables(layer):
                for attr, tensor in list(table.items()):
                    if tensor is None or id(tensor) not in self.names:
                        continue
                    key = self.names[id(tensor)]
                    trainable = not tensor.stop_gradient
                    value = paddle.static.create_parameter(
                        tensor.shape, tensor.dtype, name=key, default_initializer=zero)
                    value.stop_gradient = not trainable
                    value.trainable = trainable
                    self.saved.append((table, attr, tensor))
                    self.values[key] = (value, tensor)
                    table[attr] = value
        return self.values

    def __exit__(self, *exc):
        for table, attr, tensor in self.saved:
            table[attr] = tensor


@dataclasses.dataclass
class _Compiled:
    """One built program and what running it needs."""

    program: object
    scope: object
    lr_name: str
    fetch_names: list  # the metrics' names, then "after_step:<name>" for after_step's tensors
    fetch_values: list
    shared: list  # (static variable name, eager tensor) pairs that share memory


# How far the program's first step may be from the eager step's before it is dropped. r is the
# relative error of a tensor's update, ||d_static - d_eager|| / ||d_eager||. Float32 alone (oneDNN's
# summation order, a ReLU that flips sign) gives median r below 2e-3 over the trainable parameters
# and r below 0.03 for every tensor; the faults this guards against gave a median of 0.5-0.7 and
# a max of 2-5, or 1.0 for a BN statistic that never moves.
CHECK_TOLERANCES = {"loss": 1e-4, "median_trainable": 0.05, "every_tensor": 0.5}


class _Snapshot:
    """Copies of everything a step changes, `tensors` ({name: tensor}: the module state and the
    optimizer velocities), and of the random generator. The tensors' copies go to an unnamed
    temporary file, read back one at a time: the check holds one of them while a step runs, which
    in memory would add the size of the training state to the process's peak (0.35 GiB for ResNet-50)."""

    def __init__(self, tensors):
        self.tensors, self.file, self.copies = tensors, None, None
        try:
            self.file = tempfile.TemporaryFile(buffering=0)  # unbuffered: a failed write fails here, not at close
            for tensor in tensors.values():
                np.save(self.file, tensor.numpy(), allow_pickle=False)
        except OSError:  # no room (or no temporary directory): the copies stay in memory
            self.close()
            self.copies = [tensor.numpy().copy() for tensor in tensors.values()]
        self.rng = paddle.get_rng_state()

    def values(self):
        """(name, host copy) of each tensor, in the order of `tensors`."""
        if self.copies is not None:
            yield from zip(self.tensors, self.copies)
            return
        self.file.seek(0)
        for key in self.tensors:
            yield key, np.load(self.file, allow_pickle=False)

    def restore(self):
        for key, value in self.values():
            paddle.assign(value, output=self.tensors[key])
        paddle.set_rng_state(self.rng)

    def close(self):
        """Drop the copies (file or memory), so that memory released after this has them back."""
        if self.file is not None:
            self.file.close()
        self.file = self.copies = None


class _StderrCapture:
    """Collects what native code writes to file descriptor 2 (Paddle names a failing op there)
    and passes it on to the real stderr afterwards, but for SILENCED lines."""

    # Native warnings printed while tracing that say nothing to a user: F.normalize hands PIR an
    # `out` tensor it ignores (the program's result is checked against the eager step anyway).
    SILENCED = ("Paddle static graph(PIR) not support input out tensor",)

    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        sys.stderr.write("".join(line for line in self.text.splitlines(keepends=True)
                                 if not any(silenced in line for silenced in self.SILENCED)))
        sys.stderr.flush()

    def failing_op(self):
        found = re.findall(r"(\S+) raises an exception", self.text)
        return found[-1] if found else None


def _update_norms(before, after):
    """Per floating tensor of two snapshots: (||after - before||, ||before||), what the check needs of
    the state before the eager step once that state is restored (the program's update minus the eager
    one is the difference of their results)."""
    norms = {}
    for (key, start), (_, end) in zip(before.values(), after.values()):
        if start.dtype.kind == "f":
            start = start.astype("float64")
            norms[key] = (np.linalg.norm(end - start), np.linalg.norm(start))
    return norms


def _disagreement(eager, update_norms, state, expected, got, trainable):
    """Why the static step's result (the tensors of `state` now) is not the eager step's (`eager`, a
    snapshot; `update_norms` from _update_norms), as a short phrase, or None."""
    loss_e, loss_s = float(expected["loss"]), float(got["loss"])
    if abs(loss_s - loss_e) > CHECK_TOLERANCES["loss"] * max(1.0, abs(loss_e)):
        return f"loss {loss_s:.6g} vs eager {loss_e:.6g}"
    errors = {}
    for key, reference in eager.values():
        static = state[key].numpy()
        if key not in update_norms:
            if not np.array_equal(static, reference):
                return f"{key} differs from eager"
            continue
        eager_norm, start_norm = update_norms[key]
        difference = np.linalg.norm(static.astype("float64") - reference)
        errors[key] = float(difference / max(eager_norm, 1e-6 * start_norm, 1e-12))
    worst = max(errors, key=errors.get)
    if errors[worst] > CHECK_TOLERANCES["every_tensor"]:
        return f"the update of {worst} is {errors[worst]:.2g} off eager's"
    median = float(np.median([errors[k] for k in trainable]))
    if median > CHECK_TOLERANCES["median_trainable"]:
        return f"the trainable parameters' updates are {median:.2g} off eager's (median)"
    return None


class StaticTrainStep:
    """Callable like TrainStep: one program run per step, on the module's and optimizer's own tensors.

    After each run every shared variable is checked to still be the eager tensor's memory, so a
    kernel that reallocated instead of updating in place fails loudly instead of training a copy.

    Programs are built and checked against `eager_step` (a TrainStep on the same module and
    optimizer) at the first batch of each shape (usually once). `build_optimizer(module)` makes the
    optimizer for the static parameters, with the same settings as `optimizer`. `strict` turns a
    failed check into a ConfigError instead of the eager fallback.
    """

    def __init__(self, module, optimizer, build_optimizer, eager_step, strict=False):
        self.module, self.optimizer = module, optimizer
        self.build_optimizer, self.eager_step, self.strict = build_optimizer, eager_step, strict
        # The eager optimizer's velocities exist from the start, to be shared with the program's.
        internals.create_velocities(optimizer, module.trainable_parameters())
        self.velocity = internals.velocities(optimizer)
        state = module.state_dict()
        self.trainable = [k for k, t in state.items() if not t.stop_gradient]
        # Everything a step changes, by the names the check reports.
        self.step_state = dict(state, **{f"{k} (velocity)": self.velocity[state[k].name] for k in self.trainable})
        self.place = paddle.CPUPlace()
        # The interpreter's own scheduling threads compete with the kernels' OpenMP threads for
        # the cores; running ops one after another is faster (docs/performance.md).
        paddle.set_flags({"FLAGS_new_executor_serial_run": True})
        self.executor = paddle.static.Executor(self.place)
        self.programs = {}  # batch shapes -> _Compiled, or None where the eager step runs

    @property
    def conv(self):
        """The convolutions of the program and of its check: the eager step's ("onednn" or "paddle")."""
        return self.eager_step.conv

    @property
    def conv_dtype(self):
        """What they compute in ("float32" or "bfloat16"): the eager step's."""
        return self.eager_step.conv_dtype

    def scaler_state(self):
        return self.eager_step.scaler_state()

    def load_scaler_state(self, state, path):
        self.eager_step.load_scaler_state(state, path)

    @property
    def execution(self):
        """What runs the steps: the programs, or eager where a program failed its check."""
        if any(compiled is None for compiled in self.programs.values()):
            return "eager where the static program failed its check, else static (oneDNN)"
        return "static (oneDNN)"

    def _build(self, batch):
        with _static_mode():
            main, startup = paddle.static.Program(), paddle.static.Program()
            # Entered before the swap: which convolutions the operator computes is read from the eager weights.
            with self.eager_step.convolutions(), paddle.static.program_guard(main, startup), \
                    _SwappedState(self.module) as values:
                inputs = [paddle.static.data(f"batch_{i}", t.shape, t.dtype) for i, t in enumerate(batch)]
                out = dict(self.module.training_step(inputs))
                state = out.pop("after_step", {})
                static_opt = self.build_optimizer(self.module)
                with warnings.catch_warnings():  # Paddle's own backward asks a Value for its place
                    warnings.filterwarnings("ignore", message="Tensor do not have 'place' interface")
                    static_opt.minimize(out["loss"])
                # after_step's tensors (MoCo's keys) come out with the metrics and after_step runs
                # eagerly: written inside the program, its in-place updates were measured to race
                # the backward pass's reads. Fetch copies: the placement pass replaces ops, which
                # would orphan their results.
                fetches = {k: paddle.assign(v) for k, v in out.items()}
                fetches.update({f"after_step:{k}": paddle.assign(v) for k, v in state.items()})
            lr_value = internals.learning_rate_variable(static_opt, main)
            velocity = internals.velocities(static_opt)
            place_on_onednn(main)
            scope = paddle.static.Scope()
            self.executor.run(startup, scope=scope)
        shared = []
        for key, (value, tensor) in values.items():
            shared.append((key, tensor))
            if not tensor.stop_gradient:
                shared.append((velocity[value.name].name, self.velocity[tensor.name]))
        return _Compiled(main, scope, lr_value.name, list(fetches), list(fetches.values()), shared)

    def __call__(self, batch):
        """Run one step on `batch`; return the module's metrics as (CPU) tensors."""
        shapes = tuple((tuple(t.shape), str(t.dtype)) for t in batch)
        if shapes not in self.programs:
            return self._build_and_check(shapes, batch)
        compiled = self.programs[shapes]
        return self.eager_step(batch) if compiled is None else self._run(compiled, batch)

    def _build_and_check(self, shapes, batch):
        """The first step of a batch shape: eager, then the new program from the same state."""
        started = time.perf_counter()
        before = _Snapshot(self.step_state)
        expected = self.eager_step(batch)
        eager = _Snapshot(self.step_state)
        update_norms = _update_norms(before, eager)
        before.restore()
        before.close()
        release_freed_memory()  # the eager step's heap: the program's allocations are laid out otherwise
        capture = _StderrCapture()
        try:
            with capture:
                compiled = self._build(batch)
                got = self._run(compiled, batch)
            problem = _disagreement(eager, update_norms, self.step_state, expected, got, self.trainable)
        except Exception as err:  # noqa: BLE001 - a native failure of the program is reported, not fatal
            op = capture.failing_op()
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            problem = f"the program failed{f' in {op}' if op else ''} ({type(err).__name__}: {message})"
        if problem is not None:
            eager.restore()  # the step as the eager path computed it
        eager.close()
        release_freed_memory()  # the check's copies and the pages the steps after it do not reuse
        shape = "x".join(map(str, batch[0].shape))
        if problem is None:
            self.programs[shapes] = compiled
            logger.info(f"static fast path checked against the eager step for batch {shape} "
                        f"({time.perf_counter() - started:.1f} s)")
            return got
        if self.strict:
            raise ConfigError(f"Engine.execution: static: for batch {shape} {problem}; "
                              "set Engine.execution=auto (falls back by itself) or eager")
        self.programs[shapes] = None
        logger.warning(f"static fast path not used for batch {shape}: {problem}; "
                       "those steps run eagerly (Engine.execution=eager skips this check)")
        return expected

    def _run(self, compiled, batch):
        scope = compiled.scope
        with paddle.no_grad():
            self.module.before_step()
        # Re-share every step: eager code (a checkpoint load, the NaN guard) may have given a tensor
        # new memory. Sharing is cheap next to a step.
        for name, tensor in compiled.shared:
            internals.share_memory(scope.find_var(name).get_tensor(), tensor)
        lr = scope.find_var(compiled.lr_name).get_tensor()
        lr.set(np.full(np.array(lr).shape, self.optimizer.get_lr(), "float32"), self.place)
        feed = {f"batch_{i}": t.numpy() for i, t in enumerate(batch)}
        with _static_mode():
            values = self.executor.run(compiled.program, feed=feed, fetch_list=compiled.fetch_values,
                                       scope=scope)
        for name, tensor in compiled.shared:
            if not internals.same_memory(scope.find_var(name).get_tensor(), tensor):
                raise RuntimeError(f"static step: Paddle reallocated '{name}' instead of updating it in "
                                   "place; run with Engine.execution=eager and report this")
        results, state = {}, {}
        for name, value in zip(compiled.fetch_names, values):
            kind, _, key = name.rpartition(":")
            (state if kind == "after_step" else results)[key] = paddle.to_tensor(np.asarray(value))
        with paddle.no_grad():
            self.module.after_step(state)
        return results
