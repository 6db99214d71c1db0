"""ppmoco.safe_pickle: every kind of weights file loads exactly as paddle.load loads it, and files that
ask for anything else are refused before any of it runs.

Each test names the mutation of ppmoco/safe_pickle.py it catches. The end-to-end refusals through
the tools (pretrained, resume, evaluation, conversion) are in tests/faults/test_malicious_pickles.py.
"""
import builtins
import codecs
import collections
import os
import pickle
import warnings

import numpy as np
import paddle
import pytest

from ppmoco import safe_pickle
from ppmoco.errors import CheckpointError
from ppmoco.modules.moco import MoCo

from pickle_payloads import Eval, Exec, Popen, System


def assert_same(expected, got, where="file"):
    """Same structure, container and leaf types, values, dtypes and Tensor names."""
    assert type(got) is type(expected), f"{where}: {type(got)} vs {type(expected)}"
    if isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            assert_same(expected[key], got[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, paddle.Tensor):
        # a Tensor saved without a name table gets a fresh generated name on every load
        assert got.name == expected.name or expected.name.startswith("generated_tensor"), where
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        np.testing.assert_array_equal(got.numpy(), expected.numpy(), err_msg=where)
    elif isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        np.testing.assert_array_equal(got, expected, err_msg=where)
    else:
        assert got == expected or (got != got and expected != expected), where


def paddle_load(path, return_numpy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 2 warns on numpy.core names in old files
        return paddle.load(str(path), return_numpy=return_numpy)


def _trained_optimizer(opt_class, **kwargs):
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Flatten(),
                               paddle.nn.Linear(64, 2))
    opt = opt_class(parameters=net.parameters(), **kwargs)
    for _ in range(3):
        net(paddle.randn([2, 3, 6, 6])).mean().backward()
        opt.step()
        opt.clear_grad()
        if isinstance(opt._learning_rate, paddle.optimizer.lr.LRScheduler):
            opt._learning_rate.step()
    return opt.state_dict()


def _resnet50():
    paddle.seed(0)
    return paddle.vision.models.resnet50().state_dict()


def _moco():
    paddle.seed(0)
    return MoCo(base_encoder={"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True},
                projector={"hidden_dim": 16}, dim=8, K=16).state_dict()


def _fleetx():
    # FleetX's engine saves model.state_dict() of its MoCo: the backbone under base_encoder.0.
    paddle.seed(0)
    backbone = paddle.vision.models.resnet18(num_classes=0).state_dict()
    return {**{f"base_encoder.0.{k}": v for k, v in backbone.items()}, "queue": paddle.randn([8, 16]),
            "queue_ptr": paddle.zeros([1], "int64")}


def _passl():
    # PASSL's checkpoint hook pickle.dump()s numpy arrays (Tensors converted), epoch, optimizer and
    # LR scheduler state; numpy scalars, big-endian and Fortran-ordered arrays for good measure.
    state = {k: v.numpy() for k, v in _moco().items()}
    optimizer = {k: v.numpy() if isinstance(v, paddle.Tensor) else v
                 for k, v in _trained_optimizer(paddle.optimizer.Momentum, momentum=0.9, learning_rate=0.1).items()}
    return {"epoch": 200, "state_dict": state, "optimizer": optimizer,
            "lr_sheduer": {"last_epoch": 199, "last_lr": np.float64(0.03), "half": np.float16(0.5)},
            "big_endian": np.arange(6, dtype=">f4").reshape(2, 3), "fortran": np.asfortranarray(np.ones((2, 3))),
            "flags": np.array([True, False]), "names": np.array(["a", "bc"]), "raw": np.array([b"x"]),
            "complex": np.complex64(1 + 2j), "nested": [(1, 2.5, None, "s")],
            "ordered": collections.OrderedDict(a=np.int64(3))}


def _nested_tensors():
    # Tensors outside a flat state dict: paddle.save writes tuple((name, array)) for each
    with paddle.no_grad():
        return {"epoch": 3, "state_dict": paddle.nn.Linear(2, 3).state_dict(), "list": [paddle.ones([2])]}


KEEP = []  # the DenseTensor below shares the Tensor's memory: the Tensor must outlive the save


def _dense_tensor():
    # paddle.save of a DenseTensor (LoDTensor in Paddle 2.x) writes eval("data", {"data": array})
    KEEP.append(paddle.arange(4, dtype="float32"))
    return {"dense": [KEEP[-1].value().get_tensor()], "epoch": 1}


def _paddle_save(make, protocol=4):
    def write(path):
        paddle.save(make(), str(path), protocol=protocol)
    return write


def _pickle_dump(make, protocol):
    def write(path):
        with open(path, "wb") as f:
            pickle.dump(make(), f, protocol=protocol)
    return write


def _numpy1(path):
    # numpy 1.x names the reconstructors numpy.core.*; a protocol-2 file spells globals out as text
    paddle.save(_moco(), str(path), protocol=2)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _split_tensor(path):
    # paddle.save (protocol 2/3) splits tensors over 1 GiB into parts listed under this key
    whole = np.arange(12, dtype="float32")
    state = {"w@@.0": whole[:5], "w@@.1": whole[5:], "b": np.ones(2, "float32"),
             "UnpackBigParamInfor@@": {"w": {"OriginShape": (3, 4), "slices": ["w@@.0", "w@@.1"]}},
             "StructuredToParameterName@@": {"w": "linear_0.w_0", "b": "linear_0.b_0"}}
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=2)


LEGIT = {
    "resnet50": _paddle_save(_resnet50),
    "moco_module": _paddle_save(_moco),
    "moco_module_protocol2": _paddle_save(_moco, protocol=2),
    "momentum_cosine": _paddle_save(lambda: _trained_optimizer(
        paddle.optimizer.Momentum, momentum=0.9, weight_decay=1e-4,
        learning_rate=paddle.optimizer.lr.CosineAnnealingDecay(0.1, 10))),
    "adamw_warmup_protocol3": _paddle_save(lambda: _trained_optimizer(
        paddle.optimizer.AdamW, learning_rate=paddle.optimizer.lr.LinearWarmup(0.1, 3, 0.0, 0.1)), protocol=3),
    "fleetx": _paddle_save(_fleetx),
    "passl_protocol2": _pickle_dump(_passl, 2),
    "passl_protocol4": _pickle_dump(_passl, 4),
    "passl_protocol5": _pickle_dump(_passl, 5),  # pickle.dump's default from Python 3.14
    "nested_tensors": _paddle_save(_nested_tensors),
    "nested_tensors_protocol2": _paddle_save(_nested_tensors, protocol=2),
    "dense_tensor": _paddle_save(_dense_tensor),
    "dense_tensor_protocol2": _paddle_save(_dense_tensor, protocol=2),
    "numpy1_names": _numpy1,
    "split_tensor": _split_tensor,
}


# Catches: a global these files need missing from ALLOWED (or its stand-in rejecting the arguments
# numpy/Paddle write), a BUILD check rejecting a real array or dtype state (big-endian, Fortran,
# strings), and load_paddle's post-processing drifting from paddle.load (name table kept, split
# tensors not joined, arrays not turned into Tensors, Tensor names lost).
@pytest.mark.parametrize("kind", LEGIT)
def test_every_weights_file_kind_loads_as_paddle_load_does(tmp_path, kind):
    path = tmp_path / f"{kind}.pdparams"
    LEGIT[kind](path)
    # PASSL's files hold string arrays, which paddle.load cannot make Tensors of: read as numpy only
    # (as Model.model.base_encoder.pretrained reads every file)
    for return_numpy in (True,) if kind.startswith("passl") else (False, True):
        assert_same(paddle_load(path, return_numpy), safe_pickle.load_paddle(str(path), return_numpy=return_numpy))


# Catches: load() changing what it returns (arrays must stay numpy arrays; no paddle import needed).
def test_load_returns_numpy_arrays_as_pickled(tmp_path):
    path = tmp_path / "passl.pkl"
    _pickle_dump(_passl, 4)(path)
    with open(path, "rb") as f:
        expected = pickle.load(f)
    assert_same(expected, safe_pickle.load(str(path)))


# ---- refused files -------------------------------------------------------------------------------
MARKER = "ran"  # what a payload would create in the test's folder


class EvalDataShape(System):
    """Paddle's eval("data", {"data": ...}) shape with code where the array belongs."""

    def __reduce__(self):
        return builtins.eval, ("data", {"data": System(self.marker)})


class Codec(System):
    """An admitted function (_codecs.encode) called with an encoding Paddle never writes."""

    def __reduce__(self):
        return codecs.encode, ("payload", "rot13")


class BadDtypeState:
    """numpy.dtype (admitted) given a state claiming Python objects: BUILD must refuse it."""

    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 63)


