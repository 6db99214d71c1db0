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
from ppmoco.feature_layers import LAYERS
from ppmoco.fileio import write_text_atomic
from ppmoco.optimizers import KEY_LIMITS as OPTIMIZER_KEY_LIMITS
from ppmoco.optimizers import OPTIMIZERS
from ppmoco.registry import is_number, type_ok


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


class ByName:
    """Schema marker: a section whose keys depend on its `name`: `variants` {name: {key: default}} (the
    first name is the default), `common` {key: default} for every name. A key of another variant is a
    one-line error naming the variants it belongs to; set to null, it is dropped (so `-o key=null`
    cancels one a `_base_` file set). A key of the section's own variant set to null takes its default."""

    def __init__(self, variants, common):
        self.variants, self.common = variants, common

    def schema(self, name):
        return {"name": Choice((name, *(n for n in self.variants if n != name))), **self.variants[name],
                **self.common}


_LOADER = {"num_workers": 0, "use_shared_memory": True}
_SAMPLER = {"name": "DistributedBatchSampler", "batch_size": 32, "drop_last": True, "shuffle": True}

SCHEMA = {
    "Global": {
        "device": Choice(("auto", "cpu", "gpu")),
        "seed": 2022,
        "num_threads": 0,          # CPU threads per process; 0 = cores / local processes
        # FleetX's batch keys. The per-process batch is Data.Train.sampler.batch_size (as in FleetX's
        # vision engine); these are checked against it: global = batch_size x processes, local =
        # batch_size (or 1, the placeholder of FleetX's vis/base.yaml), micro = local (no accumulation).
        # With Data.Train.sampler.batch_size null, global_batch_size is divided among the processes
        # (train_batch_size), so a job whose process count changes keeps its global batch.
        "global_batch_size": None,
        "local_batch_size": None,
        "micro_batch_size": None,
        "flags": OPEN,             # Paddle flags {FLAGS_name: value}, set before the model is built
    },
    "Engine": {
        "num_train_epochs": 1,
        "max_steps": -1,           # > 0 stops early after this many optimizer steps in total
        "logging_freq": 10,
        "eval_freq": -1,           # validate every N epochs; -1 never
        # Training runs eagerly on every device. auto: evaluation uses its checked CPU fast path
        # (Paddle Inference predictors on oneDNN) where it can; eager: never (plain eager evaluation).
        "execution": Choice(("auto", "eager", "static")),
        # The training step's convolutions on CPU. onednn: ppmoco's oneDNN operator (ppmoco/ops,
        # compiled at first use; needs g++ and oneDNN's headers), which keeps no buffers between
        # calls: the static step peaks at 0.4x the memory of Paddle's oneDNN convolution, and eager
        # steps run faster (docs/performance.md). paddle: Paddle's own. auto: onednn where it can
        # be built, else paddle with a warning. GPUs always run Paddle's; checkpoints are the same.
        "conv": Choice(("auto", "onednn", "paddle")),
        "run_mode": Choice(("epoch", "step")),  # FleetX's; ppmoco runs epochs (NOT_SUPPORTED)
        # FleetX's evaluation and test batch limits for run_mode step; like FleetX in run_mode epoch,
        # every evaluation sees the whole Data.Eval set, so they have no effect.
        "eval_iters": -1,
        "test_iters": -1,
        "accumulate_steps": 1,
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
        # A step whose loss (or update) is not finite stops the run with an error naming the step,
        # before anything poisoned is saved. true instead skips such steps: the weights, queue,
        # BN statistics and optimizer state are put back as they were before the step, the batch is
        # dropped and the step is counted in the log (costs one host sync and one on-device copy of
        # the training state per step).
        "skip_nonfinite_steps": False,
        # Seconds a training process may go without finishing a step (evaluations and checkpoint
        # writes excepted) before it ends the run saying where it is stuck; 0 never
        # (ppmoco/engine/watchdog.py). NCCL's own default limit; gloo (CPU) ends waiting ranks after 30 s.
        "hang_timeout": 1800.0,
    },
    "Model": {
        "module": "",
        "model": OPEN,
        # FleetX names the loss and the metric; ppmoco's modules compute exactly these: cross-entropy
        # (MoCo's InfoNCE, the linear classifier's loss) and top-k accuracy (ppmoco.fleetx).
        "loss": {phase: {"name": Choice(("CELoss",)), "epsilon": None} for phase in ("train", "eval")},
        "metric": {phase: {"name": Choice(("TopkAcc",)), "topk": [1, 5]} for phase in ("train", "eval")},
        "use_recompute": False,
    },
    # The keys besides lr, exclude_from_weight_decay and lr_mult are the named optimizer's, with its defaults
    # (ppmoco/optimizers.py: Momentum's momentum, use_nesterov, weight_decay; AdamW's beta1, beta2,
    # epsilon, weight_decay; LARS's momentum, weight_decay, trust_coefficient).
    "Optimizer": ByName({name: spec.keys for name, spec in OPTIMIZERS.items()}, {
        "lr": OPEN,
        # Parameters that take no weight decay: bias, norm, or part of a structured parameter name
        # (ppmoco.optimizers.excluded_from_weight_decay). [] decays every parameter (MoCo v1/v2's).
        "exclude_from_weight_decay": [],
        # {part of a structured parameter name: learning-rate multiplier} (ppmoco.optimizers.lr_multipliers):
        # mmselfsup's paramwise lr_mult, e.g. {classifier: 100} for a fine-tuned head. {}: every parameter at 1.
        "lr_mult": OPEN,
    }),
    "Data": {
        "Train": {"dataset": OPEN, "sampler": dict(_SAMPLER), "loader": dict(_LOADER)},
        "Eval": {"dataset": OPEN, "sampler": dict(_SAMPLER, batch_size=64, drop_last=False,
                                                  shuffle=False),
                 "loader": dict(_LOADER)},
    },
    "Eval": {
        # linear: the module's classifier; knn, svm, lowshot_svm: backbone features
        "protocol": Choice(("linear", "knn", "svm", "lowshot_svm")),
        # The arithmetic of the fast path's feature extraction (knn, svm, lowshot_svm): bfloat16 on a
        # CPU with bfloat16 units is several times faster, its features ~1e-2 off float32's
        # (docs/performance.md); the linear protocol's logits stay float32.
        "precision": Choice(("float32", "bfloat16")),
        "knn": {
            "ks": [10, 20, 100, 200],
            "temperature": 0.07,
            "chunk_size": 256,     # evaluation rows per similarity block (bounds memory)
        },
        # mmselfsup's svm_voc07 defaults: its scripts pass costs 1, 10, 100 and its svm_helper adds
        # 2^-4 .. 2^-19. cache_dir null: <Engine.save_load.output_dir>/features
        "svm": {"costs": [1.0, 10.0, 100.0] + [0.5 ** n for n in range(4, 20)], "cv_folds": 3, "layers": ["feat5"],
                "cache_dir": None},
        "lowshot": {"ks": [1, 2, 4, 8, 16, 32, 64, 96], "samples": 5, "seed": 0},
    },
    "Distributed": {
        "dp_degree": None,         # must equal the number of processes when given
        "mp_degree": 1,
        "pp_degree": 1,
        "sharding": {"sharding_degree": 1, "sharding_stage": 1, "sharding_offload": False,
                     "reduce_overlap": False, "broadcast_overlap": False},
    },
    "Fused": {"tensor_fusion": False},
    # paddle.profiler over the training steps [start, end) of `scheduler` (null: every step); a
    # Chrome trace goes to profiler_log and a summary table to the log (detailed: every view).
    "Profiler": {
        "enable": False,
        "scheduler": [1, 5],
        "profiler_log": "profiler_log",
        "detailed": False,
        "record_shapes": True,
        "profile_memory": True,
    },
    # FleetX's export settings: where an exported inference model goes (tools/export.py).
    "Inference": {"model_dir": "./output", "mp_degree": 1},
}

