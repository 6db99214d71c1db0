"""The optimizers `Optimizer.name` chooses, in one table: each one's builder, its config keys with their
defaults, and the names of the state it keeps per parameter (its accumulators).

Everything optimizer-specific is here; the Engine, the step, checkpoints and the non-finite step
guard ask this module and name no optimizer. Importing it does not import Paddle (ppmoco/config.py
reads the keys before the tools set Paddle's environment); the builders import it when they build.

- `Momentum`: paddle.optimizer.Momentum, SGD with momentum as torch.optim.SGD (weight decay is L2,
  added to the gradient; `use_nesterov` as torch's `nesterov`).
- `AdamW`: paddle.optimizer.AdamW, whose update is torch.optim.AdamW's: the weight decay is
  decoupled (p <- p - lr * weight_decay * p, then the Adam step with bias-corrected moments;
  tests/engine/test_optimizer.py checks it against torch.optim.AdamW).
- `LARS`: MoCo v3's (ppmoco/engine/lars.py; Paddle's LarsMomentumOptimizer computes another update).

`Optimizer.exclude_from_weight_decay` takes the weight decay off some parameters, and `Optimizer.lr_mult`
scales the learning rate of some ({part of a parameter name: multiplier}, mmselfsup's paramwise
`custom_keys` lr_mult: a fine-tuned head's x100), for every optimizer, through parameter groups
(parameter_groups): Paddle's optimizers and LARS multiply the run's learning rate by a group's
`learning_rate`, and update with it whole, weight decay included, as torch's group `lr` does.
"""
import logging
import re

from ppmoco.errors import CheckpointError, ConfigError

logger = logging.getLogger("ppmoco")

# Each key's range, checked where the config loads (ppmoco/config.py LIMITS): key -> (accepts(value),
# what is required, an example of a valid value). A key means the same in every optimizer that has it.
KEY_LIMITS = {
    "momentum": (lambda v: 0 <= v < 1, "must lie in [0, 1)", 0.9),
    "weight_decay": (lambda v: v >= 0, "must be >= 0", 0.0001),
    "beta1": (lambda v: 0 <= v < 1, "must lie in [0, 1)", 0.9),
    "beta2": (lambda v: 0 <= v < 1, "must lie in [0, 1)", 0.999),
    "epsilon": (lambda v: v > 0, "must be > 0", 1e-8),
    "trust_coefficient": (lambda v: v > 0, "must be > 0", 0.001),
    "exclude_from_weight_decay": (
        lambda v: all(isinstance(rule, str) and rule for rule in v) and len(set(v)) == len(v),
        "must be a list of distinct, non-empty rules (bias, norm, or part of a parameter name)", "[bias,norm]"),
    "lr_mult": (
        lambda v: all(isinstance(rule, str) and rule and isinstance(m, (int, float)) and not isinstance(m, bool)
                      and m > 0 for rule, m in v.items()),
        "must map parts of parameter names to learning-rate multipliers > 0", "'{classifier: 100}'"),
}

# The rules of exclude_from_weight_decay that name a kind of parameter rather than part of a name.
BIAS, NORM = "bias", "norm"


def _momentum(groups, learning_rate, s):
    import paddle

    return paddle.optimizer.Momentum(learning_rate=learning_rate, momentum=s["momentum"], parameters=groups,
                                     use_nesterov=s["use_nesterov"], weight_decay=s["weight_decay"])


def _adamw(groups, learning_rate, s):
    import paddle

    return paddle.optimizer.AdamW(learning_rate=learning_rate, beta1=s["beta1"], beta2=s["beta2"],
                                  epsilon=s["epsilon"], parameters=groups, weight_decay=s["weight_decay"])


def _lars(groups, learning_rate, s):
    from ppmoco.engine.lars import LARS

    return LARS(learning_rate=learning_rate, parameters=groups, momentum=s["momentum"],
                weight_decay=s["weight_decay"], trust_coefficient=s["trust_coefficient"])


class Spec:
    """One optimizer: `build(groups, learning_rate, settings)`, its keys {key: default} (the first
    optimizer's are Optimizer's defaults), and its accumulators {name: the value a parameter's starts
    from: a number, or the key whose value it is}. The optimizer's class has the table's name."""

    def __init__(self, build, keys, accumulators):
        self.build, self.keys, self.accumulators = build, keys, accumulators


