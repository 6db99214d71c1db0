"""Smoke test of every Paddle internal ppmoco relies on (ppmoco/paddle_internals.py).

Each check names the call, so after a Paddle upgrade the failure says which internal moved.
"""
import os
import subprocess
import sys

import numpy as np
import paddle

from ppmoco import paddle_internals as internals
from ppmoco.versions import TESTED_PADDLE, release_key


def test_cpu_threads_can_be_set():
    internals.set_cpu_threads(1)  # raises if paddle.base.core.set_num_threads is gone


def test_batchnorm_statistics_are_the_running_mean_and_variance():
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.BatchNorm1D(2))
    stats = internals.batchnorm_statistics(net)
    expected = {id(net[1]._mean), id(net[1]._variance), id(net[2]._mean), id(net[2]._variance)}
    assert stats == expected, "BatchNorm's _mean/_variance or nn.layer.norm._BatchNormBase changed"
    assert stats <= {id(p) for p in net.parameters()}, "Paddle no longer lists BN statistics as parameters"


def test_a_layers_parameter_tables_are_its_own_slots():
    params, buffers = internals.parameter_tables(paddle.nn.BatchNorm1D(2))
    assert "weight" in params and {"_mean", "_variance"} <= set(params) | set(buffers)


def test_the_installed_paddle_is_in_the_tested_range():
    """ppmoco/versions.py names the range these internals were tested with."""
    low, high = TESTED_PADDLE
    assert low <= release_key(paddle.__version__) < high


def test_o2_cast_is_the_cast_decorate_applies_on_gpu():
    net = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4))
    internals.o2_cast([net], "bfloat16")  # raises if paddle.amp.auto_cast.amp_initialize moved
    assert net[0].weight.dtype == paddle.bfloat16, "amp_initialize no longer casts in place"
    assert net[1].weight.dtype == paddle.float32, "amp_initialize no longer keeps norms in float32"


def test_rng_state_round_trips_through_plain_tuples():
    paddle.seed(11)
    paddle.rand([3])
    tuples = internals.rng_state_tuples(paddle.get_rng_state())
    assert all(len(t) == 4 and all(type(v) is int for v in t[:3]) and type(t[3]) is list for t in tuples), \
        "GeneratorState.__getstate__ no longer gives (device, seed, offset, engine characters)"
    assert all(0 <= c < 128 for t in tuples for c in t[3]), "the engine state is no longer ASCII text"
    expected = paddle.rand([5]).numpy()
    paddle.set_rng_state(internals.rng_state_from_tuples(tuples))
    np.testing.assert_array_equal(paddle.rand([5]).numpy(), expected)


def test_a_built_custom_operator_library_loads_without_the_build_machinery():
    # Catches load_custom_op_library returning a module whose operator is missing or computes
    # something else than the library ppmoco/ops built. In a process of its own: Paddle registers a
    # library's operators once per process, as ppmoco/ops loads it.
    from ppmoco.ops import conv

    conv.onednn_conv_module()  # builds the library into the cache if no earlier process did
    built = os.path.join(conv.build_directory(conv.onednn_include_dir()), conv.MODULE)
    code = ("import sys, numpy as np, paddle\n"
            "from ppmoco import paddle_internals as internals\n"
            "module = internals.load_custom_op_library(sys.argv[1], sys.argv[2])\n"
            "x, w = paddle.randn([2, 3, 9, 9]), paddle.randn([4, 3, 3, 3])\n"
            "np.testing.assert_allclose(module.onednn_conv2d(x, w, [2, 2], [1, 1], False).numpy(),\n"
            "    paddle.nn.functional.conv2d(x, w, stride=2, padding=1).numpy(), rtol=1e-5, atol=1e-5)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, conv.MODULE, built], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_conv2d_settings_are_the_layers_window_and_options():
    # Catches a renamed private attribute (KeyError/AttributeError) or padding no longer kept as numbers.
    settings = internals.conv2d_settings(paddle.nn.Conv2D(3, 4, 3, stride=2, padding=1, bias_attr=False))
    assert settings == dict(stride=[2, 2], padding=[1, 1], groups=1, dilation=[1, 1], data_format="NCHW",
                            padding_mode="zeros", padding_algorithm="EXPLICIT"), settings
