"""Fine-tuning (ppmoco/modules/finetune.py, FleetX's GeneralClsModule) against NumPy recomputations: the
head's and the backbone's learning rates in one optimizer step, frozen stages, label smoothing, loading
MoCo checkpoints, and a short run on digits through the tools. Each test names the mutation it catches."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from ppmoco.errors import CheckpointError, ConfigError
from ppmoco.modules import MoCo, MoCoV3, build_module
from ppmoco.modules.finetune import FineTune, stage_prefixes
from ppmoco.optimizers import build_optimizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY = {"name": "resnet18", "widths": [4, 8, 8, 16], "cifar_stem": True}
VIT = {"name": "vit_mini"}


def batch(seed, n=8, size=16, classes=10):
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((n, 3, size, size)).astype("float32")),
            paddle.to_tensor(rng.integers(0, classes, n).astype("int64"))]


def state(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


def train_steps(module, opt_cfg, lr, steps, size=16):
    """`steps` optimizer steps of the module in train mode, as the Engine takes them; the optimizer."""
    module.train()
    opt = build_optimizer(opt_cfg, module, lr)
    for i in range(steps):
        module.training_step(batch(i, size=size)).loss.backward()
        opt.step()
        opt.clear_grad()
    return opt


# Catches: Optimizer.lr_mult ignored (the head at the backbone's rate), the multiplier applied to every
# parameter or to the backbone, the weight decay left out of the scaled update (or added after it), and a
# backbone that does not train (LinearEval's frozen backbone inherited). ResNet-18 at its published widths;
# the reference is SGD's first step, p - lr x multiplier x (g + weight_decay x p), in float64, within what
# float32 rounds (2 units in the last place of p, and 1e-6 of the update).
def test_one_step_moves_each_parameter_by_lr_times_its_multiplier_times_its_gradient():
    paddle.seed(0)
    module = FineTune(base_encoder={"name": "resnet18"}, num_classes=10)
    module.train()
    lr, decay, head_mult = 0.1, 0.01, 100.0
    opt = build_optimizer({"name": "Momentum", "momentum": 0.9, "weight_decay": decay,
                           "lr_mult": {"classifier": head_mult}}, module, lr)
    assert sorted((g["learning_rate"], len(g["params"])) for g in opt._param_groups) == [
        (1.0, len(module.trainable_parameters()) - 2), (head_mult, 2)]
    module.training_step(batch(0, n=4, size=32)).loss.backward()
    named = [(name, p) for name, p in module.named_parameters() if not p.stop_gradient]
    assert {name for name, _ in named} >= {"backbone.conv1.weight", "backbone.layer4.1.bn2.weight",
                                           "classifier.fc.weight", "classifier.fc.bias"}
    before = {name: (p.numpy().astype("float64"), p.grad.numpy().astype("float64")) for name, p in named}
    opt.step()
    for name, p in named:
        p0, g = before[name]
        mult = head_mult if name.startswith("classifier.") else 1.0
        expected = p0 - lr * mult * (g + decay * p0)
        bound = 2 * np.spacing(np.abs(p0).astype("float32")) + 1e-6 * np.abs(expected - p0)
        assert np.all(np.abs(p.numpy() - expected) <= bound), name
        assert not np.array_equal(p.numpy(), p0.astype("float32")), f"{name} did not move"


# Catches: frozen stages that take a gradient (their weights move), whose BatchNorm runs in train mode (its
# running statistics move: mutation, FrozenBackboneProbe.train not applied), stages counted from the first
# stage instead of the stem, a freeze that reaches the stages after it, or a name prefix that is not a whole
# name part (`blocks.1` freezing `blocks.10`): every other tensor must change, statistics included. The
# probe's sanity check passes.
@pytest.mark.parametrize("encoder, frozen_stages", [(TINY, 0), (TINY, 2), (dict(VIT, depth=11), 2)])
def test_frozen_stages_stay_bitwise_unchanged_with_their_batchnorm_statistics(encoder, frozen_stages):
    paddle.seed(0)
    module = FineTune(base_encoder=encoder, num_classes=10, frozen_stages=frozen_stages)
    stages = stage_prefixes(module.backbone)
    frozen = [p for stage in stages[:frozen_stages + 1] for p in stage]
    module.train()
    for name, layer in module.backbone.named_sublayers():
        assert layer.training == (not any(name == p or name.startswith(p + ".") for p in frozen)), name
    start = state(module.backbone)
    train_steps(module, {"name": "Momentum", "weight_decay": 0.01}, 0.5, steps=3)
    after = state(module.backbone)
    in_frozen = {k for k in start if any(k == p or k.startswith(p + ".") for p in frozen)}
    assert in_frozen and in_frozen == set(module._frozen)
    for key in start:
        if key in in_frozen:
            np.testing.assert_array_equal(after[key], start[key], err_msg=key)
    moved = {k for k in start if not np.array_equal(after[k], start[k])}
    assert moved == set(start) - in_frozen
    module.on_epoch_end(1)  # the sanity check over the frozen tensors passes


# Catches: frozen_stages -1 freezing something (LinearEval's whole-backbone default), BatchNorm kept in eval
# mode (statistics that never learn), and an out-of-range value accepted (a silent no-op or a traceback).
def test_nothing_is_frozen_by_default_and_a_stage_out_of_range_is_one_line():
    module = FineTune(base_encoder=TINY, num_classes=10)
    module.train()
    assert all(not p.stop_gradient for name, p in module.backbone.named_parameters()
               if not name.endswith(("._mean", "._variance")))
    assert module.backbone.bn1.training and module._frozen == {}
    start = state(module.backbone)
    train_steps(module, {"name": "Momentum"}, 0.1, steps=1)
    assert not np.array_equal(state(module.backbone)["bn1._mean"], start["bn1._mean"])
    with pytest.raises(ConfigError, match=r"^Model.model.frozen_stages: 5 is out of range; resnet18 has a stem \(0\) "
                                          r"and 4 stages, so use -1 \(nothing frozen\) to 4$"):
        FineTune(base_encoder=TINY, num_classes=10, frozen_stages=5)
    with pytest.raises(ConfigError, match=r"^Model.model.frozen_stages: -2 is out of range; vit_mini has a stem "
                                          r"\(0\) and 4 stages"):
        FineTune(base_encoder=VIT, num_classes=10, frozen_stages=-2)


# Catches: BatchNorm left per process on several GPUs (mmselfsup's SyncBN), the conversion on the CPU (Paddle's
# SyncBatchNorm runs on GPUs only), and a conversion that unfreezes the frozen stem or trains it in train mode
# (new parameters, or layers the frozen names no longer reach). The forward pass needs a GPU; the wiring does not.
@pytest.mark.parametrize("device, processes, synced", [("gpu:0", 2, True), ("cpu", 2, False), ("gpu:0", 1, False)])
def test_batchnorm_syncs_across_gpu_processes_only_and_the_frozen_stem_stays_frozen(monkeypatch, device, processes,
                                                                                   synced):
    from ppmoco import distributed

    module = FineTune(base_encoder=TINY, num_classes=10, frozen_stages=0)
    trainable = [id(p) for p in module.trainable_parameters()]
    monkeypatch.setattr(distributed, "world_size", lambda: processes)
    monkeypatch.setattr(paddle.device, "get_device", lambda: device)
    module.setup(16)
    norms = {type(layer) for layer in module.backbone.sublayers()
             if isinstance(layer, (paddle.nn.BatchNorm2D, paddle.nn.SyncBatchNorm))}
    assert norms == ({paddle.nn.SyncBatchNorm} if synced else {paddle.nn.BatchNorm2D})
    assert [id(p) for p in module.trainable_parameters()] == trainable
    module.train()
    assert not module.backbone.bn1.training and module.backbone.layer1[0].bn1.training


def numpy_smoothed_cross_entropy(logits, labels, epsilon):
    """Mean over rows of -sum_c q_c log softmax(z)_c with q = (1 - epsilon) one-hot + epsilon / classes."""
    logits = logits.astype("float64")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    target = np.full(logits.shape, epsilon / logits.shape[1])
    target[np.arange(len(labels)), labels] += 1 - epsilon
    return -(target * log_probs).sum(axis=1).mean()


# Catches: Model.loss.train.epsilon not reaching the loss (plain cross-entropy), smoothing over the other
# classes only (epsilon / (classes - 1)), and an unsmoothed loss without the key.
@pytest.mark.parametrize("epsilon", [None, 0.1, 0.3])
def test_label_smoothing_from_model_loss_epsilon_equals_the_numpy_loss(epsilon):
    paddle.seed(0)
    model = {"module": "GeneralClsModule", "model": {"base_encoder": TINY, "num_classes": 10},
             "loss": {"train": {"name": "CELoss", "epsilon": epsilon}, "eval": {"name": "CELoss", "epsilon": None}}}
    module = build_module(model)
    module.train()
    images, labels = batch(1)
    loss = module.training_step([images, labels]).loss
    logits = module.classifier(module.backbone(images)).numpy()  # train mode: the same batch statistics
    np.testing.assert_allclose(float(loss), numpy_smoothed_cross_entropy(logits, labels.numpy(), epsilon or 0.0),
                               rtol=1e-6)


@pytest.mark.parametrize("model, loss, message", [
    ({"label_smoothing": 0.1}, {}, r"^Model.model.label_smoothing: set the label smoothing as "
                                   r"Model.loss.train.epsilon"),
    ({}, {"eval": {"epsilon": 0.1}}, r"^Model.loss.eval.epsilon: validation reports top-k accuracy, not a loss"),
    ({}, {"train": {"epsilon": 1.0}}, r"^Model.loss.train.epsilon: 1.0 must lie in \[0, 1\)"),
    ({}, {"train": {"epsilon": "0.1"}}, r"^Model.loss.train.epsilon: expected a number in \[0, 1\), got '0.1'$"),
    ({"class_num": 10}, {}, r"^Model.model.class_num: FleetX's GeneralClsModule names its network in Model.model; "
                            r"ppmoco's takes base_encoder \{name, pretrained\} and num_classes"),
])
def test_loss_and_fleetx_model_keys_are_one_line_errors(model, loss, message):
    # Catches: a second spelling of the smoothing, an eval epsilon silently ignored, an epsilon out of range,
    # and FleetX's own GeneralClsModule description failing later with a traceback.
    section = {"module": "FineTune", "model": {"base_encoder": TINY, "num_classes": 10, **model},
               "loss": {phase: {"name": "CELoss", "epsilon": None, **loss.get(phase, {})}
                        for phase in ("train", "eval")}}
    with pytest.raises(ConfigError, match=message):
        build_module(section)


# Catches: Model.metric's top-k not reaching the fine-tuning module (ppmoco.fleetx's list of classifiers),
# which would report top-1/top-5 whatever the config asks.
def test_model_metric_sets_the_reported_top_k():
    metric = {phase: {"name": "TopkAcc", "topk": [1, 2]} for phase in ("train", "eval")}
    module = build_module({"module": "GeneralClsModule", "model": {"base_encoder": TINY, "num_classes": 10},
                           "metric": metric})
    assert module.topk == [1, 2]
    assert list(module.validation_end({"logits": np.eye(3, 10, dtype="float32"), "labels": np.arange(3)})) == [
        "top1", "top2"]


def randomise(layer, seed):
    rng = np.random.default_rng(seed)
    for name, tensor in layer.state_dict().items():
        value = rng.standard_normal(tensor.shape).astype("float32")
        tensor.set_value(np.abs(value) + 0.5 if name.endswith("_variance") else value)


# Catches: the backbone not loaded (or loaded from the key / momentum encoder), the head taken from the
# checkpoint instead of starting at N(0, 0.01) and 0, a MoCo v3 or ViT checkpoint refused, and a partial
# load: a file missing a backbone tensor, or holding one the backbone lacks, must fail naming it, as the
# linear probe's does (all or nothing, ppmoco/models/pretrained.py).
@pytest.mark.parametrize("method", ["mocov2", "mocov3_vit"])
def test_a_moco_checkpoint_loads_into_the_backbone_and_the_head_starts_fresh(tmp_path, method):
    paddle.seed(3)
    if method == "mocov2":
        moco = MoCo(base_encoder=TINY, projector={"hidden_dim": 16}, dim=8, K=16)
        encoder, source, other = TINY, moco.encoder_q.backbone, moco.encoder_k.backbone
        prefix, tensor = "encoder_q.backbone.", "layer1.0.conv1.weight"
    else:
        moco = MoCoV3(base_encoder=VIT, dim=8, mlp_dim=16)
        encoder, source, other = VIT, moco.base_encoder.backbone, moco.momentum_encoder.backbone
        prefix, tensor = "base_encoder.backbone.", "blocks.0.attn.qkv.weight"
    randomise(source, 3)
    randomise(other, 4)
    path = tmp_path / "moco.pdparams"
    paddle.save(moco.state_dict(), str(path))
    paddle.seed(5)
    module = FineTune(base_encoder=dict(encoder, pretrained=str(path)), num_classes=100)
    want = state(source)
    for name, value in state(module.backbone).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    w = module.classifier.fc.weight.numpy()
    assert abs(w.std() - 0.01) < 0.002 and not module.classifier.fc.bias.numpy().any()

    checkpoint = {k: v.numpy() for k, v in moco.state_dict().items()}
    missing = {k: v for k, v in checkpoint.items() if k != prefix + tensor}
    paddle.save(missing, str(tmp_path / "missing.pdparams"))
    with pytest.raises(CheckpointError, match=rf"^Model.model.base_encoder.pretrained: .* does not fit the backbone: "
                                              rf"missing: {tensor};"):
        FineTune(base_encoder=dict(encoder, pretrained=str(tmp_path / "missing.pdparams")), num_classes=10)
    extra = dict(checkpoint, **{prefix + "extra.weight": np.zeros([2], "float32")})
    paddle.save(extra, str(tmp_path / "extra.pdparams"))
    with pytest.raises(CheckpointError, match=r"does not fit the backbone: unexpected: extra.weight;"):
        FineTune(base_encoder=dict(encoder, pretrained=str(tmp_path / "extra.pdparams")), num_classes=10)


def run(tool, config, *overrides, processes=1, log_dir=None):
    launch = [] if processes == 1 else ["-m", "paddle.distributed.launch", "--nproc_per_node", str(processes),
                                        "--log_dir", str(log_dir)]
    cmd = [sys.executable, *launch, os.path.join(ROOT, "tools", tool), "-c", os.path.join(ROOT, "configs", config)]
    for o in overrides:
        cmd += ["-o", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# Catches: the digits recipe not running through the tools on its two processes (its label_fraction subset,
# the lr groups, the frozen stem, validation), the best checkpoint not kept, tools/eval.py not scoring it into
# the results table under the pretrained file's row, a frozen stem that moved (the sanity check after epoch 1),
# and a best/ that is not the model the run validated: each process's BatchNorm statistics left its own
# (mutation: FineTune.on_epoch_end without the average), so that the run validated a mix of two models and
# tools/eval.py scores rank 0's with other results.
@pytest.mark.slow
def test_digits_finetune_on_two_processes_validates_the_model_eval_scores(tmp_path):
    paddle.seed(0)
    moco = MoCo(base_encoder=dict(TINY, widths=[8, 16, 32, 64]), projector={"hidden_dim": 16}, dim=8, K=16)
    pretrained = tmp_path / "mocov2.pdparams"
    paddle.save(moco.state_dict(), str(pretrained))
    out = tmp_path / "ft"
    config = "benchmarks/finetune_digits_10percent_1n2c.yaml"
    common = [f"Engine.save_load.output_dir={out}", f"Model.model.base_encoder.pretrained={pretrained}"]
    run("train.py", config, *common, "Engine.num_train_epochs=3", "Engine.eval_freq=1", "Model.model.frozen_stages=0",
        "Engine.logging_freq=1", processes=2, log_dir=tmp_path / "logs")
    log = (out / "train.log").read_text()
    assert "loaded 100 backbone tensors" in log and "sanity check passed" in log
    assert "Optimizer.lr_mult {'classifier': 10.0}: 2 of" in log
    assert len([line for line in log.splitlines() if "[train]" in line]) == 3 * 3  # 144 images, 3 steps of 2 x 24
    logged = [line.split("[eval] linear ")[1] for line in log.splitlines() if "[eval] linear" in line]
    best = max(logged, key=lambda line: float(line.split("top1=")[1].split()[0]))
    assert len(logged) == 3 and (out / "best" / "model.pdparams").is_file()
    printed = run("eval.py", config, *common)
    results = json.loads((out / "eval_results.json").read_text())["results"]["linear"]
    assert f"top1={results['top1']:.2f} top5={results['top5']:.2f}" == best.strip()
    assert f"linear {best.strip()}" in printed
    assert f"| {pretrained} | {results['top1']:.2f} | {results['top5']:.2f} |" in (out / "eval_results.md").read_text()
