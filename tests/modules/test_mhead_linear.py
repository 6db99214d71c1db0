"""The multi-head linear probe (mmselfsup's feature1..5 benchmark), checked against NumPy."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from ppmoco.config import load_config
from ppmoco.engine.step import build_optimizer
from ppmoco.errors import ConfigError
from ppmoco.fleetx import module_args
from ppmoco.models import pool_stages
from ppmoco.modules import MODULES, build_module
from ppmoco.modules.mhead_linear import FEATURES, MultiHeadLinearEval
from ppmoco.registry import check_kwargs

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY = {"name": "resnet18", "widths": [4, 8, 8, 16], "cifar_stem": True}
OPT = {"momentum": 0.9, "weight_decay": 1e-4, "use_nesterov": True}
EPS = 1e-5


def batch(rng, n=8, size=16, classes=3):
    return [paddle.to_tensor(rng.standard_normal((n, 3, size, size)).astype("float32")),
            paddle.to_tensor(rng.integers(0, classes, n).astype("int64"))]


def pooled_features(module, images):
    with paddle.no_grad():
        return {k: v.numpy() for k, v in pool_stages(module.backbone.forward_stages(images), module.layers).items()}


def numpy_head(head, pooled, mean, var):
    """BatchNorm without affine parameters, flatten, linear: the head by hand."""
    normed = (pooled - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + EPS)
    return normed.reshape(len(pooled), -1) @ head.fc.weight.numpy() + head.fc.bias.numpy()


def numpy_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


def numpy_topk(logits, labels, k):
    """Percent of rows whose label is among the k best classes (ties: lower class index first)."""
    own = logits[np.arange(len(labels)), labels][:, None]
    classes = np.arange(logits.shape[1])[None, :]
    ahead = ((logits > own) | ((logits == own) & (classes < labels[:, None]))).sum(axis=1)
    return 100.0 * np.mean(ahead < k)


# Catches: heads sized from the wrong stage, channel count or grid (mmselfsup's MultiClsHead has
# Linear(9216), (9216), (8192), (9216), (8192) on ResNet-50), or pooling that is not adaptive at other
# input sizes (160 px would give other dimensions, or fail in the linear layers).
@pytest.mark.parametrize("size", [224, 160])
def test_resnet50_heads_see_mmselfsup_dims_at_224_px_and_at_other_sizes(size):
    paddle.seed(0)
    module = MultiHeadLinearEval(base_encoder={"name": "resnet50"}, num_classes=7)
    assert module.layers == FEATURES == ["feat1", "feat2", "feat3", "feat4", "feat5"]
    assert [module.heads[layer].fc.weight.shape[0] for layer in FEATURES] == [9216, 9216, 8192, 9216, 8192]
    module.eval()
    images = paddle.randn([1, 3, size, size])
    pooled = pooled_features(module, images)
    assert [int(np.prod(pooled[layer].shape[1:])) for layer in FEATURES] == [9216, 9216, 8192, 9216, 8192]
    with paddle.no_grad():
        ranks = module.validation_step([images, paddle.to_tensor([3])])
    assert sorted(ranks) == FEATURES and all(r.shape == [1] for r in ranks.values())


# Catches: a backbone weight or BatchNorm statistic that moves (backbone in train mode, a parameter
# left trainable), gradients reaching anything but the heads' linear layers, heads that do not train,
# and head BatchNorms whose running statistics never update.
def test_only_the_heads_train_and_the_backbone_stays_frozen_in_eval_mode():
    paddle.seed(0)
    module = MultiHeadLinearEval(base_encoder=TINY, num_classes=3)
    module.train()
    assert not module.backbone.training and all(head.training for head in module.heads.values())
    fcs = [p for layer in FEATURES for p in (module.heads[layer].fc.weight, module.heads[layer].fc.bias)]
    assert [id(p) for p in module.trainable_parameters()] == [id(p) for p in fcs]
    backbone = {k: v.numpy().copy() for k, v in module.backbone.state_dict().items()}
    heads = {k: v.numpy().copy() for k, v in module.heads.state_dict().items()}
    opt = build_optimizer(OPT, module, 0.1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        module.training_step(batch(rng)).loss.backward()
        assert all(p.grad is None for p in module.backbone.parameters())
        assert all(p.grad is not None and np.abs(p.grad.numpy()).max() > 0 for p in fcs)
        opt.step()
        opt.clear_grad()
    for k, v in module.backbone.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), backbone[k], err_msg=k)
    assert all(not np.array_equal(v.numpy(), heads[k]) for k, v in module.heads.state_dict().items())
    module.on_epoch_end(1)  # the reference's sanity check passes


# Catches: a BatchNorm with a (trainable) scale and shift where mmselfsup has affine=False, torch's
# momentum 0.1 taken as Paddle's (running statistics moving 0.9 of the way), normalisation over the
# flattened features instead of the channels, and a loss that averages the heads or drops one
# (mmselfsup's runner adds loss.1..loss.5).
def test_training_loss_is_the_sum_of_the_heads_cross_entropies_through_channel_batchnorm():
    paddle.seed(1)
    module = MultiHeadLinearEval(base_encoder=TINY, num_classes=3)
    module.train()
    for head in module.heads.values():
        assert head.norm.weight is None and head.norm.bias is None
    images, labels = batch(np.random.default_rng(1))
    pooled = pooled_features(module, images)
    out = module.training_step([images, labels])
    total = 0.0
    for layer in FEATURES:
        x = pooled[layer]
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        logits = numpy_head(module.heads[layer], x, mean, var)
        expected = numpy_cross_entropy(logits, labels.numpy())
        assert float(out.metrics[f"{layer}_loss"]) == pytest.approx(expected, rel=1e-5)
        assert float(out.metrics[f"{layer}_acc1"]) == pytest.approx(numpy_topk(logits, labels.numpy(), 1))
        norm = module.heads[layer].norm
        np.testing.assert_allclose(norm._mean.numpy(), 0.1 * mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(norm._variance.numpy(), 0.9 + 0.1 * var, rtol=1e-4)  # Paddle: biased
        total += expected
    assert float(out.loss) == pytest.approx(total, rel=1e-5)


# Catches: validation through batch statistics instead of the running ones, a head's metrics filed
# under another head's name, a top-k of the wrong k, and images counted twice or dropped.
def test_validation_metrics_per_head_equal_numpy_on_the_heads_weights():
    paddle.seed(2)
    module = MultiHeadLinearEval(base_encoder=TINY, num_classes=6, topk=[1, 2, 5])
    module.train()
    opt = build_optimizer(OPT, module, 0.5)
    rng = np.random.default_rng(2)
    for _ in range(4):  # move the heads and their running statistics away from their start
        module.training_step(batch(rng, classes=6)).loss.backward()
        opt.step()
        opt.clear_grad()
    module.eval()
    batches = [batch(rng, n=n, classes=6) for n in (7, 5)]
    outputs = [module.validation_step(b) for b in batches]
    gathered = {layer: np.concatenate([o[layer].numpy() for o in outputs]) for layer in FEATURES}
    metrics = module.validation_end(gathered)
    assert list(metrics) == [f"{layer}_top{k}" for layer in FEATURES for k in (1, 2, 5)]
    labels = np.concatenate([b[1].numpy() for b in batches])
    for layer in FEATURES:
        head = module.heads[layer]
        logits = np.concatenate([numpy_head(head, pooled_features(module, b[0])[layer], head.norm._mean.numpy(),
                                            head.norm._variance.numpy()) for b in batches])
        for k in (1, 2, 5):
            assert metrics[f"{layer}_top{k}"] == pytest.approx(numpy_topk(logits, labels, k), abs=1e-9), (layer, k)
    assert module.monitor == "feat5_top1"


# Catches: linear layers not initialised as mmselfsup's init_cfg (Normal std 0.01, bias 0), a chosen
# subset of layers ignored, the best checkpoint monitoring a head that is not trained, and bad layer
# names reaching Paddle instead of a one-line error naming the key.
def test_init_layers_and_bad_layers():
    paddle.seed(3)
    module = MultiHeadLinearEval(base_encoder=dict(TINY, widths=[16, 8, 8, 16]), num_classes=100,
                                 layers=["feat1", "feat3"])
    assert list(module.heads) == ["feat1", "feat3"] and module.monitor == "feat3_top1"
    weight = module.heads["feat1"].fc.weight.numpy()  # 16 channels x 144 cells x 100 classes
    assert abs(weight.std() - 0.01) < 0.0005 and abs(weight.mean()) < 0.0005
    assert not module.heads["feat1"].fc.bias.numpy().any()
    for layers in ([], ["feat6"], ["feat1", "feat1"], "feat5"):
        with pytest.raises(ConfigError, match=r"^Model.model.layers: .* must be a non-empty list of distinct layers"):
            MultiHeadLinearEval(base_encoder=TINY, num_classes=3, layers=layers)


# Catches: the registry names, or FleetX's Model.metric top-k not reaching this module.
def test_built_by_name_with_the_metric_topk():
    for name in ("MOCOMultiHeadClsModule", "MultiHeadLinear"):
        module = build_module({"module": name, "model": {"base_encoder": TINY, "num_classes": 3},
                               "metric": {"train": {"topk": [1, 3]}, "eval": {"topk": [1, 3]}}})
        assert isinstance(module, MultiHeadLinearEval) and module.topk == [1, 3]


MMSELFSUP = {  # mmselfsup 0.x's configs: epochs, lr milestones, classes
    "mhead_linear_in1k_1n8c": (90, [30, 60, 90], 1000),
    "mhead_linear_places205_1n8c": (28, [7, 14, 21], 205),
}


# Catches: a config drifting from mmselfsup's recipe (SGD lr 0.01, Nesterov momentum 0.9, weight decay
# 1e-4, 8 x 32 images, five heads) or naming arguments the module does not take.
@pytest.mark.parametrize("name", sorted(MMSELFSUP))
def test_benchmark_configs_carry_mmselfsups_hyperparameters(name):
    cfg = load_config(os.path.join(ROOT, "configs", "benchmarks", f"{name}.yaml"))
    epochs, milestones, classes = MMSELFSUP[name]
    opt, model = cfg["Optimizer"], cfg["Model"]
    assert (opt["momentum"], opt["use_nesterov"], opt["weight_decay"]) == (0.9, True, 0.0001)
    assert opt["lr"] == {"name": "MultiStepDecay", "learning_rate": 0.01, "milestones": milestones, "gamma": 0.1}
    assert cfg["Engine"]["num_train_epochs"] == epochs and cfg["Data"]["Train"]["sampler"]["batch_size"] == 32
    assert model["module"] == "MOCOMultiHeadClsModule" and model["model"]["layers"] == FEATURES
    assert model["model"]["num_classes"] == classes == cfg["Data"]["Train"]["dataset"]["class_num"]
    check_kwargs(MODULES.get(model["module"], "Model.module"), module_args(model["module"], model), "Model.model")


# Catches: the digits recipe not training through the tools (engine, evaluator, logs) with every
# head reported; its results file missing a head or a top-k.
def test_digits_config_trains_and_reports_every_head(tmp_path):
    out = tmp_path / "out"

    def run(tool, *overrides):
        cmd = [sys.executable, os.path.join(ROOT, "tools", tool), "-c",
               os.path.join(ROOT, "configs", "benchmarks", "mhead_linear_digits_1n2c.yaml"),
               "-o", f"Engine.save_load.output_dir={out}", "-o", "Model.model.base_encoder.pretrained=null"]
        for o in overrides:
            cmd += ["-o", o]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    log = run("train.py", "Engine.num_train_epochs=2", "Engine.eval_freq=2", "Data.Train.sampler.batch_size=512")
    assert "sanity check passed" in log
    line = next(line for line in log.splitlines() if "[eval] linear" in line)
    for layer in FEATURES:
        assert f"{layer}_top1=" in line and f"{layer}_top5=" in line and f"{layer}_acc1: " in log
    run("eval.py")  # scores best/
    results = json.loads((out / "eval_results.json").read_text())["results"]["linear"]
    assert list(results) == [f"{layer}_top{k}" for layer in FEATURES for k in (1, 5)]
    assert f"feat5_top1={results['feat5_top1']:.2f}" in line  # best/ is the only evaluated epoch