# FleetX keys for what ppmoco does not do: accepted at the value that leaves it off (FleetX's
# default), a one-line error otherwise. dotted key -> (accepts(value), why, what to do instead).
NOT_SUPPORTED = {
    "Engine.execution": (lambda v: v != "static", "the static training program was removed: training runs "
                         "eagerly on every device, on the CPU with ppmoco's oneDNN convolution as before",
                         "set Engine.execution: auto or remove the key"),
    "Engine.run_mode": (lambda v: v == "epoch", "ppmoco counts training in epochs",
                        "set run_mode: epoch and stop early with Engine.max_steps"),
    "Engine.accumulate_steps": (lambda v: v == 1, "accumulating gradients is not the same MoCo step "
                                "(each micro-batch would enqueue keys and shuffle BN on its own)",
                                "set 1 and raise the batch size or the number of processes"),
    "Distributed.mp_degree": (lambda v: v == 1, "model (tensor) parallelism is for models larger than "
                              "one device; ResNets train data-parallel", "set 1"),
    "Distributed.pp_degree": (lambda v: v == 1, "pipeline parallelism is for models larger than one "
                              "device; ResNets train data-parallel", "set 1"),
    "Distributed.sharding.sharding_degree": (lambda v: v == 1, "optimizer-state sharding is not "
                                             "implemented (a ResNet's state fits every device)", "set 1"),
    "Model.use_recompute": (lambda v: v is False, "activation recomputation is not implemented",
                            "set false and lower the batch size if memory is short"),
    "Fused.tensor_fusion": (lambda v: v is False, "fused parameter storage is not implemented", "set false"),
    "Inference.mp_degree": (lambda v: v == 1, "exported models run on one device", "set 1"),
}

