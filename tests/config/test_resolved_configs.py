"""The digits configs resolve to exactly what they resolved to before they shared a `_base_` file.

data/digits_resolved.json pins the pre-refactor resolution: it was written by ppmoco.config.load_config
from configs/*_digits_1n2c.yaml as they stood before their shared parts moved to configs/base/digits.yaml.
Values and their types must match (JSON keeps 30.0 apart from 30); the order of keys inside a section
may differ, since a base file's keys come first when merged, and no consumer reads that order.
Keys the schema gained later (FleetX's, ppmoco.fleetx; Eval.svm and Eval.lowshot; Optimizer.use_nesterov;
Engine.hang_timeout; Engine.conv; Optimizer.exclude_from_weight_decay; Optimizer.lr_mult) were added to it at
their defaults
(Eval.svm.costs since at mmselfsup's full grid);
the configs set Inference.model_dir later still (a folder of each run's own, for tools/export.py).
"""
import json
import os

import pytest

from ppmoco.config import load_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
with open(os.path.join(os.path.dirname(__file__), "data", "digits_resolved.json"), encoding="utf-8") as f:
    SNAPSHOT = json.load(f)


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_digits_config_resolves_as_before(name):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert json.dumps(cfg, sort_keys=True, indent=1) == json.dumps(SNAPSHOT[name], sort_keys=True, indent=1)
