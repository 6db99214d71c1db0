"""The oneDNN convolution operator (ppmoco/ops) equals Paddle's conv2d, forward and both gradients,
at the convolutions ResNets train with.

The reference is Paddle's eager conv2d in float64 on the same (float32-representable) values; the
operator computes in float32, so results are compared by relative error, within 1e-5 of the
reference's norm (float32 rounding over at most 1152 products per output; the faults below give
1e-2 and more, or an error). The output gradient is random, not ones, so a shifted or mirrored
gradient cannot cancel out. Mutations of onednn_conv.cc that were run against these cases, and
which cases failed:
- the weights read as IOHW (forward or data gradient), d weight written as HWIO, d input and
  d weight swapped, d weight computed from d input instead of X: every case;
- padding 0 (forward, or the data gradient's): every padded case (stems, 3x3 stride 1 and 2);
- the weight gradient with stride 1, or reading d out in the data gradient's layout without the
  reorder it needs: the stride-2 cases (7x7 stem, 3x3/2, 1x1/2 downsample), where the two
  gradients want different layouts;
- H and W read for each other in the operator's geometry: x's and the weight's H and W with the
  strides and paddings (all together: the operator reads NCHW as NCWH; or the weight's alone),
  the strides alone, the paddings alone, both, or the output size's window; the same in the
  gradient op only (d input and d weight ~1.4 off, right shapes, output exact); [h, w] reversed by
  onednn_conv2d in Python: the non-square cases (the square ones pass all of these), by values
  where the output is square, else by shape or oneDNN's error. In the op's InferShape, which eager
  runs skip: the static-shape cases. A module's [h, w] window reversed on its way to the operator:
  the non-square module test.
"""
import numpy as np
import paddle
import pytest

from ppmoco.engine.env import RunEnv
from ppmoco.engine.step import conv_implementation, conv_precision
from ppmoco.errors import ConfigError
from ppmoco.ops import OpBuildError, computes, conv, onednn_conv2d, onednn_convolutions

from optional_deps import bfloat16_units_or_skip

CASES = {  # name: (x shape, weight shape, stride, padding), ResNet-50's and the CIFAR stem's
    "stem_7x7_s2_224px": ((2, 3, 224, 224), (64, 3, 7, 7), 2, 3),
    "1x1_64_to_256": ((2, 64, 56, 56), (256, 64, 1, 1), 1, 0),
    "3x3_s1_128ch_28px": ((2, 128, 28, 28), (128, 128, 3, 3), 1, 1),
    "3x3_s2_128ch_56px": ((2, 128, 56, 56), (128, 128, 3, 3), 2, 1),
    "1x1_s2_downsample": ((2, 256, 56, 56), (512, 256, 1, 1), 2, 0),
    "cifar_stem_3x3_32px": ((4, 3, 32, 32), (64, 3, 3, 3), 1, 1),
    # Non-square inputs, kernels, strides and paddings ([h, w]), so that reading H for W anywhere in
    # the operator's geometry fails. The first two give square outputs from inputs that are not: the
    # operator with H and W swapped throughout computes outputs of the right shape and wrong values.
    "3x1_s2x1_p1x0_15x8px": ((2, 16, 15, 8), (32, 16, 3, 1), (2, 1), (1, 0)),
    "1x5_s1x2_p0x2_6x11px": ((2, 8, 6, 11), (16, 8, 1, 5), (1, 2), (0, 2)),
    "5x3_s2x3_p2x1_17x10px": ((3, 4, 17, 10), (8, 4, 5, 3), (2, 3), (2, 1)),
}


def _relative(got, want):
    return float(np.linalg.norm(got.astype("float64") - want) / np.linalg.norm(want))


def _forward_and_grads(fn, x, w, dout):
    x, w = paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(w, stop_gradient=False)
    out = fn(x, w)
    dx, dw = paddle.grad(out, [x, w], grad_outputs=paddle.to_tensor(dout))
    return out.numpy(), dx.numpy(), dw.numpy()


def _pair(value):
    return list(value) if isinstance(value, tuple) else [value, value]