# Sections a config may set to null (absent): no evaluation data, for instance.
NULLABLE = {"Data.Eval", "Engine.save_load.ckpt_dir", "Distributed.dp_degree", "Profiler.scheduler"}


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# Ranges checked at load time, before anything is written, so a value Paddle or NumPy would reject
# with a traceback (or silently accept, like a negative weight decay) is a one-line error instead:
# dotted key -> (accepts(value), what is required, an example of a valid value).
# `Optimizer.lr.learning_rate` sits in an OPEN subtree but every schedule takes it.
LIMITS = {
    "Global.seed": (lambda v: 0 <= v < 2 ** 32, "must lie in [0, 2**32)", 2022),
    "Global.num_threads": (lambda v: v >= 0, "must be >= 0 (0 = cores / local processes)", 0),
    "Engine.num_train_epochs": (lambda v: v > 0, "must be > 0", 100),
    "Engine.max_steps": (lambda v: v == -1 or v > 0, "must be > 0, or -1 for no limit", -1),
    "Engine.logging_freq": (lambda v: v > 0, "must be > 0", 10),
    "Engine.mix_precision.scale_loss": (lambda v: v > 0, "must be > 0", 32768.0),
    **{f"Optimizer.{key}": limit for key, limit in OPTIMIZER_KEY_LIMITS.items()},
    "Optimizer.lr.learning_rate": (lambda v: is_number(v) and v > 0, "must be a number > 0", 0.03),
    "Data.Train.sampler.batch_size": (lambda v: v > 0, "must be > 0", 32),
    "Data.Eval.sampler.batch_size": (lambda v: v > 0, "must be > 0", 64),
    "Data.Train.loader.num_workers": (lambda v: v >= 0, "must be >= 0 (0 = load in the main process)", 4),
    "Data.Eval.loader.num_workers": (lambda v: v >= 0, "must be >= 0 (0 = load in the main process)", 4),
    "Eval.knn.ks": (lambda v: bool(v) and all(isinstance(k, int) and not isinstance(k, bool) and k > 0
                                              for k in v), "must be a non-empty list of ints > 0", "[20,200]"),
    "Engine.hang_timeout": (lambda v: v >= 0, "must be >= 0 (0 = no watchdog)", 600),
    "Eval.knn.temperature": (lambda v: v > 0, "must be > 0", 0.07),
    "Eval.knn.chunk_size": (lambda v: v > 0, "must be > 0", 256),
    "Eval.svm.costs": (lambda v: bool(v) and all(is_number(c) and c > 0 for c in v),
                       "must be a non-empty list of numbers > 0", "[1.0,10.0,100.0]"),
    "Eval.svm.cv_folds": (lambda v: v >= 2, "must be >= 2", 3),
    "Eval.svm.layers": (lambda v: bool(v) and all(isinstance(layer, str) and layer in LAYERS for layer in v)
                        and len(set(v)) == len(v),
                        f"must be a non-empty list of distinct layers among {', '.join(LAYERS)}", "[feat5]"),
    "Eval.svm.cache_dir": (lambda v: isinstance(v, str) and v != "", "must be a folder (or null)", "./features"),
    "Eval.lowshot.ks": (lambda v: bool(v) and all(_positive_int(k) for k in v), "must be a non-empty list of ints > 0",
                        "[1,8,96]"),
    "Eval.lowshot.samples": (lambda v: v > 0, "must be > 0", 5),
    "Eval.lowshot.seed": (lambda v: 0 <= v < 2 ** 32, "must lie in [0, 2**32)", 0),
    "Distributed.dp_degree": (_positive_int, "must be an int > 0 (or null)", 8),
    "Global.global_batch_size": (_positive_int, "must be an int > 0 (or null)", 256),
    "Global.local_batch_size": (_positive_int, "must be an int > 0 (or null)", 32),
    "Global.micro_batch_size": (_positive_int, "must be an int > 0 (or null)", 32),
    "Profiler.scheduler": (lambda v: len(v) == 2 and all(_positive_int(s) or s == 0 for s in v) and v[0] < v[1],
                           "must be [start, end) steps with 0 <= start < end (or null for every step)", "[1,5]"),
}


