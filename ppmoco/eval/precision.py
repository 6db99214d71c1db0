"""Evaluation hooks of a module that O2 mixed precision cast: run under autocast, outputs as float32.

With `Engine.mix_precision: {enable: true, level: O2}` the training step hands
`Module.low_precision_layers()` to `paddle.amp.decorate`, which on GPU casts their convolutions and
linear layers to float16/bfloat16 (normalisation layers stay float32). Eager ops do not cast their
inputs by themselves: a float32 image meeting a float16 convolution fails in the kernel ("Expected
dtype() == CppTypeToDataType<T>::Type()"), so the evaluation hooks of such a module run under the run's
autocast, level O2, as its training step does (and as PaddleClas evaluates under O2). Their outputs
(features, logits, pooled stages) are handed on as float32: kNN, SVMs and metrics then compute as they
do for a float32 module, and numpy never sees a bfloat16 tensor (whose `numpy()` is its raw uint16 bits).

The decision is taken per evaluation from the module's parameters, not from the config alone: the
Engine builds its Evaluator before its step casts the module, on CPU `decorate` casts nothing (the
run evaluates in float32 as before) and O1 casts no weight.
"""
import contextlib
import logging

import paddle

logger = logging.getLogger("ppmoco")

LOW_PRECISION = ("float16", "bfloat16")


def dtype_name(dtype):
    """'float32', 'bfloat16', ... for a paddle dtype."""
    return str(dtype).rsplit(".", 1)[-1]


def cast_dtype(module):
    """The low-precision dtype ('float16' or 'bfloat16') of `module`'s O2-cast parameters, or None."""
    found = {dtype_name(p.dtype) for p in module.parameters()} & set(LOW_PRECISION)
    if len(found) > 1:
        raise RuntimeError(f"{type(module).__name__} holds both float16 and bfloat16 parameters; O2 mixed "
                           "precision casts to one dtype (a ppmoco bug: please report it)")
    return found.pop() if found else None


def as_float32(outputs):
    """Every float16/bfloat16 tensor of a hook's outputs (a tensor, or a dict, list or tuple of them) as
    float32; other tensors and values unchanged."""
    if isinstance(outputs, dict):
        return {name: as_float32(value) for name, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(as_float32(value) for value in outputs)
    if isinstance(outputs, paddle.Tensor) and dtype_name(outputs.dtype) in LOW_PRECISION:
        return outputs.astype("float32")
    return outputs


class HookPrecision:
    """How one evaluation runs a module's hooks: `wrap(fn)` runs `fn` under the autocast the module's
    O2 cast needs (none for a float32 module) and returns its outputs as float32.

    `amp_cfg` is Engine.mix_precision; its dtype and op lists are used when it asks for O2, else the
    cast dtype found on the module (with Paddle's default lists)."""

    def __init__(self, module, amp_cfg):
        amp_cfg = amp_cfg or {}
        self.dtype = cast_dtype(module)
        self.autocast = None
        if self.dtype is None:
            return
        configured = amp_cfg.get("enable") and amp_cfg.get("level") == "O2"
        if configured and amp_cfg.get("dtype", self.dtype) != self.dtype:
            raise RuntimeError(f"Engine.mix_precision.dtype is {amp_cfg['dtype']} but {type(module).__name__}'s "
                               f"layers were cast to {self.dtype} (a ppmoco bug: please report it)")
        lists = {k: amp_cfg.get(k) or None for k in ("custom_white_list", "custom_black_list")} if configured else {}
        self.autocast = dict(enable=True, level="O2", dtype=self.dtype, **lists)

    def context(self):
        """The autocast the hooks run under (a null context for a float32 module)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        # Only a GPU (or XPU / custom device) autocasts: on CPU Paddle warns and does nothing, where
        # `decorate` casts no weight either, so a CPU run never gets here (tests/eval/test_eval_under_o2.py).
        return paddle.amp.auto_cast(**self.autocast)

    def wrap(self, fn):
        """`fn(*args)` under context(), its floating outputs as float32; `fn` itself for a float32 module
        (the evaluation fast path traces it: nothing is added to what it traces)."""
        if self.autocast is None:
            return fn

        def run(*args, **kwargs):
            with self.context():
                outputs = fn(*args, **kwargs)
            return as_float32(outputs)
        return run
