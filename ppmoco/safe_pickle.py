"""Read pickle files (`.pdparams`, `.pdopt`, old `trainer_state.pkl`) without running code from them.

A pickle is a program: `pickle.load` (and `paddle.load`, which calls it) imports and calls whatever
the file names, so a downloaded "weights" file can run `os.system`. The unpickler here admits only
what weights files hold: numpy arrays and scalars of numbers or strings, numbers, strings, bytes,
dicts, lists and tuples. Every global a file may name is replaced by a small function that accepts
only the arguments numpy, Paddle or pickle itself write (`ALLOWED` says which file kind needs which),
so nothing else is ever imported or called; a file asking for more is refused with a one-line
CheckpointError naming the file and what it asked for.

The pure-Python unpickler is used (as fast here: the time goes into copying the arrays' bytes)
because it lets the BUILD opcode be checked too: it calls `__setstate__` on, or sets attributes of,
whatever object is on the stack, and is admitted only for arrays and dtypes, with the exact state
numpy writes for them.

`load` returns the unpickled objects as they are (arrays as numpy arrays); `load_paddle` then does
what `paddle.load` does after unpickling (reassembles split tensors, drops the name table, turns
arrays into Tensors unless `return_numpy`), so it can stand in for `paddle.load` on such files.
"""
import collections
import io
import pickle

import numpy as np

from ppmoco.errors import CheckpointError

# Kinds of array and scalar dtype admitted: booleans, integers, floats, complex numbers, bytes and
# text. Never "O" (Python objects: the unpickler would build each element, i.e. run code), nor
# records, sub-arrays, datetimes or void.
_ARRAY_KINDS = "biufcSU"
_NAME_TABLE = "StructuredToParameterName@@"  # paddle.save's {structured name: Paddle tensor name}
_SPLIT_TABLE = "UnpackBigParamInfor@@"  # (sic) paddle.save (protocol 2/3) splits tensors over 1 GiB
_SHOWN = 60  # characters of a refused argument shown in the error


class _Refused(Exception):
    """What the file asked for that is not admitted, as a phrase ("it asks to run posix.system")."""


class _NdarrayClass:
    """Stands for `numpy.ndarray` where a file names it: as `_reconstruct`'s first argument (the
    only place numpy writes it), never as something to call."""

    __slots__ = ()

    def __repr__(self):
        return "numpy.ndarray"


_NDARRAY = _NdarrayClass()

# (module, name) a file may ask for -> the method of _Unpickler that replaces it. Why each is there:
ALLOWED = {
    # numpy arrays, in every file kind (.pdparams, .pdopt, FleetX/PASSL weights, trainer_state.pkl):
    # numpy >= 2 writes numpy._core, numpy 1.x numpy.core; protocol 5 (pickle.dump's default from
    # Python 3.14) writes _frombuffer instead of _reconstruct + ndarray.__setstate__.
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.numeric", "_frombuffer"): "_frombuffer",
    ("numpy.core.numeric", "_frombuffer"): "_frombuffer",
    ("numpy", "ndarray"): None,  # _reconstruct's first argument only: find_class gives _NDARRAY
    ("numpy", "dtype"): "_dtype",
    # numpy scalars (np.float32(0.1)): LR scheduler states and PASSL/FleetX metadata computed with numpy
    ("numpy._core.multiarray", "scalar"): "_scalar",
    ("numpy.core.multiarray", "scalar"): "_scalar",
    # bytes in protocol 2 (paddle.save(..., protocol=2), Paddle 1.x/2.0 static saves): the array data
    # is written as _codecs.encode(text, "latin1")
    ("_codecs", "encode"): "_encode",
    # paddle.save of a Tensor outside a flat state dict (nested dicts, optimizer master weights):
    # tuple((name, array)); protocol 2 names Python 3's builtins `__builtin__`
    ("builtins", "tuple"): "_tuple",
    ("__builtin__", "tuple"): "_tuple",
    # paddle.save of a DenseTensor (LoDTensor in Paddle 2.x): eval("data", {"data": array})
    ("builtins", "eval"): "_eval_data",
    ("__builtin__", "eval"): "_eval_data",
    # Layer.state_dict() is an OrderedDict: kept as such when saved inside another dict
    # ({"epoch": ..., "state_dict": ...}); paddle.save flattens only a top-level state dict
    ("collections", "OrderedDict"): "_ordered_dict",
}


def _short(value):
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _check_dtype(dtype, where):
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"it gives {where} a {type(dtype).__name__} where numpy writes a dtype")
    if dtype.hasobject:
        raise _Refused(f"it asks for {where} of Python objects (dtype {dtype}), whose elements can carry code")
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"it asks for {where} of dtype {dtype}, which weights files do not hold")
    return dtype


