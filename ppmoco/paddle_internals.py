"""Every private or undocumented Paddle API ppmoco uses, in one place.

A Paddle upgrade that renames one of these breaks this module only, and
tests/test_paddle_internals.py names the call that broke. The tested Paddle range is
ppmoco/versions.py's TESTED_PADDLE; moving it is a deliberate change that runs that test and the
equivalence tests (tests/engine/test_moco_reference.py, tests/eval/test_static_inference.py).

Each entry says what it is for and which public alternative was tried:
- `set_cpu_threads`: `paddle.base.core.set_num_threads`. The CPU wheel ignores OMP_NUM_THREADS and
  has no public setter; without it every kernel runs on one thread.
- `batchnorm_layers`, `batchnorm_running_statistics`, `batchnorm_statistics`: BatchNorm layers
  (`nn.layer.norm._BatchNormBase`, the common base of BatchNorm1D/2D/3D and SyncBatchNorm) and their
  `_mean`/`_variance`, which Paddle lists among `parameters()`. Public alternative: matching
  state-dict names ending in `_mean`/`_variance`, which would also catch any user parameter so named.
  The evaluation fast path gives the BatchNorms without affine parameters a unit scale while it traces
  them (ppmoco/eval/static_inference.py); fine-tuning averages the running statistics over processes.
- `parameter_tables`: `Layer._parameters` / `Layer._buffers`: the evaluation fast path gives a
  BatchNorm without affine parameters a unit scale while it traces it, and takes it away after
  (`named_parameters()` gives the tensors but not the slots that hold them).
- `o2_cast`: `paddle.amp.auto_cast.amp_initialize`, the cast `paddle.amp.decorate(level="O2")`
  applies on GPU. `decorate` itself returns early on CPU, so the tests call this to see on CPU
  which tensors O2 would cast.
- `rng_state_tuples`, `rng_state_from_tuples`: the pickle methods (`__getstate__`/`__setstate__`)
  of `paddle.base.core.GeneratorState`, what `paddle.get_rng_state()` returns: checkpoints store the
  random state as JSON, never as a pickle. Public alternative: none (the states are opaque objects
  whose only serialisation is pickle's, and reading a pickle can run code).
- `conv2d_settings`: an nn.Conv2D's `_stride`, `_updated_padding` (its padding as numbers),
  `_groups`, `_dilation`, `_data_format`, `_padding_mode`, `_padding_algorithm`: which convolutions
  ppmoco/ops computes, and with what window. Public alternative: none (the layer keeps its
  constructor arguments only in these).
- `load_custom_op_library`: `paddle.utils.cpp_extension.extension_utils`'s
  `load_op_meta_info_and_register_op` and `_generate_python_module`, what
  `paddle.utils.cpp_extension.load` ends with. The public `load` also reruns its setup machinery
  on an unchanged build (3 s and a few log lines in every training process); ppmoco/ops loads the
  library it built before with these two.
"""
import importlib
import os

import paddle


def set_cpu_threads(count):
    paddle.base.core.set_num_threads(count)


def batchnorm_layers(layer):
    """(BatchNorm, its number of channels) for every BatchNorm in `layer`."""
    return [(sub, sub._mean.shape[0]) for sub in layer.sublayers(include_self=True)
            if isinstance(sub, paddle.nn.layer.norm._BatchNormBase)]


def batchnorm_running_statistics(layer):
    """The running mean and variance tensors of every BatchNorm in `layer`."""
    return [t for sub, _ in batchnorm_layers(layer) for t in (sub._mean, sub._variance)]


def batchnorm_statistics(layer):
    """ids of the running mean/variance tensors of every BatchNorm in `layer`."""
    return {id(t) for t in batchnorm_running_statistics(layer)}


def parameter_tables(layer):
    """The dicts in which `layer` itself (not its sublayers) holds its parameters and buffers."""
    return layer._parameters, layer._buffers


def o2_cast(layers, dtype):
    """Cast `layers` in place as O2 mixed precision does on GPU (normalisation layers stay float32)."""
    # paddle.amp.auto_cast names the function; the module of that name is reached by import path
    importlib.import_module("paddle.amp.auto_cast").amp_initialize(models=list(layers), dtype=dtype,
                                                                   excluded_layers=None)


def rng_state_tuples(states):
    """`paddle.get_rng_state()` as (device, seed, offset, [engine state characters]) tuples."""
    return [state.__getstate__() for state in states]


def rng_state_from_tuples(tuples):
    """The `paddle.set_rng_state` argument for `rng_state_tuples`' output."""
    states = []
    for values in tuples:
        state = paddle.base.core.GeneratorState.__new__(paddle.base.core.GeneratorState)
        state.__setstate__(tuple(values))
        states.append(state)
    return states


def load_custom_op_library(module_name, folder):
    """The Python module of the custom operators in `folder`/`module_name`.so, built before by
    `paddle.utils.cpp_extension.load(name=module_name, ...)` (registered in Paddle, callable eagerly
    and in static programs)."""
    extension_utils = importlib.import_module("paddle.utils.cpp_extension.extension_utils")
    op_names = extension_utils.load_op_meta_info_and_register_op(os.path.join(folder, module_name + ".so"))
    return extension_utils._generate_python_module(module_name, op_names, folder)


def conv2d_settings(layer):
    """The window and options of an nn.Conv2D `layer`: stride, padding (as numbers, or Paddle's
    other forms), groups, dilation, data_format, padding_mode, padding_algorithm."""
    return dict(stride=list(layer._stride), padding=layer._updated_padding, groups=layer._groups,
                dilation=list(layer._dilation), data_format=layer._data_format,
                padding_mode=layer._padding_mode, padding_algorithm=layer._padding_algorithm)
