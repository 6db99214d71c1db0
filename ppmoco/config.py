"""YAML configs with `_base_` inheritance, `-o a.b.c=value` overrides and strict validation.

Sections and keys follow PaddleFleetX (Global / Engine / Model / Optimizer / Data / Distributed),
plus Eval (the evaluation protocol).
Every key is checked against SCHEMA below: an unknown key or a wrongly typed value is a one-line
ConfigError naming the key and the closest valid one. Subtrees marked OPEN hold the arguments of a
registered builder (module, dataset, lr schedule); those builders check them against their own
signatures when they are built, before anything is written.

Values are typed by YAML, never by Python `eval`; `1e-3` is a float (YAML 1.1 would say string).
"""
import copy
import difflib
import os
import re

import yaml

from ppmoco.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` and `5E4` as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text):
    """Type a command-line value the way YAML types it in a file."""
    return yaml.load(text, Loader=_Loader)


class OPEN:
    """Schema marker: a mapping whose keys are checked later by the builder that consumes it."""


class Choice(tuple):
    """Schema marker: one of the listed strings; the first is the default."""


_LOADER = {"num_workers": 0, "use_shared_memory": True}
_SAMPLER = {"name": "DistributedBatchSampler", "batch_size": 32, "drop_last": True, "shuffle": True}

SCHEMA = {
    "Global": {
        "device": Choice(("auto", "cpu", "gpu")),
        "seed": 2022,
        "num_threads": 0,          # CPU threads per process; 0 = cores / local processes
    },
    "Engine": {
        "num_train_epochs": 1,
        "max_steps": -1,           # > 0 stops early after this many optimizer steps in total
        "logging_freq": 10,
        "eval_freq": -1,           # validate every N epochs; -1 never
        "mix_precision": {
            "enable": False,
            "dtype": Choice(("float16", "bfloat16")),
            "level": Choice(("O1", "O2")),
            "scale_loss": 32768.0,
            "custom_black_list": [],
            "custom_white_list": [],
        },
        "save_load": {
            "output_dir": "./output",
            "save_epoch": 1,       # checkpoint every N epochs; <= 0 never
            "save_steps": -1,      # also every N steps inside an epoch; <= 0 never
            "ckpt_dir": None,      # resume from this checkpoint directory
            "keep_last": 3,        # rotate old checkpoints; <= 0 keeps all
            "auto_resume": False,  # resume from output_dir/latest when it exists
        },
    },
    "Model": {
        "module": "",
        "model": OPEN,
    },
    "Optimizer": {
        "name": Choice(("Momentum",)),
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "lr": OPEN,
    },
    "Data": {
        "Train": {"dataset": OPEN, "sampler": dict(_SAMPLER), "loader": dict(_LOADER)},
        "Eval": {"dataset": OPEN, "sampler": dict(_SAMPLER, batch_size=64, drop_last=False,
                                                  shuffle=False),
                 "loader": dict(_LOADER)},
    },
    "Eval": {
        "protocol": Choice(("linear", "knn")),  # linear: the module's classifier; knn: backbone features
        "knn": {
            "ks": [10, 20, 100, 200],
            "temperature": 0.07,
            "chunk_size": 256,     # evaluation rows per similarity block (bounds memory)
        },
    },
    "Distributed": {
        "dp_degree": None,         # must equal the number of processes when given
    },
}

# Sections a config may set to null (absent): no evaluation data, for instance.
NULLABLE = {"Data.Eval", "Engine.save_load.ckpt_dir", "Distributed.dp_degree"}


def _read_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}; check the -c path")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def merge(base, override):
    """Deep-merge two config trees: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_bases(path, chain=()):
    path = os.path.abspath(path)
    if path in chain:
        cycle = " -> ".join(os.path.relpath(p) for p in (*chain, path))
        raise ConfigError(f"_base_ cycle: {cycle}; remove one of these _base_ entries")
    data = _read_yaml(path)
    bases = data.pop("_base_", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        merged = merge(merged, _load_with_bases(base_path, (*chain, path)))
    return merge(merged, data)


def set_by_path(tree, dotted, value):
    """Set `a.b.0.c` in a nested dict/list tree; list indices are path segments."""
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys):
        here = ".".join(keys[:depth + 1])
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                raise ConfigError(f"-o {dotted}: '{here}' needs a list index in [0, {len(node)})")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"-o {dotted}: '{'.'.join(keys[:depth])}' is a value, not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]


def parse_override(text):
    if "=" not in text:
        raise ConfigError(f"-o {text}: expected key.path=value")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def _type_name(v):
    return type(v).__name__


def _check_leaf(key, value, default):
    if isinstance(default, Choice):
        if value not in default:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(default)}")
    elif default is None or value is None:
        return
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {_type_name(value)} {value!r}")
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) if isinstance(default, float) else isinstance(value, int)
        if not ok or isinstance(value, bool):
            raise ConfigError(f"{key}: expected {_type_name(default)}, got {_type_name(value)} {value!r}")
    elif not isinstance(value, type(default)):
        raise ConfigError(f"{key}: expected {_type_name(default)}, got {_type_name(value)} {value!r}")


def _validate(tree, schema, prefix):
    """Fill defaults from `schema` into `tree` and reject unknown keys or wrong types."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in schema:
            match = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.4)
            hint = f"; did you mean '{prefix}{match[0]}'?" if match else ""
            raise ConfigError(f"{path}: unknown key{hint} (valid here: {', '.join(schema)})")
        sub = schema[key]
        if value is None and path in NULLABLE:
            out[key] = None
        elif sub is OPEN:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping, got {_type_name(value)} {value!r}")
            out[key] = value
        elif isinstance(sub, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a section (mapping), got {_type_name(value)}")
            out[key] = _validate(value, sub, path + ".")
        else:
            _check_leaf(path, value, sub)
            out[key] = value
    for key, sub in schema.items():
        if key not in out:
            if sub is OPEN:
                out[key] = {}
            elif isinstance(sub, dict):
                out[key] = _validate({}, sub, f"{prefix}{key}.")
            else:
                out[key] = sub[0] if isinstance(sub, Choice) else copy.deepcopy(sub)
    return out


def load_config(path, overrides=()):
    """Read `path` with its `_base_` chain, apply `-o` overrides, validate and fill defaults."""
    tree = _load_with_bases(path)
    for text in overrides:
        key, value = parse_override(text)
        set_by_path(tree, key, value)
    cfg = _validate(tree, SCHEMA, "")
    if not cfg["Model"]["module"]:
        raise ConfigError("Model.module: missing; name the method, e.g. MOCOModule or MOCOClsModule")
    return cfg


def dump_config(cfg, path):
    """Write the resolved config (what actually ran) next to the run's outputs."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