def _plain_dtype_state(dtype, endian):
    """The state numpy writes for `dtype` with byte order `endian`: the only one BUILD may set."""
    if endian in ("<", ">"):
        dtype = dtype.newbyteorder(endian)
    return dtype.__reduce__()[2]


class _Unpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, extra):
        super().__init__(file, encoding="latin1")  # as paddle.load: Python 2 pickles' str data as bytes
        self._extra = dict(extra)
        self._types = tuple(self._extra.values())
        self._functions = {name: getattr(self, name) for name in set(ALLOWED.values()) if name}
        self._callables = list(self._functions.values()) + list(self._types)

    # ---- globals -----------------------------------------------------------------------------
    def find_class(self, module, name):
        if (module, name) in self._extra:
            return self._extra[module, name]
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) in ALLOWED:
            return self._functions[ALLOWED[module, name]]
        raise _Refused(f"it asks to run {module}.{name} (a pickle can execute code)")

    def _reconstruct(self, subtype, shape, typecode):
        # numpy's ndarray.__reduce__: _reconstruct(ndarray, (0,), b"b"), then __setstate__ (BUILD)
        if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
            raise _Refused(f"it calls numpy _reconstruct{_short((subtype, shape, typecode))}, which numpy "
                           "never writes")
        return np.ndarray((0,), np.int8)

    def _frombuffer(self, buf, dtype, shape, order, axis_order=None):
        _check_dtype(dtype, "an array")
        if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F") or axis_order is not None \
                or not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise _Refused(f"it calls numpy _frombuffer with {_short((type(buf), shape, order, axis_order))}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)

    def _dtype(self, spec, align=False, copy=True):
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if not isinstance(spec, str) or not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int)):
            raise _Refused(f"it calls numpy.dtype{_short((spec, align, copy))}")
        try:
            dtype = np.dtype(spec, align=bool(align), copy=True)  # a copy: BUILD must not alter numpy's own
        except TypeError as err:
            raise _Refused(f"it asks for numpy.dtype({_short(spec)}): {err}") from None
        return _check_dtype(dtype, "an array")

    def _scalar(self, dtype, data):
        _check_dtype(dtype, "a scalar")
        if isinstance(data, str):
            data = data.encode("latin1")
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise _Refused(f"it calls numpy scalar({dtype}, {_short(data)})")
        return np.frombuffer(data, dtype=dtype, count=1)[0]

    def _encode(self, text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused(f"it calls _codecs.encode{_short((text, encoding))}")
        return text.encode("latin1")

    def _tuple(self, items=()):
        if type(items) not in (tuple, list):
            raise _Refused(f"it calls tuple({_short(items)})")
        return tuple(items)

    def _eval_data(self, expression, namespace=None, local=None):
        # Paddle's reduce of a DenseTensor is eval("data", {"data": array}): the array, never an eval
        if expression != "data" or type(namespace) is not dict or list(namespace) != ["data"] \
                or type(namespace["data"]) is not np.ndarray or local is not None:
            raise _Refused(f"it asks to run builtins.eval({_short(expression)}, ...) (a pickle can execute code)")
        return namespace["data"]

    def _ordered_dict(self, *args):
        if args:  # OrderedDict.__reduce__ passes no arguments; items follow as SETITEMS
            raise _Refused(f"it calls collections.OrderedDict{_short(args)}")
        return collections.OrderedDict()

    # ---- opcodes that call or modify an object -----------------------------------------------
    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is allowed for allowed in self._callables) or type(args) is not tuple:
            raise _Refused(f"it calls {_short(func)}")
        self.stack[-1] = func(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in self._types:
            raise _Refused(f"it creates a {_short(cls)}")
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in self._types:
            raise _Refused(f"it creates a {_short(cls)}")
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_inst(self):  # protocol 0/1 instances: no weights file holds one
        raise _Refused("it creates an object by class name (protocol 0/1 INST)")

    def load_obj(self):
        raise _Refused("it creates an object by class (protocol 0/1 OBJ)")

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.ndarray:
            self._set_array_state(inst, state)
        elif isinstance(inst, np.dtype):
            endian = state[1] if type(state) is tuple and len(state) > 1 else None
            if state != _plain_dtype_state(inst, endian):
                raise _Refused(f"it sets the state of dtype {inst} to {_short(state)}, which numpy never writes")
            inst.__setstate__(state)
        elif type(inst) in self._types:
            inst.__setstate__(state)
        else:
            raise _Refused(f"it sets the state of a {type(inst).__name__}")

    def _set_array_state(self, array, state):
        # numpy's ndarray.__reduce__ state: (1, shape, dtype, is_fortran, raw bytes)
        if type(state) is not tuple or len(state) != 5:
            raise _Refused(f"it sets an array's state to {_short(state)}")
        version, shape, dtype, fortran, data = state
        _check_dtype(dtype, "an array")
        if version != 1 or not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) \
                or type(fortran) is not bool or not isinstance(data, (bytes, str)):
            raise _Refused(f"it sets an array's state to {_short(state)}")
        array.__setstate__(state)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.OBJ[0]] = load_obj
    dispatch[pickle.BUILD[0]] = load_build


