"""The CPU fast path trains each supervised-contrastive MoCo variant as the eager path does.

Same tolerances as tests/engine/test_static_step.py (other kernels, float32: agreement to rounding).
Three steps of 8 images from 3 classes into a queue of 32, so from step 2 on queued keys of the
query's class are positives and the label queue is read as well as written.
"""
import numpy as np
import paddle
import pytest

from ppmoco.engine.static_step import StaticTrainStep
from ppmoco.engine.step import TrainStep, build_optimizer
from ppmoco.modules.supcon import EMPTY, SupConIn, SupConOut, SupConSuploss

TINY = {"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True}
OPT = {"momentum": 0.9, "weight_decay": 1e-4}
NO_AMP = {"enable": False}


def train(cls, static, steps=3):
    paddle.seed(0)
    module = cls(base_encoder=TINY, projector={"hidden_dim": 16}, dim=8, K=32, m=0.9, T=0.2, bn_splits=2)
    module.train()
    opt = build_optimizer(OPT, module, 0.05)
    step = TrainStep(module, opt, NO_AMP)
    if static:
        step = StaticTrainStep(module, opt, lambda m: build_optimizer(OPT, m, 0.05), step, strict=True)
    rng = np.random.default_rng(0)
    paddle.seed(123)
    outs = []
    for _ in range(steps):
        views = [paddle.to_tensor(rng.standard_normal((8, 3, 16, 16)).astype("float32")) for _ in range(2)]
        out = step([*views, paddle.to_tensor(rng.integers(0, 3, 8))])
        outs.append({k: float(v) for k, v in out.items()})
    return outs, {k: v.numpy().copy() for k, v in module.state_dict().items()}, step


@pytest.mark.parametrize("cls", [SupConIn, SupConOut, SupConSuploss])
def test_fast_path_gives_the_eager_losses_metrics_weights_and_label_queue(cls):
    eager_outs, eager, _ = train(cls, static=False)
    static_outs, static, step = train(cls, static=True)
    assert all(program is not None for program in step.programs.values())  # it ran, not the fallback
    np.testing.assert_allclose([o["loss"] for o in static_outs], [o["loss"] for o in eager_outs], rtol=1e-5)
    for name in ("acc1", "acc5"):
        np.testing.assert_allclose([o[name] for o in static_outs], [o[name] for o in eager_outs], atol=1e-4)
    assert eager.keys() == static.keys()
    for key in eager:
        np.testing.assert_allclose(static[key], eager[key], atol=1e-5, rtol=0, err_msg=key)
    labels = static["queue_labels"]
    assert (labels[:24] >= 0).all() and (labels[24:] == EMPTY).all()  # three batches of 8 enqueued