# The project's configs/ folder: `-c NAME.yaml` finds a shipped config from any working directory.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# Where runnable configs are shipped, by name (configs/base/ only holds what they inherit, configs/transfer/
# other frameworks' files).
RUNNABLE_DIRS = (CONFIG_DIR, os.path.join(CONFIG_DIR, "benchmarks"))


def shipped_configs():
    """Names of the runnable configs in RUNNABLE_DIRS."""
    return sorted(n for folder in RUNNABLE_DIRS if os.path.isdir(folder) for n in os.listdir(folder)
                  if n.endswith(".yaml") and os.path.isfile(os.path.join(folder, n)))


def resolve_config_path(path):
    """The file `-c path` means, for every entry point (tools/train.py, eval.py, benchmark.py).

    An existing path always wins. A relative path that does not exist is looked up in configs/ of
    the project, first as given (`NAME.yaml`, `base/digits.yaml`), then by its file name (in configs/,
    then configs/benchmarks/), which accepts FleetX's spelling `ppfleetx/configs/vis/moco/NAME.yaml`
    and `configs/NAME.yaml` from another working directory. An absolute path is never replaced: it
    names one file on purpose.
    """
    if os.path.exists(path):
        return path
    names = shipped_configs()
    if not os.path.isabs(path):
        for candidate in (os.path.join(CONFIG_DIR, path),
                          *(os.path.join(folder, os.path.basename(path)) for folder in RUNNABLE_DIRS)):
            if os.path.isfile(candidate):
                return candidate
    near = difflib.get_close_matches(os.path.basename(path), names, n=3, cutoff=0.6)
    if near:
        listed = f"closest: {', '.join(near)}"
    else:
        listed = f"shipped: {', '.join(names)}" if names else f"none shipped in {CONFIG_DIR}"
    raise ConfigError(f"config file not found: {path}; check the -c path or name a shipped config ({listed})")


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
    elif not type_ok(value, default):
        wanted = "true/false" if isinstance(default, bool) else _type_name(default)
        raise ConfigError(f"{key}: expected {wanted}, got {_type_name(value)} {value!r}")


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
        elif isinstance(sub, ByName):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a section (mapping), got {_type_name(value)}")
            out[key] = _validate_by_name(value, sub, path)
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
            elif isinstance(sub, ByName):
                out[key] = _validate_by_name({}, sub, f"{prefix}{key}")
            elif isinstance(sub, dict):
                out[key] = _validate({}, sub, f"{prefix}{key}.")
            else:
                out[key] = sub[0] if isinstance(sub, Choice) else copy.deepcopy(sub)
    return out


def _validate_by_name(tree, sub, path):
    """_validate for a ByName section: the keys of the variant its `name` chooses."""
    name = tree.get("name", next(iter(sub.variants)))
    _check_leaf(f"{path}.name", name, Choice(sub.variants))
    own, kept = sub.variants[name], {}
    for key, value in tree.items():
        owners = [n for n, keys in sub.variants.items() if key in keys]
        if value is None and owners:
            continue  # the default, or a key of another variant cancelled
        if owners and key not in own:
            raise ConfigError(f"{path}.{key}: a key of {' and '.join(owners)}, not of {path}.name {name} "
                              f"(whose keys are {', '.join(own)}); remove it (or -o {path}.{key}=null) or "
                              f"set {path}.name={owners[0]}")
        kept[key] = value
    return _validate(kept, sub.schema(name), path + ".")


def _check_limits(cfg):
    """Apply LIMITS to the keys present (a null section or an unset OPEN key is skipped)."""
    for key, (accepts, requirement, example) in LIMITS.items():
        node = _lookup(cfg, key)
        if node is not None and not accepts(node):
            raise ConfigError(f"{key}: {node!r} {requirement}; e.g. -o {key}={example}")


