"""Atomic checkpoints: written to a temporary folder, fsynced, then renamed into place.

Layout under `output_dir`: `epoch_N/` (end of epoch N), `step_S/` (mid-epoch, global step S),
each with model.pdparams, optimizer.pdopt, trainer_state.json (progress + RNG) and meta.json
(the same progress, for listing, the launcher job that wrote it, which its restarts go on from: see
ppmoco/engine/restart.py, and each file's size and SHA-256, checked before any load: see `damage`);
`latest` names the newest complete one. A folder that exists
under its final name is complete; a kill during a save leaves only a `.tmp-*` folder behind,
which is ignored and cleaned up by the next save.

Reading never runs code from a file: the `.pdparams`/`.pdopt` pickles go through
ppmoco.safe_pickle, and the trainer state is JSON (checkpoints written before it was, with a pickled
`trainer_state.pkl`, are still read, through the same restricted unpickler).
"""
import hashlib
import json
import logging
import os
import re
import shutil

import numpy as np
import paddle

from ppmoco import __version__, safe_pickle
from ppmoco.errors import CheckpointError
from ppmoco.fileio import replace_dir, write_text_atomic
from ppmoco.optimizers import check_state
from ppmoco.paddle_internals import rng_state_from_tuples, rng_state_tuples

TRAINER_STATE = "trainer_state.json"
OLD_TRAINER_STATE = "trainer_state.pkl"  # what ppmoco wrote before: a pickle, read restricted
FILES = ("model.pdparams", "optimizer.pdopt", TRAINER_STATE, "meta.json")
logger = logging.getLogger("ppmoco")


def _owner(key, names):
    """The name in `names` that prefixes state key `key` (`<name>_...`), the longest, or None."""
    return max((n for n in names if key.startswith(n + "_")), key=len, default=None)


def _rename_optimizer_state(state, names):
    """Optimizer state keyed through the `names` mapping, for a checkpoint: each accumulator
    `<param name>_<accumulator>_0` (Momentum's velocity, AdamW's moment1, moment2, beta1_pow_acc and
    beta2_pow_acc, LARS's mu; under O2 `<param name>_fp32_master_0_<accumulator>_0`) by its parameter's
    name, the longest that prefixes it, and O2's {parameter name: master weight}.

    Paddle names parameters by a global counter (`conv2d_12.w_0`), which depends on everything
    built before the model; checkpoints use the stable structured names (`encoder_q.backbone.conv1.weight`).
    """
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):  # O2's {parameter name: float32 master weight}
            out[key] = {names.get(name, name): tensor for name, tensor in value.items()}
            continue
        owner = _owner(key, names)
        out[names[owner] + key[len(owner):] if owner else key] = value
    return out


# How Paddle names a parameter's float32 master weight under O2 (Optimizer._create_master_weight), and
# so the state it keeps on it: `<param name>_fp32_master_0_<accumulator>_0`.
MASTER = re.compile(r"^_fp32_master_\d+")
MASTER_SUFFIX = "_fp32_master_0"


def _optimizer_state_for(state, module):
    """Checkpoint optimizer state (structured names) keyed as the optimizer over `module` will look it
    up: by Paddle's parameter names, and in the form of this run's precision, so a checkpoint resumes
    with O2 or without it. A parameter O2 keeps in float16/bfloat16 has a float32 master weight,
    named after the parameter (the name its state's names derive from), and its state on the master;
    a float32 parameter has neither."""
    params = dict(module.named_parameters())
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):  # O2's master weights, for the parameters O2 casts in this run
            masters = {}
            for name, tensor in value.items():
                if name in params and params[name].dtype in LOW_PRECISION:
                    tensor.name = params[name].name + MASTER_SUFFIX
                    masters[params[name].name] = tensor
            if masters:
                out[key] = masters
            continue
        owner = _owner(key, params)
        if owner is None:
            out[key] = value
            continue
        param = params[owner]
        master = MASTER_SUFFIX if param.dtype in LOW_PRECISION else ""
        out[param.name + master + MASTER.sub("", key[len(owner):])] = value
    return out


