"""docs/new_method.md's example method runs as written: registered, built from a config, trained."""
import os
import re

import numpy as np
import paddle

from ppmoco.engine.step import TrainStep, build_optimizer
from ppmoco.modules import MODULES, build_module

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "new_method.md")
OPT = {"momentum": 0.9, "weight_decay": 1e-4}


def example_namespace():
    with open(DOC) as f:
        code = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(code) == 1, "docs/new_method.md should hold one python block"
    assert len(code[0].strip().splitlines()) <= 40
    namespace = {}
    exec(compile(code[0], DOC, "exec"), namespace)  # registers SimSiam in MODULES
    assert "SimSiam" in MODULES.names()
    return namespace


def train():
    example_namespace()
    paddle.seed(0)
    encoder = {"name": "resnet18", "widths": [8, 16, 16, 16], "cifar_stem": True}
    module = build_module({"module": "SimSiam", "model": {"base_encoder": encoder, "dim": 32}})
    module.train()
    opt = build_optimizer(OPT, module, 0.05)
    step = TrainStep(module, opt, {"enable": False})
    rng = np.random.default_rng(0)
    views = [paddle.to_tensor(rng.standard_normal((8, 3, 16, 16)).astype("float32")) for _ in range(2)]
    return [float(step(views)["loss"]) for _ in range(4)]


def test_the_documented_method_trains():
    losses = train()
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]  # the same batch four times: it must go down