OPTIMIZERS = {
    # MoCo v1/v2's: main_moco.py's torch.optim.SGD(momentum=0.9, weight_decay=1e-4).
    "Momentum": Spec(_momentum, {"momentum": 0.9, "use_nesterov": False, "weight_decay": 0.0001},
                     {"velocity": 0.0}),
    # Paddle's and torch's defaults (moco-v3 trains ViTs with weight_decay 0.1).
    "AdamW": Spec(_adamw, {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "weight_decay": 0.01},
                  {"moment1": 0.0, "moment2": 0.0, "beta1_pow_acc": "beta1", "beta2_pow_acc": "beta2"}),
    # moco-v3's main_moco.py for ResNets: LARS, momentum 0.9, weight decay 1e-6, trust coefficient 0.001.
    "LARS": Spec(_lars, {"momentum": 0.9, "weight_decay": 1e-6, "trust_coefficient": 0.001}, {"mu": 0.0}),
}
DEFAULT = next(iter(OPTIMIZERS))

# `<parameter name>[_fp32_master_N]_<accumulator>_<N>`: how Paddle names a parameter's state tensors.
_ACCUMULATOR = re.compile(r"_(%s)_\d+$" % "|".join(sorted({a for s in OPTIMIZERS.values() for a in s.accumulators},
                                                         key=len, reverse=True)))


def settings(opt_cfg):
    """(name, {key: value}) of an Optimizer section, missing keys at their defaults."""
    name = opt_cfg.get("name", DEFAULT)
    return name, {key: opt_cfg.get(key, default) for key, default in OPTIMIZERS[name].keys.items()}


def _norm_layer_types():
    import paddle.nn as nn

    return (nn.BatchNorm, nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D, nn.SyncBatchNorm, nn.LayerNorm,
            nn.GroupNorm, nn.InstanceNorm1D, nn.InstanceNorm2D, nn.InstanceNorm3D)


def _trainable_names(module):
    """(structured name, parameter) of the module's trainable parameters (Module.trainable_parameters)."""
    trainable = {id(p) for p in module.trainable_parameters()}
    return [(name, p) for name, p in module.named_parameters() if id(p) in trainable]


def _names_holding(names, rule, key, module, fix):
    """The names of `names` ((name, parameter) pairs) that contain `rule`; none is a ConfigError on `key`
    (a misspelt name), ending with what to do, `fix`."""
    matched = {name for name, _ in names if rule in name}
    if not matched:
        raise ConfigError(f"{key}: '{rule}' is in no trainable parameter's name of {type(module).__name__} "
                          f"(e.g. {names[0][0] if names else 'none'}); {fix}")
    return matched


def excluded_from_weight_decay(module, rules):
    """Structured names of the module's trainable parameters that `rules` exclude from weight decay.

    `bias`: every parameter whose own name is `bias` (of a Linear, a convolution or a normalisation
    layer); `norm`: every parameter of a normalisation layer (BatchNorm, SyncBatchNorm, LayerNorm,
    GroupNorm, InstanceNorm), by the layer's type, whatever the layer or its parameters are called;
    any other rule: the parameters whose structured name contains it (`encoder_q.head`, `pos_embed`).
    A rule of the third kind that matches nothing is a ConfigError (a misspelt name).
    """
    names = _trainable_names(module)
    norms = set()
    if NORM in rules:
        kinds = _norm_layer_types()
        for layer in module.sublayers(include_self=True):
            if isinstance(layer, kinds):
                norms.update(id(p) for p in layer.parameters(include_sublayers=False))
    excluded = set()
    for rule in rules:
        if rule == BIAS:
            matched = {name for name, _ in names if name.rsplit(".", 1)[-1] == BIAS}
        elif rule == NORM:
            matched = {name for name, p in names if id(p) in norms}
        else:
            matched = _names_holding(names, rule, "Optimizer.exclude_from_weight_decay", module,
                                     "correct it, or use bias or norm")
        excluded |= matched
    return excluded


