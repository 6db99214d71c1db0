"""The Optimizer section: its keys are the named optimizer's (ppmoco/optimizers.py), with its defaults;
an unknown name, a key of another optimizer or a value out of range is one line naming the key."""
import os

import pytest

from ppmoco.config import load_config
from ppmoco.errors import ConfigError
from ppmoco.optimizers import OPTIMIZERS

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DIGITS = os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml")  # Momentum, momentum 0.9 from its base


def optimizer(*overrides):
    return load_config(DIGITS, list(overrides))["Optimizer"]


def test_each_optimizer_resolves_to_its_own_keys_at_their_defaults():
    # Catches: another optimizer's keys (or their defaults) leaking into the resolved config, which
    # config.yaml records as what ran.
    lr = optimizer()["lr"]
    assert optimizer() == {"name": "Momentum", "momentum": 0.9, "use_nesterov": False, "weight_decay": 0.0005,
                           "lr": lr, "exclude_from_weight_decay": [], "lr_mult": {}}
    assert optimizer("Optimizer.name=AdamW", "Optimizer.momentum=null", "Optimizer.weight_decay=null") == {
        "name": "AdamW", "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "weight_decay": 0.01, "lr": lr,
        "exclude_from_weight_decay": [], "lr_mult": {}}
    assert optimizer("Optimizer.name=LARS", "Optimizer.trust_coefficient=0.002") == {
        "name": "LARS", "momentum": 0.9, "weight_decay": 0.0005, "trust_coefficient": 0.002, "lr": lr,
        "exclude_from_weight_decay": [], "lr_mult": {}}
    assert set(OPTIMIZERS) == {"Momentum", "AdamW", "LARS"}


def test_a_section_without_optimizer_keys_is_momentum_as_before(tmp_path):
    # Catches: another default optimizer, or Momentum's defaults changed, for configs that name none.
    path = tmp_path / "c.yaml"
    path.write_text("Model: {module: MOCOModule}\n")
    assert load_config(str(path))["Optimizer"] == {"name": "Momentum", "momentum": 0.9, "use_nesterov": False,
                                                   "weight_decay": 0.0001, "lr": {}, "exclude_from_weight_decay": [],
                                                   "lr_mult": {}}


@pytest.mark.parametrize("overrides, message", [
    # Catches: a name outside the table reaching the builder (a KeyError traceback).
    (["Optimizer.name=SGD"], r"Optimizer.name: 'SGD' is not one of Momentum, AdamW, LARS"),
    # Catches: a key of another optimizer silently ignored (beta1 set, Momentum trained).
    (["Optimizer.beta1=0.8"], r"Optimizer.beta1: a key of AdamW, not of Optimizer.name Momentum \(whose keys are "
                              r"momentum, use_nesterov, weight_decay\); remove it \(or -o Optimizer.beta1=null\) or "
                              r"set Optimizer.name=AdamW"),
    (["Optimizer.name=AdamW"], r"Optimizer.momentum: a key of Momentum and LARS, not of Optimizer.name AdamW "),
    (["Optimizer.name=LARS", "Optimizer.use_nesterov=true"], r"Optimizer.use_nesterov: a key of Momentum, not of "),
    (["Optimizer.name=Momentum", "Optimizer.trust_coefficient=0.01"], r"Optimizer.trust_coefficient: a key of LARS"),
    (["Optimizer.bogus=1"], r"Optimizer.bogus: unknown key"),
    # Catches: a range left to Paddle (a ValueError traceback) or accepted (a negative decay, a beta of 1).
    (["Optimizer.momentum=1.0"], r"Optimizer.momentum: 1.0 must lie in \[0, 1\); e\.g\. -o Optimizer.momentum=0.9"),
    (["Optimizer.weight_decay=-0.1"], r"Optimizer.weight_decay: -0.1 must be >= 0"),
    (["Optimizer.name=AdamW", "Optimizer.momentum=null", "Optimizer.beta1=1.0"], r"Optimizer.beta1: 1.0 must lie in "),
    (["Optimizer.name=AdamW", "Optimizer.momentum=null", "Optimizer.beta2=-0.5"], r"Optimizer.beta2: -0.5 must lie in"),
    (["Optimizer.name=AdamW", "Optimizer.momentum=null", "Optimizer.epsilon=0"], r"Optimizer.epsilon: 0 must be > 0"),
    (["Optimizer.name=LARS", "Optimizer.trust_coefficient=0"], r"Optimizer.trust_coefficient: 0 must be > 0"),
    (["Optimizer.name=AdamW", "Optimizer.momentum=null", "Optimizer.beta1=high"],
     r"Optimizer.beta1: expected float, got str 'high'"),
    (["Optimizer.exclude_from_weight_decay=bias"], r"Optimizer.exclude_from_weight_decay: expected list, got str"),
    (["Optimizer.exclude_from_weight_decay=[bias,'']"], r"Optimizer.exclude_from_weight_decay: \['bias', ''\] must "
                                                        r"be a list of distinct, non-empty rules"),
    (["Optimizer.exclude_from_weight_decay=[norm,norm]"], r"Optimizer.exclude_from_weight_decay: .* distinct"),
    # Catches: a multiplier that is not a positive number reaching Paddle (a zero or negative learning rate).
    (["Optimizer.lr_mult=100"], r"Optimizer.lr_mult: expected a mapping, got int 100"),
    (["Optimizer.lr_mult.classifier=0"], r"Optimizer.lr_mult: \{'classifier': 0\} must map parts of parameter "
                                         r"names to learning-rate multipliers > 0; e\.g\. -o "
                                         r"Optimizer.lr_mult='\{classifier: 100\}'"),
    (["Optimizer.lr_mult.classifier=high"], r"Optimizer.lr_mult: \{'classifier': 'high'\} must map"),
    (["Optimizer.lr_mult.classifier=true"], r"Optimizer.lr_mult: \{'classifier': True\} must map"),
])
def test_optimizer_errors_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        optimizer(*overrides)
    assert "\n" not in str(err.value)


def test_null_takes_a_keys_default_or_drops_another_optimizers():
    # The config's base file sets Momentum's momentum; -o Optimizer.momentum=null cancels it for AdamW.
    # Catches: None reaching Paddle (Momentum(momentum=None) raises), or null refused for a key of the base.
    assert optimizer("Optimizer.momentum=null")["momentum"] == 0.9
    assert "momentum" not in optimizer("Optimizer.name=AdamW", "Optimizer.momentum=null")