def _state_dict_with(payload):
    return {"conv1.weight": np.ones((4, 3, 3, 3), "float32"), "conv1.bias": np.zeros(4, "float32"),
            "bn._mean": payload, "StructuredToParameterName@@": {"conv1.weight": "conv2d_0.w_0"}}


EVIL = {  # name: (object to pickle given the marker path, what the error must name)
    "os_system": (lambda m: System(m), "posix.system"),
    "hidden_in_state_dict": (lambda m: _state_dict_with(System(m)), "posix.system"),
    "builtins_eval": (lambda m: {"w": Eval(m)}, "builtins.eval(\"__import__('os')"),
    "eval_in_paddles_shape": (lambda m: [EvalDataShape(m)], "posix.system"),
    "builtins_exec": (lambda m: Exec(m), "builtins.exec"),
    "subprocess_popen": (lambda m: (np.zeros(2), Popen(m)), "subprocess.Popen"),
    "object_array_with_callable": (lambda m: {"w": np.array([System(m), os.system], dtype=object)},
                                   "Python objects (dtype object)"),
    "object_array_of_numbers": (lambda m: {"w": np.array([1, 2], dtype=object)}, "Python objects (dtype object)"),
    "codec_other_than_latin1": (lambda m: Codec(m), "_codecs.encode('payload', 'rot13')"),
    "dtype_state_with_objects": (lambda m: BadDtypeState(), "sets the state of dtype float64"),
}


