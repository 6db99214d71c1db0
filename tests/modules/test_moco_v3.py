"""MoCo v3 (ppmoco/modules/moco_v3.py) against NumPy recomputations of moco-v3's builder.py: the
contrastive loss, the symmetric step, the momentum schedule, and the networks' shapes at the
published sizes. Each test names the mutation it catches."""
import math

import numpy as np
import paddle
import pytest

from ppmoco import distributed
from ppmoco.errors import ConfigError
from ppmoco.modules import MoCoV3, Progress, build_module
from ppmoco.modules import moco_v3 as moco_v3_module

TINY = {"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True}


def make(**kw):
    paddle.seed(0)
    return MoCoV3(**{"base_encoder": TINY, "dim": 8, "mlp_dim": 16, "T": 0.2, "m": 0.9, **kw})


def numpy_ctr(q, k, T, offset=0):
    """builder.py's contrastive_loss for the queries `q` of one process, `k` every process's keys."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = (q @ k.T / T).astype("float64")
    logits -= logits.max(1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -log_prob[np.arange(len(q)), np.arange(len(q)) + offset].mean() * 2 * T


# Catches: no 2T scale, keys not normalised, the positive at index 0 (MoCo v2's) instead of the own index.
def test_contrastive_loss_is_builders():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((6, 8)).astype("float32"), rng.standard_normal((6, 8)).astype("float32")
    loss, logits, labels = moco_v3_module.contrastive_loss(paddle.to_tensor(q), paddle.to_tensor(k), 0.2)
    assert float(loss) == pytest.approx(numpy_ctr(q, k, 0.2), rel=2e-6)
    assert logits.shape == [6, 6] and labels.numpy().tolist() == list(range(6))


# Catches: keys not gathered from the other processes, labels not offset by rank x per-process batch.
def test_on_rank_1_of_2_the_positives_sit_after_rank_0s_keys(monkeypatch):
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((4, 8)).astype("float32"), rng.standard_normal((4, 8)).astype("float32")
    other = rng.standard_normal((4, 8)).astype("float32")
    monkeypatch.setattr(moco_v3_module, "rank", lambda: 1)
    monkeypatch.setattr(moco_v3_module, "concat_all_gather",
                        lambda t: paddle.concat([paddle.nn.functional.normalize(paddle.to_tensor(other), axis=1), t]))
    loss, logits, labels = moco_v3_module.contrastive_loss(paddle.to_tensor(q), paddle.to_tensor(k), 1.0)
    assert logits.shape == [4, 8] and labels.numpy().tolist() == [4, 5, 6, 7]
    assert float(loss) == pytest.approx(numpy_ctr(q, np.concatenate([other, k]), 1.0, offset=4), rel=2e-6)


# Catches: each view paired with its own key (q1.k1), the predictor on the momentum branch, the momentum
# encoder given gradients or the predictor none.
def test_the_step_is_the_symmetric_loss_of_predicted_queries_and_other_view_keys():
    moco = make()
    moco.train()
    rng = np.random.default_rng(2)
    x1, x2 = (paddle.to_tensor(rng.standard_normal((6, 3, 16, 16)).astype("float32")) for _ in range(2))
    out = moco.training_step([x1, x2, paddle.zeros([6], dtype="int64")])
    out.loss.backward()
    with paddle.no_grad():  # train mode again: BatchNorm normalises with the same batch statistics
        q1, q2 = (moco.predictor(moco.base_encoder(x)).numpy() for x in (x1, x2))
        k1, k2 = (moco.momentum_encoder(x).numpy() for x in (x1, x2))
    assert float(out.loss) == pytest.approx(numpy_ctr(q1, k2, 0.2) + numpy_ctr(q2, k1, 0.2), rel=1e-5)
    assert all(p.grad is None for p in moco.momentum_encoder.parameters())
    assert all(p.grad is not None for p in moco.predictor.parameters() if not p.stop_gradient)
    assert not any("predictor" in name for name, _ in moco.momentum_encoder.named_parameters())


# Catches: the momentum schedule off (m constant under m_cos), run backwards or by epoch count, BatchNorm's
# running statistics averaged, the predictor averaged into the momentum encoder.
@pytest.mark.parametrize("m_cos", [True, False])
def test_before_step_averages_with_the_scheduled_momentum(m_cos):
    moco = make(m_cos=m_cos)
    for p in moco.base_encoder.parameters():  # move the base encoder away from its copy
        p.set_value(p + 0.1)
    base = {n: p.numpy() for n, p in moco.base_encoder.named_parameters()}
    before = {n: p.numpy() for n, p in moco.momentum_encoder.named_parameters()}
    progress = Progress(epoch=1.25, step=30, total_steps=120)
    moco.before_step(progress)
    m = 1 - 0.5 * (1 + math.cos(math.pi * 30 / 120)) * (1 - 0.9) if m_cos else 0.9
    for name, p in moco.momentum_encoder.named_parameters():
        if name.endswith(("_mean", "_variance")):
            np.testing.assert_array_equal(p.numpy(), before[name], err_msg=name)
        else:
            np.testing.assert_allclose(p.numpy(), m * before[name] + (1 - m) * base[name], rtol=1e-6, atol=1e-7,
                                       err_msg=name)


def _mlp_shape(mlp):
    """[(kind, in, out, has bias / affine)] of a BatchNormMLP."""
    rows = []
    for layer in mlp:
        if isinstance(layer, paddle.nn.Linear):
            rows.append(("linear", layer.weight.shape[0], layer.weight.shape[1], layer.bias is not None))
        elif isinstance(layer, paddle.nn.BatchNorm1D):
            rows.append(("bn", layer._num_features if hasattr(layer, "_num_features") else layer._mean.shape[0],
                         None, layer.weight is not None))
    return rows


# Catches: the ViT's 3-layer projector or its predictor's last BatchNorm on a ResNet (or the reverse),
# a Linear with bias, an affine last BatchNorm; at the published sizes (ResNet-50: 2048-4096-256,
# ViT-S: 384-4096-4096-256, predictor 256-4096-256).
@pytest.mark.parametrize("arch, projector, predictor", [
    ("resnet50", [("linear", 2048, 4096, False), ("bn", 4096, None, True), ("linear", 4096, 256, False),
                  ("bn", 256, None, False)],
     [("linear", 256, 4096, False), ("bn", 4096, None, True), ("linear", 4096, 256, False)]),
    ("vit_small", [("linear", 384, 4096, False), ("bn", 4096, None, True), ("linear", 4096, 4096, False),
                   ("bn", 4096, None, True), ("linear", 4096, 256, False), ("bn", 256, None, False)],
     [("linear", 256, 4096, False), ("bn", 4096, None, True), ("linear", 4096, 256, False),
      ("bn", 256, None, False)]),
])
def test_projector_and_predictor_are_the_references_at_published_sizes(arch, projector, predictor):
    moco = build_module({"module": "MoCoV3", "model": {"base_encoder": {"name": arch}, "dim": 256, "mlp_dim": 4096}})
    assert _mlp_shape(moco.base_encoder.head) == projector == _mlp_shape(moco.momentum_encoder.head)
    assert _mlp_shape(moco.predictor) == predictor
    for b, k in zip(moco.base_encoder.parameters(), moco.momentum_encoder.parameters()):
        np.testing.assert_array_equal(b.numpy(), k.numpy())  # the momentum encoder starts as a copy


def test_bad_arguments_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="Model.model.T"):
        make(T=0)
    with pytest.raises(ConfigError, match="Model.model.projector_layers"):
        make(projector_layers=0)


# Catches: a MoCo v3 checkpoint whose backbone `pretrained` cannot find (the linear probe, kNN and
# tools/convert.py read it), or that takes the momentum encoder's backbone instead of the base one.
@pytest.mark.parametrize("encoder", [TINY, {"name": "vit_mini"}])
def test_the_base_encoders_backbone_loads_from_a_moco_v3_checkpoint(tmp_path, encoder):
    from ppmoco.models import build_backbone, load_pretrained_backbone

    moco = make(base_encoder=encoder)
    for p in moco.momentum_encoder.parameters():  # a momentum encoder that differs from the base one
        p.set_value(p + 1.0)
    folder = tmp_path / "epoch_1"
    folder.mkdir()
    paddle.save(moco.state_dict(), str(folder / "model.pdparams"))
    backbone = build_backbone(encoder, "Model.model.base_encoder")
    load_pretrained_backbone(backbone, str(folder))
    want = moco.base_encoder.backbone.state_dict()
    for name, tensor in backbone.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), want[name].numpy(), err_msg=name)


# Catches: BatchNorm left per process on several GPUs (main_moco.py syncs it), the conversion on the
# CPU (Paddle's SyncBatchNorm runs on GPUs only), and a conversion that breaks the momentum pairs
# (new parameters the average no longer reaches). The forward pass needs a GPU; the wiring does not.
@pytest.mark.parametrize("device, processes, synced", [("gpu:0", 2, True), ("cpu", 2, False), ("gpu:0", 1, False)])
def test_batchnorm_syncs_across_gpu_processes_only(monkeypatch, device, processes, synced):
    moco = make()
    monkeypatch.setattr(distributed, "world_size", lambda: processes)
    monkeypatch.setattr(paddle.device, "get_device", lambda: device)
    pairs = [(id(b), id(k)) for b, k in moco._ema_pairs]
    moco.setup(16)
    norms = (paddle.nn.BatchNorm1D, paddle.nn.BatchNorm2D, paddle.nn.SyncBatchNorm)
    kinds = {type(layer) for part in (moco.base_encoder, moco.momentum_encoder, moco.predictor)
             for layer in part.sublayers() if isinstance(layer, norms)}
    assert kinds == ({paddle.nn.SyncBatchNorm} if synced else {paddle.nn.BatchNorm2D, paddle.nn.BatchNorm1D})
    assert [(id(b), id(k)) for b, k in moco._ema_pairs] == pairs
    live = {id(p) for p in moco.base_encoder.parameters()} | {id(p) for p in moco.momentum_encoder.parameters()}
    assert all(b in live and k in live for b, k in pairs)