def _case(name, seed):
    """Random float32 x, w (scaled as ResNets initialise) and d out for case `name`, its stride and
    padding as [h, w]."""
    x_shape, w_shape, stride, padding = CASES[name]
    stride, padding = _pair(stride), _pair(padding)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype("float32")
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype("float32")
    out_size = [(x_shape[2 + i] + 2 * padding[i] - w_shape[2 + i]) // stride[i] + 1 for i in (0, 1)]
    dout = rng.standard_normal((x_shape[0], w_shape[0], *out_size)).astype("float32")
    return x, w, dout, stride, padding


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_equal_paddle_conv2d(name):
    x, w, dout, stride, padding = _case(name, seed=0)

    got = _forward_and_grads(lambda a, b: onednn_conv2d(a, b, stride, padding), x, w, dout)
    want = _forward_and_grads(lambda a, b: paddle.nn.functional.conv2d(a, b, stride=stride, padding=padding),
                              x.astype("float64"), w.astype("float64"), dout.astype("float64"))
    errors = {}
    for what, g, r in zip(("output", "d input", "d weight"), got, want):
        assert g.shape == r.shape, f"{name}: {what} shape {g.shape}, expected {r.shape}"
        assert g.dtype == np.float32
        errors[what] = _relative(g, r)
    assert max(errors.values()) < 1e-5, f"{name}: relative errors {errors}"


@pytest.mark.parametrize("name", list(CASES))
def test_the_operators_static_shape_is_paddle_conv2ds(name):
    """The output shape the operator declares to a static program (its InferShape, which eager runs
    skip) is conv2d's, the batch left open. Catches: H and W read for each other there."""
    x_shape, w_shape, stride, padding = CASES[name]
    stride, padding = _pair(stride), _pair(padding)
    main, startup = paddle.static.Program(), paddle.static.Program()
    paddle.enable_static()
    try:
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("x", [-1, *x_shape[1:]], "float32")
            w = paddle.static.data("w", list(w_shape), "float32")
            got = list(onednn_conv2d(x, w, stride, padding).shape)
            want = list(paddle.nn.functional.conv2d(x, w, stride=stride, padding=padding).shape)
    finally:
        paddle.disable_static()
    assert got == want, f"{name}: static shape {got}, expected {want}"


def to_bfloat16(a):
    """float32 `a` rounded to the nearest bfloat16 (ties to even), as oneDNN's reorders round, in float64."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32).astype("float64")


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_forward_and_gradients_equal_float64_on_the_rounded_inputs(name):
    # With bf16 the operator rounds x, w and d out to bfloat16 and accumulates in float32: it must
    # equal float64 arithmetic on the rounded values to float32 accumulation, 1e-5, while the
    # unrounded values give results ~1e-3 away. Catches: the attribute ignored (float32 compute),
    # or a result, d input or d weight, rounded to bfloat16 too (~1e-3 off).
    bfloat16_units_or_skip()
    x, w, dout, stride, padding = _case(name, seed=1)

    def conv64(a, b):
        return paddle.nn.functional.conv2d(a, b, stride=stride, padding=padding)

    got = _forward_and_grads(lambda a, b: onednn_conv2d(a, b, stride, padding, bfloat16=True), x, w, dout)
    want = _forward_and_grads(conv64, to_bfloat16(x), to_bfloat16(w), to_bfloat16(dout))
    unrounded = _forward_and_grads(conv64, x.astype("float64"), w.astype("float64"), dout.astype("float64"))
    errors = {}
    for what, g, r, u in zip(("output", "d input", "d weight"), got, want, unrounded):
        assert g.shape == r.shape and g.dtype == np.float32
        errors[what] = _relative(g, r)
        assert _relative(g, u) > 1e-4, f"{name}: {what} is float32's, not bfloat16's"
    assert max(errors.values()) < 1e-5, f"{name}: relative errors {errors}"


def test_convolutions_of_a_module_run_on_the_operator_within_the_context_only(monkeypatch):
    """Eligible convolutions switch to the operator and back; the rest, and the state, stay Paddle's."""
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, stride=2, padding=1, bias_attr=False),
                               paddle.nn.Conv2D(8, 8, 3, padding=1, groups=2, bias_attr=False),
                               paddle.nn.Conv2D(8, 4, 1))
    assert [computes(layer) for layer in net] == [True, False, False]
    keys = list(net.state_dict())
    x = paddle.randn([2, 3, 9, 9])
    expected = net(x).numpy()
    calls = []
    monkeypatch.setattr(conv, "onednn_conv2d", lambda *args: calls.append(args) or onednn_conv2d(*args))
    with onednn_convolutions(net):
        got = net(x).numpy()
    assert len(calls) == 1 and calls[0][2:] == ([2, 2], [1, 1], False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    net(x)
    assert len(calls) == 1, "the operator ran after the context"
    with onednn_convolutions(net, bfloat16=True):
        net(x)
    assert len(calls) == 2 and calls[1][2:] == ([2, 2], [1, 1], True)
    assert list(net.state_dict()) == keys


def test_a_non_square_convolution_of_a_module_runs_with_its_h_w_window(monkeypatch):
    """A layer's stride and padding reach the operator as [h, w]. Catches: the layer's window read
    reversed (conv2d_settings, onednn_convolutions), which the operator computes without error here."""
    layer = paddle.nn.Conv2D(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), bias_attr=False)
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((2, 4, 15, 8)).astype("float32"))
    expected = layer(x).numpy()
    assert expected.shape == (2, 6, 8, 8)
    calls = []
    monkeypatch.setattr(conv, "onednn_conv2d", lambda *args: calls.append(args) or onednn_conv2d(*args))
    with onednn_convolutions(layer):
        got = layer(x).numpy()
    assert len(calls) == 1 and calls[0][2:] == ([2, 1], [1, 0], False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_missing_compiler_or_missing_headers_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(OpBuildError, match="needs a C[+][+] compiler .'no-such-compiler' not found.: install g[+][+]"):
        conv.onednn_conv_module.__wrapped__()  # uncached: the process's loaded module stays
    monkeypatch.setattr(conv, "_paddle_dir", lambda: str(tmp_path))
    monkeypatch.setattr(conv.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(conv.sys, "prefix", str(tmp_path))
    with pytest.raises(OpBuildError, match="oneDNN's C[+][+] headers.*pip install --no-deps onednn-devel=="):
        conv.onednn_include_dir()


@pytest.mark.parametrize("setting,device,builds,expected", [
    ("auto", "cpu", True, "onednn"), ("onednn", "cpu", True, "onednn"), ("paddle", "cpu", True, "paddle"),
    ("auto", "cpu", False, "paddle"), ("onednn", "cpu", False, ConfigError),
    ("auto", "gpu", True, "paddle"), ("onednn", "gpu", True, "paddle")])
def test_engine_conv_setting(monkeypatch, setting, device, builds, expected):
    """Engine.conv: auto falls back to Paddle's convolution where the operator cannot be built, onednn
    makes that an error, and GPUs always run Paddle's."""
    def module():
        if not builds:
            raise OpBuildError("no compiler")
    monkeypatch.setattr("ppmoco.engine.step.onednn_conv_module", module)
    env = RunEnv(device, 1, 0, 1, 1)
    if expected is ConfigError:
        with pytest.raises(ConfigError, match="Engine.conv: onednn: no compiler; or set Engine.conv: paddle"):
            conv_implementation(setting, env)
    else:
        assert conv_implementation(setting, env) == expected


@pytest.mark.parametrize("enable, dtype, device, impl, flags, expected", [
    (False, "bfloat16", "cpu", "onednn", ["amx_bf16"], "float32"),
    (True, "float16", "cpu", "onednn", ["amx_bf16"], "float32"),
    (True, "bfloat16", "gpu", "paddle", [], "float32"),  # autocast's, on GPU
    (True, "bfloat16", "cpu", "onednn", ["avx512_bf16"], "bfloat16"),
    (True, "bfloat16", "cpu", "onednn", ["avx2", "avx512f"], "AVX512-BF16 or AMX-BF16 units, which this CPU"),
    (True, "bfloat16", "cpu", "paddle", ["amx_bf16"], "set Engine.conv=auto or onednn"),
])
def test_bfloat16_on_cpu_means_the_operators_convolutions(monkeypatch, enable, dtype, device, impl, flags, expected):
    """Engine.mix_precision bfloat16 on CPU computes the convolutions in bfloat16, where they run on
    the operator and the CPU has bfloat16 units; elsewhere a one-line error."""
    monkeypatch.setattr("ppmoco.engine.step.cpu_info", lambda: {"model": "Test CPU", "flags": flags})
    amp = {"enable": enable, "dtype": dtype, "level": "O1"}
    if expected in ("float32", "bfloat16"):
        assert conv_precision(amp, RunEnv(device, 1, 0, 1, 1), impl) == expected
    else:
        with pytest.raises(ConfigError, match=f"Engine.mix_precision: bfloat16 on CPU .*{expected}"):
            conv_precision(amp, RunEnv(device, 1, 0, 1, 1), impl)