# Catches: find_class falling back to pickle's (imports anything), the allow-list admitting
# builtins/os/subprocess, the eval stand-in evaluating (or accepting anything but an array in
# Paddle's shape), the dtype stand-in admitting object dtypes (an object array's elements are
# rebuilt by calling their reducers), an admitted function accepting any arguments, and BUILD
# accepting any state. Protocols 2 (GLOBAL text, __builtin__ names) and 4 (STACK_GLOBAL).
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("kind", EVIL)
def test_files_asking_for_more_are_refused_before_anything_runs(tmp_path, kind, protocol):
    make, named = EVIL[kind]
    marker = tmp_path / MARKER
    path = tmp_path / "evil.pdparams"
    with open(path, "wb") as f:
        pickle.dump(make(str(marker)), f, protocol=protocol)
    with pytest.raises(CheckpointError) as err:
        safe_pickle.load_paddle(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: refusing to load: ") and "\n" not in message, message
    # protocol 2 writes Python 2's names: __builtin__.exec, commands.Popen (pickle's fix_imports)
    python2 = named.replace("builtins.exec", "__builtin__.exec").replace("subprocess.", "commands.")
    assert named in message or (protocol == 2 and python2 in message), message
    assert "only arrays, numbers, strings and containers are loaded" in message
    assert not marker.exists()


# Catches: BUILD falling back to pickle's (which sets attributes of, or calls __setstate__ on, any
# object: here an admitted OrderedDict), and the result check admitting callables as values.
@pytest.mark.parametrize("data, named", [
    # OrderedDict() then BUILD with a state: pickle would set attributes on it
    (b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb.", "sets the state of a OrderedDict"),
    # an admitted function as a value (never called): not data
    (b"\x80\x02}X\x01\x00\x00\x00fc_codecs\nencode\ns.", "holds a builtins.method, not data"),
    # protocol 0/1 instantiation by name
    (b"(i__main__\nThing\n.", "creates an object by class name"),
])
def test_opcodes_that_modify_objects_are_checked_too(tmp_path, data, named):
    path = tmp_path / "odd.pdparams"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"refusing to load: it {named}" if named.startswith(("sets", "creates"))
                       else named):
        safe_pickle.load(str(path))


# Catches: a damaged or foreign file escaping as a raw pickle/numpy exception (a traceback) instead
# of one line naming it; and unbounded recursion on deeply nested containers.
@pytest.mark.parametrize("data", [b"not a checkpoint", b"\x80\x04\x95\x10\x00", b"",
                                  b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."],
                         ids=["text", "truncated", "empty", "deeply_nested"])
def test_unreadable_files_are_one_line_errors(tmp_path, data):
    path = tmp_path / "junk.pdparams"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"^cannot read {path}: ") as err:
        safe_pickle.load_paddle(str(path))
    assert "\n" not in str(err.value)


def test_truncated_real_file_is_unreadable_not_refused(tmp_path):
    path = tmp_path / "cut.pdparams"
    paddle.save(paddle.nn.Linear(4, 4).state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=f"^cannot read {path}: "):
        safe_pickle.load_paddle(str(path))