_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray)


def _check_result(obj, types):
    """Everything in `obj` is plain data: containers of leaves, arrays and scalars, or `types`."""
    pending, seen = [obj], set()
    while pending:
        item = pending.pop()
        if type(item) in _LEAVES or id(item) in seen:
            continue
        seen.add(id(item))
        kind = type(item)
        if kind in (dict, collections.OrderedDict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif kind in (list, tuple):
            pending.extend(item)
        elif kind is np.ndarray or isinstance(item, np.generic):
            _check_dtype(item.dtype, "an array" if kind is np.ndarray else "a scalar")
        elif kind not in types:
            raise _Refused(f"it holds a {kind.__module__}.{kind.__qualname__}, not data")


def load(path, extra=None):
    """The objects pickled in the file `path`, built from admitted globals only.

    `extra` maps further (module, name) pairs to classes that stand in for them (each validating
    what `__setstate__` receives). Raises CheckpointError for a refused or unreadable file.
    """
    return _load(lambda: open(path, "rb"), path, extra)


def loads(data, name):
    """`load` for pickled bytes (e.g. a member of an archive), named `name` in errors."""
    return _load(lambda: io.BytesIO(data), name, None)


def _load(opener, path, extra):
    extra = extra or {}
    try:
        with opener() as f:
            obj = _Unpickler(f, extra).load()
        _check_result(obj, tuple(extra.values()))
        return obj
    except _Refused as refusal:
        raise CheckpointError(f"{path}: refusing to load: {refusal}; only arrays, numbers, strings and "
                              "containers are loaded") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # anything the bytes make pickle, numpy or a stand-in raise: damaged
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read {path}: {reason} (not a file paddle.save or pickle wrote, or "
                              "damaged)") from None


def load_paddle(path, return_numpy=False):
    """`paddle.load(path, return_numpy=...)` for a file paddle.save (or pickle) wrote, without its risk.

    As paddle.load: tensors split by protocol 2/3 are put together and the name table is dropped;
    arrays become Tensors (named as saved) unless `return_numpy`: in a flat state dict those the
    name table lists; else the (name, array) pairs Paddle writes for Tensors if there are any,
    otherwise every array.
    """
    try:
        return _as_paddle_load(load(path), return_numpy)
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: its containers nest too deeply") from None


def _as_paddle_load(obj, return_numpy):
    if isinstance(obj, dict):
        _join_split_tensors(obj)
        if _NAME_TABLE in obj:
            names = obj.pop(_NAME_TABLE)
            if not return_numpy:
                for key, name in names.items():
                    if isinstance(obj.get(key), np.ndarray):
                        obj[key] = _tensor(obj[key], name)
            return obj
    if _contains(obj, _is_named_array):
        return _convert(obj, _is_named_array, lambda pair: pair[1] if return_numpy else _tensor(pair[1], pair[0]))
    return _convert(obj, lambda o: isinstance(o, np.ndarray), lambda a: a if return_numpy else _tensor(a))


def _join_split_tensors(obj):
    split = obj.pop(_SPLIT_TABLE, None)
    for key, info in (split or {}).items():
        obj[key] = np.concatenate([obj.pop(part) for part in info["slices"]]).reshape(info["OriginShape"])


def _tensor(array, name=None):
    import paddle  # here only: reading weights as numpy needs no Paddle

    tensor = paddle.to_tensor(array)
    if name and getattr(tensor, "name", ""):
        tensor.name = name
    return tensor


def _is_named_array(obj):
    return type(obj) is tuple and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray)


def _contains(obj, test):
    if test(obj):
        return True
    if type(obj) in (dict, collections.OrderedDict):
        return any(_contains(v, test) for v in obj.values())
    if type(obj) in (list, tuple):
        return any(_contains(v, test) for v in obj)
    return False


def _convert(obj, test, convert):
    if test(obj):
        return convert(obj)
    if type(obj) in (dict, collections.OrderedDict):
        for key in list(obj):
            obj[key] = _convert(obj[key], test, convert)
    elif type(obj) is list:
        obj[:] = [_convert(v, test, convert) for v in obj]
    elif type(obj) is tuple:
        return tuple(_convert(v, test, convert) for v in obj)
    return obj