LOW_PRECISION = (paddle.float16, paddle.bfloat16)


def full_precision_weights(module, optimizer):
    """The module's state dict with every parameter O2 mixed precision cast to float16/bfloat16 as
    its float32 master weight (the optimizer's; a float32 cast where the optimizer made none yet),
    so model.pdparams holds float32 whatever the AMP mode, for resuming and for every consumer."""
    masters = optimizer.state_dict().get("master_weights", {})
    internal = {n: p.name for n, p in module.named_parameters()}
    state = {}
    for key, tensor in module.state_dict().items():
        if tensor.dtype in LOW_PRECISION:
            master = masters.get(internal.get(key))
            tensor = master if master is not None else tensor.astype("float32")
        state[key] = tensor
    return state


def _read_meta(path):
    """Checkpoint folder `path`'s meta.json, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) and isinstance(meta.get("global_step"), int) else None
    except (OSError, ValueError):
        return None


def list_checkpoints(output_dir):
    """Checkpoints in `output_dir` with a readable meta.json, oldest first (by global step)."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            meta = None if name.startswith(".") else _read_meta(os.path.join(output_dir, name))
            if meta is not None:
                found.append((meta["global_step"], name))
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def _sha256(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing(path, names):
    """The files of `names` not in checkpoint folder `path` (an old trainer_state.pkl stands for the JSON)."""
    return [name for name in names if not os.path.isfile(os.path.join(path, name))
            and not (name == TRAINER_STATE and os.path.isfile(os.path.join(path, OLD_TRAINER_STATE)))]


def damage(path):
    """Why checkpoint folder `path` cannot be trusted, as a phrase, or None when it is intact: every
    file meta.json lists has the size and SHA-256 it had when written (bit rot, a truncated copy
    between file systems, a half-synced object store all show). Checkpoints from before meta.json
    listed its files are taken as intact when complete."""
    meta = _read_meta(path)
    if meta is None:
        return "meta.json is missing or unreadable"
    missing = _missing(path, meta.get("files", {}) or [f for f in FILES if f != "meta.json"])
    if missing:
        return f"{missing[0]} is missing"
    for name, want in meta.get("files", {}).items():
        size = os.path.getsize(os.path.join(path, name))
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} when written (truncated or damaged)"
        if _sha256(os.path.join(path, name)) != want["sha256"]:
            return f"{name}'s SHA-256 differs from when it was written (damaged)"
    return None


def save_checkpoint(output_dir, name, module, optimizer, state, keep_last=0, regular=True):
    """Write checkpoint `name` atomically; a regular one becomes `latest` and rotates old ones.

    Irregular checkpoints (`best`) are never rotated and never become `latest`.
    """
    os.makedirs(output_dir, exist_ok=True)
    for stale in os.listdir(output_dir):
        if stale.startswith(".tmp-"):
            shutil.rmtree(os.path.join(output_dir, stale), ignore_errors=True)
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, f".tmp-{name}-{os.getpid()}")
    try:
        os.makedirs(tmp)
        paddle.save(full_precision_weights(module, optimizer), os.path.join(tmp, "model.pdparams"))
        structured = {p.name: n for n, p in module.named_parameters()}
        paddle.save(_rename_optimizer_state(optimizer.state_dict(), structured),
                    os.path.join(tmp, "optimizer.pdopt"))
        with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as f:
            json.dump(_state_to_json(state), f, indent=1, default=_plain_number)
        meta = {k: v for k, v in state.items() if isinstance(v, (int, float, str))}
        meta["ppmoco_version"] = __version__
        meta["files"] = {name: {"size": os.path.getsize(os.path.join(tmp, name)),
                                "sha256": _sha256(os.path.join(tmp, name))} for name in FILES if name != "meta.json"}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        # Re-saving a name (`best`, a step a resumed run redoes) replaces the old copy whole; a crash
        # never leaves a half-deleted folder under that name (its leftovers start with .tmp-).
        replace_dir(tmp, final)
        if regular:
            write_text_atomic(os.path.join(output_dir, "latest"), name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}; free disk space "
                              "or set Engine.save_load.output_dir to a writable folder "
                              "(earlier checkpoints are intact)") from None
    if regular and keep_last > 0:
        # Rotation never deletes the last intact checkpoint: it waits while the new one reads back damaged.
        problem = damage(final)
        if problem is not None:
            logger.warning(f"the checkpoint just written, {final}, reads back damaged ({problem}); older "
                           "checkpoints are kept")
            return final
        for old in [p for p in list_checkpoints(output_dir) if os.path.basename(p) != "best"][:-keep_last]:
            # Renamed first: a stop in the middle of the delete leaves a hidden .tmp- folder (removed by
            # the next save), never a checkpoint name holding part of a checkpoint.
            aside = os.path.join(output_dir, f".tmp-rotated-{os.path.basename(old)}-{os.getpid()}")
            os.rename(old, aside)
            shutil.rmtree(aside, ignore_errors=True)
    return final