def _lookup(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _check_supported(cfg):
    for key, (accepts, why, fix) in NOT_SUPPORTED.items():
        value = _lookup(cfg, key)
        if not accepts(value):
            raise ConfigError(f"{key}: {value!r} is not supported: {why}; {fix}")


def _check_batch_keys(global_cfg, batch_size):
    """FleetX's Global batch keys against the sampler (the number of processes: Engine)."""
    local, micro = global_cfg["local_batch_size"], global_cfg["micro_batch_size"]
    if batch_size is None:
        if global_cfg["global_batch_size"] is None:
            raise ConfigError("Data.Train.sampler.batch_size: null divides Global.global_batch_size among the "
                              "processes, but that is null too; set one of them")
        if local not in (None, 1):
            raise ConfigError(f"Global.local_batch_size: {local} fixes the batch of each process, but "
                              "Data.Train.sampler.batch_size: null divides Global.global_batch_size among the "
                              "processes; remove local_batch_size or set the sampler's batch_size")
        return
    if local not in (None, 1, batch_size):
        raise ConfigError(f"Global.local_batch_size: {local} but Data.Train.sampler.batch_size is {batch_size}, "
                          "the batch each process trains on; make them equal or remove local_batch_size")
    if micro is not None and local is not None and micro != local:
        raise ConfigError(f"Global.micro_batch_size: {micro} differs from Global.local_batch_size {local}, which "
                          f"asks for {NOT_SUPPORTED['Engine.accumulate_steps'][1]}; set them equal")
    total = global_cfg["global_batch_size"]
    if total is not None and total % batch_size:
        raise ConfigError(f"Global.global_batch_size: {total} is not a multiple of Data.Train.sampler.batch_size "
                          f"{batch_size}; it must be batch_size x processes")


def train_batch_size(cfg, processes):
    """The batch each of `processes` training processes takes: Data.Train.sampler.batch_size, or where that
    is null, Global.global_batch_size divided among them (the same global batch for any process count that
    divides it: a job that lost or gained a node resumes at the same image); a one-line ConfigError where
    it does not divide."""
    batch_size, total = cfg["Data"]["Train"]["sampler"]["batch_size"], cfg["Global"]["global_batch_size"]
    if batch_size is not None:
        return batch_size
    if total % processes:
        raise ConfigError(f"Global.global_batch_size: {total} images cannot be divided among {processes} processes "
                          "(Data.Train.sampler.batch_size is null); launch a number of processes that divides it, "
                          "or set another global batch")
    return total // processes


def _check_eval_sampler(evaluation):
    """Evaluation sees every sample once, in order; only checked where an evaluator gets built,
    i.e. when Data.Eval names a dataset."""
    if evaluation and evaluation["dataset"] and (evaluation["sampler"]["shuffle"]
                                                 or evaluation["sampler"]["drop_last"]):
        raise ConfigError("Data.Eval.sampler: evaluation visits every sample once; set shuffle: false "
                          "and drop_last: false")


def _check_eval_precision(evaluation):
    """bfloat16 is for the feature protocols: a linear probe's top-1 turns on small logit gaps."""
    if evaluation["precision"] == "bfloat16" and evaluation["protocol"] == "linear":
        raise ConfigError("Eval.precision: bfloat16 applies to the feature protocols (knn, svm, lowshot_svm); the "
                          "linear protocol's logits stay float32, so set Eval.precision=float32")


def load_config(path, overrides=()):
    """Read `path` (a file, or a shipped config's name: resolve_config_path) with its `_base_`
    chain, apply `-o` overrides, validate and fill defaults."""
    tree = _load_with_bases(resolve_config_path(path))
    for text in overrides:
        key, value = parse_override(text)
        set_by_path(tree, key, value)
    cfg = _validate(tree, SCHEMA, "")
    _check_limits(cfg)
    _check_supported(cfg)
    _check_batch_keys(cfg["Global"], cfg["Data"]["Train"]["sampler"]["batch_size"])
    _check_eval_sampler(cfg["Data"]["Eval"])
    _check_eval_precision(cfg["Eval"])
    if not cfg["Model"]["module"]:
        raise ConfigError("Model.module: missing; name the method, e.g. MOCOModule or MOCOClsModule")
    return cfg


def dump_config(cfg, path):
    """Write the resolved config (what actually ran) next to the run's outputs."""
    write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