def lr_multipliers(module, lr_mult):
    """{structured name: multiplier} of the module's trainable parameters that `lr_mult` ({part of a
    structured name: multiplier}, Optimizer.lr_mult) names. A rule that matches no trainable parameter,
    or a parameter two rules match, is a ConfigError."""
    names = _trainable_names(module)
    multipliers = {}
    for rule, multiplier in lr_mult.items():
        for name in sorted(_names_holding(names, rule, "Optimizer.lr_mult", module, "correct it")):
            other = next((r for r in lr_mult if r != rule and r in name), None)
            if other is not None:
                raise ConfigError(f"Optimizer.lr_mult: {name} holds both '{rule}' and '{other}'; give each "
                                  "parameter one rule (a longer part of its name)")
            multipliers[name] = float(multiplier)
    return multipliers


def parameter_groups(module, rules, weight_decay, lr_mult=None):
    """The module's trainable parameters as parameter groups, one per (learning-rate multiplier, weight
    decay): those `rules` exclude (excluded_from_weight_decay) take weight decay 0, the others
    `weight_decay`; those `lr_mult` names (lr_multipliers) their multiplier as the group's
    `learning_rate`, the others 1. Groups at multiplier 1 come first, the decayed before the excluded.
    Without rules or multipliers: one group, the same update as the plain parameter list."""
    params = module.trainable_parameters()
    structured = {id(p): name for name, p in module.named_parameters()}
    excluded = excluded_from_weight_decay(module, rules) if rules else set()
    multipliers = lr_multipliers(module, lr_mult) if lr_mult else {}
    groups = {}  # (multiplier, excluded) -> parameters
    for p in params:
        name = structured.get(id(p), p.name)
        groups.setdefault((multipliers.get(name, 1.0), name in excluded), []).append(p)
    if rules:
        logger.info(f"Optimizer.exclude_from_weight_decay {rules}: {len(excluded)} of {len(params)} trainable "
                    "parameters take no weight decay")
    if multipliers:
        logger.info(f"Optimizer.lr_mult {lr_mult}: {len(multipliers)} of {len(params)} trainable parameters train at "
                    "their multiple of the learning rate")
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[0], key[1]))
    return [{"params": groups[key], "weight_decay": 0.0 if key[1] else float(weight_decay), "learning_rate": key[0]}
            for key in order]


def build_optimizer(opt_cfg, module, learning_rate):
    """The optimizer `opt_cfg` (the Optimizer section; keys it lacks at their defaults) names, over
    the module's trainable parameters (Module.trainable_parameters) in parameter groups."""
    name, values = settings(opt_cfg)
    groups = parameter_groups(module, opt_cfg.get("exclude_from_weight_decay") or [], values["weight_decay"],
                              opt_cfg.get("lr_mult"))
    return OPTIMIZERS[name].build(groups, learning_rate, values)


def accumulator(key):
    """The accumulator an optimizer state key names (`velocity` for `conv2d_0.w_0_velocity_0`), or None."""
    match = _ACCUMULATOR.search(key)
    return match.group(1) if match else None


def initial_value(opt_cfg, key):
    """The value optimizer state `key` holds before the parameter's first update (AdamW's beta powers
    start at beta1 and beta2, everything else at 0): the non-finite step guard puts it back into
    state a skipped first step created."""
    name, values = settings(opt_cfg)
    start = OPTIMIZERS[name].accumulators.get(accumulator(key), 0.0)
    return float(values[start] if isinstance(start, str) else start)


def check_state(state, optimizer, where):
    """Raise CheckpointError when optimizer state `state` (read from `where`) is another optimizer's
    than `optimizer`'s: Paddle would otherwise fail at the first step, naming one tensor."""
    spec = OPTIMIZERS.get(type(optimizer).__name__)
    held = {accumulator(key) for key, value in state.items() if not isinstance(value, dict)} - {None}
    if spec is None or not held or held == set(spec.accumulators):
        return
    writer = next((name for name, s in OPTIMIZERS.items() if set(s.accumulators) == held), "another optimizer")
    raise CheckpointError(f"{where} holds the state of {writer} ({', '.join(sorted(held))}), not of "
                          f"{type(optimizer).__name__}: resume with the Optimizer.name that wrote it, or start "
                          "afresh in another Engine.save_load.output_dir")