def latest_checkpoint(output_dir):
    """The folder `output_dir/latest` names, or None."""
    latest = os.path.join(output_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        return os.path.join(output_dir, f.read().strip())


def check_complete(path):
    """Raise CheckpointError unless `path` is a complete, intact checkpoint folder; return it."""
    missing = _missing(path, FILES)
    if missing:
        raise CheckpointError(f"Engine.save_load.ckpt_dir: {path} is not a complete ppmoco checkpoint "
                              f"(missing {', '.join(missing)}); point it at an epoch_N or step_N folder")
    problem = damage(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; use another checkpoint (Engine.save_load."
                              "ckpt_dir) or restore this one from a copy")
    return path


def find_resume_checkpoint(save_load, job=None):
    """The checkpoint to resume from. A restart of launcher job `job` (ppmoco/engine/restart.py) goes on
    from the newest intact checkpoint that job wrote, whatever the config says; a run without one (or a
    job that wrote none yet) from ckpt_dir when given (it must be intact), else with auto_resume from
    `latest` or, when that one is damaged, the newest intact checkpoint (saying which and why)."""
    if job is not None:
        own = newest_of_job(save_load["output_dir"], job)
        if own is not None:
            return own
    if save_load["ckpt_dir"] is not None:
        return check_complete(save_load["ckpt_dir"])
    if not save_load["auto_resume"]:
        return None
    output_dir = save_load["output_dir"]
    latest = latest_checkpoint(output_dir)
    regular = [p for p in reversed(list_checkpoints(output_dir)) if os.path.basename(p) != "best"]
    candidates = ([latest] if latest is not None else []) + [p for p in regular if p != latest]
    damaged = []
    for path in candidates:
        problem = damage(path) if os.path.isdir(path) else "it does not exist"
        if problem is None:
            for bad, why in damaged:
                logger.warning(f"not resuming from {bad}: {why}; resuming from {path}, the newest intact "
                               "checkpoint")
            return path
        damaged.append((path, problem))
    if damaged:
        raise CheckpointError(f"no intact checkpoint to resume from in {output_dir}: "
                              + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged)
                              + "; restore one from a copy, or start afresh in another Engine.save_load.output_dir")
    return None


def newest_of_job(output_dir, job):
    """The newest intact regular checkpoint in `output_dir` written by launcher job `job` (its
    meta.json's `job`), or None; newer ones of the job that are damaged are named in a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        if os.path.basename(path) == "best" or (_read_meta(path) or {}).get("job") != job:
            continue
        problem = damage(path)
        if problem is None:
            return path
        logger.warning(f"not resuming from {path}: {problem}; looking for an older checkpoint of this job")
    return None


def load_module_weights(path, module):
    """Restore the module's weights (and buffers such as the queue) from checkpoint folder `path`."""
    weights = _read_state_dict(os.path.join(path, "model.pdparams"))
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    wrong = [k for k in expected if k in weights and list(weights[k].shape) != list(expected[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch {wrong[:3]}"
        raise CheckpointError(f"{path}/model.pdparams does not fit this model ({detail}); "
                              "resume with the config that wrote it")
    # Into the module's dtypes: float32 weights into an O2-cast encoder, and the float16 weights of
    # checkpoints written before model.pdparams held float32 into a float32 one.
    module.set_state_dict({k: v.astype(expected[k].dtype) if k in expected and v.dtype != expected[k].dtype
                           and paddle.is_floating_point(v) else v for k, v in weights.items()})


def load_checkpoint(path, module, optimizer):
    """Restore module and optimizer in place; return the saved trainer state."""
    load_module_weights(path, module)
    saved = _read_state_dict(os.path.join(path, "optimizer.pdopt"))
    check_state(saved, optimizer, f"{path}/optimizer.pdopt")
    optimizer.set_state_dict(_optimizer_state_for(saved, module))
    return load_trainer_state(path)


def _read_state_dict(file):
    """The dict paddle.save wrote to `file`, with Tensors, read without running code from it."""
    state = safe_pickle.load_paddle(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read {file}: it holds a {type(state).__name__}, not a state dict")
    return state


def _plain_number(value):
    """json.dump's fallback: numpy scalars (a monitored metric may be one) as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"trainer state value {value!r} of type {type(value).__name__} is not JSON")


def _state_to_json(state):
    """The trainer state with Paddle's random state as (device, seed, offset, engine text) records."""
    out = dict(state)
    if "rng_state" in out:
        out["rng_state"] = [{"device": device, "seed": seed, "offset": offset, "engine": bytes(engine).decode("ascii")}
                            for device, seed, offset, engine in rng_state_tuples(out["rng_state"])]
    return out


def load_trainer_state(path):
    """The trainer state saved in checkpoint folder `path` (rng_state ready for paddle.set_rng_state)."""
    file = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(file) and os.path.isfile(os.path.join(path, OLD_TRAINER_STATE)):
        return _load_old_trainer_state(os.path.join(path, OLD_TRAINER_STATE))
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise TypeError(f"a JSON {type(state).__name__}, not an object")
        if "rng_state" in state:
            state["rng_state"] = rng_state_from_tuples(
                [(r["device"], r["seed"], r["offset"], list(r["engine"].encode("ascii"))) for r in state["rng_state"]])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"cannot read {file}: {err} (damaged?)") from None
    return state


class _OldGeneratorState:
    """Stands in for paddle.base.libpaddle.GeneratorState while an old trainer_state.pkl is read:
    keeps the state pickle hands its __setstate__, checked to be (device, seed, offset, characters)."""

    __slots__ = ("values",)

    def __setstate__(self, values):
        if not (type(values) is tuple and len(values) == 4 and all(type(v) is int for v in values[:3])
                and type(values[3]) is list and all(type(c) is int and 0 <= c < 128 for c in values[3])):
            raise ValueError(f"GeneratorState state {str(values)[:60]} is not (device, seed, offset, text)")
        self.values = values


def _load_old_trainer_state(file):
    state = safe_pickle.load(file, extra={("paddle.base.libpaddle", "GeneratorState"): _OldGeneratorState})
    rng = state.get("rng_state", []) if isinstance(state, dict) else None
    if not isinstance(rng, list) or not all(isinstance(s, _OldGeneratorState) and hasattr(s, "values") for s in rng):
        raise CheckpointError(f"cannot read {file}: not a ppmoco trainer state")
    if "rng_state" in state:
        state["rng_state"] = rng_state_from_tuples([s.values for s in rng])
    return state
